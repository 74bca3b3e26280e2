"""Writes that survive a crash: a file is complete on disk, and so is its name, before we say so."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)  # Linux; the standard library has only os.sync(), which flushes every filesystem


def write_synced(path: Path, *chunks: bytes) -> None:
    """Write and fsync a (temporary) file; the caller renames or links it into place."""
    with open(path, "wb") as f:
        f.writelines(chunks)
        f.flush()
        os.fsync(f.fileno())


def write_unsynced(path: Path, *chunks: bytes, new: bool = True, mode: int = 0o600) -> None:
    """Write a file that `sync_files` will make durable together with others (three system calls).

    `new`: create it (it must not exist) with `mode` (less the umask); else it exists, empty (see `Spool.make_blanks`).
    """
    fd = os.open(path, os.O_WRONLY | (os.O_CREAT | os.O_EXCL if new else 0), mode)
    try:
        written = os.writev(fd, chunks)
        rest = memoryview(b"".join(chunks))[written:] if written < sum(map(len, chunks)) else b""
        while rest:  # a short write is rare (a signal, a huge file) but must not leave the file cut short
            rest = rest[os.write(fd, rest):]
    finally:
        os.close(fd)


def sync_files(folder: Path, paths: list[Path]) -> None:
    """Make several files (or folders: their entries) durable with one flush: syncfs(2) on their filesystem, else an fsync each."""
    if _syncfs is not None:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs(fd) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, os.strerror(errno))
        finally:
            os.close(fd)
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename, link or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
