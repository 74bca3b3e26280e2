"""Writes that survive a crash: a file is complete on disk, and so is its name, before we say so."""

from __future__ import annotations

import os
from pathlib import Path


def write_synced(path: Path, *chunks: bytes) -> None:
    """Write and fsync a (temporary) file; the caller renames or links it into place."""
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename, link or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
