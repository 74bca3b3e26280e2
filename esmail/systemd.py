"""systemd's notify protocol (sd_notify(3)): a datagram of `KEY=value` lines to `$NOTIFY_SOCKET`.

A few lines of the standard library; without `$NOTIFY_SOCKET` (not run by
systemd) every call does nothing. The watchdog keep-alive is sent from a
task on the event loop, so a wedged loop stops it and systemd restarts us.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

STATUS_EVERY = 30.0  # seconds between STATUS= updates when there is no watchdog


class Notifier:
    def __init__(self, environ: Mapping[str, str] = os.environ):
        path = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path  # '@': an abstract socket
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self.address else None
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog = watched and self.socket is not None
        # half the watchdog period, as sd_watchdog_enabled(3) advises
        self.interval = int(usec) / 2e6 if self.watchdog else STATUS_EVERY

    def notify(self, *lines: str) -> None:
        if self.socket is None:
            return
        try:
            self.socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:  # systemd gone or the socket unreachable: nothing a mail server should stop for
            log.debug("cannot notify systemd at %s: %s", self.address, exc)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
