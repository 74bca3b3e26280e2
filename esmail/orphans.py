"""The processes esmail starts end with it.

A conversion process or a receiver whose daemon is killed (kill -9, the
OOM killer) would otherwise live on, holding its memory, or the port. Linux
sends such a process a signal when its parent dies, once asked
(prctl PR_SET_PDEATHSIG); asked too late, the parent is already gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Be sent `sig` when the process that started this one ends (Linux); exit now if it already has."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: nothing to ask
        return
    if os.getppid() != parent:
        os._exit(1)
