"""History rows that wait for the database (DESIGN §17): the worker never waits on PostgreSQL.

While the database answers, rows go to it from memory. While it does not
(or lags), they are appended here, `{spool}/history-journal/`, one JSON line
each, and written in order once it is back — also after a restart, which
finds the files of the runs before. Each process appends to a file of its
own and holds a lock on it while it is open, so a file whose writer is gone
(an `esmail ingest`, a daemon before its restart) can be taken by whoever
drains next, and a live one is left to its writer.

No fsync: like the history itself, this is a record, not the mail (the spool
is fsync'd). A process killed outright keeps what it wrote (the kernel has it).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import IO, Iterator

log = logging.getLogger("esmail.history")

FOLDER = "history-journal"
SUFFIX = ".jsonl"


class Journal:
    """Owned by one thread of one process (the history's writer)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] | None = None  # the file this process appends to, locked while open
        self._counts: dict[str, int] = {}  # lines waiting in each file seen

    def __str__(self) -> str:
        return str(self.folder)

    def waiting(self) -> int:
        """Rows that wait in the journal's files (those of other processes included, once seen)."""
        self._scan()
        return sum(self._counts.values())

    def append(self, items: list[dict]) -> None:
        """Keep rows for later, after every row kept before."""
        if not items:
            return
        if self._file is None:
            path = self.folder / f"{time.time_ns():020d}-{os.getpid()}{SUFFIX}"
            self._file = open(path, "ab")
            fcntl.flock(self._file, fcntl.LOCK_EX)
            self._counts[path.name] = 0
        self._file.write(b"".join(json.dumps(item, separators=(",", ":")).encode() + b"\n" for item in items))
        self._file.flush()
        self._counts[Path(self._file.name).name] += len(items)

    def files(self) -> Iterator[tuple[Path, list[dict]]]:
        """Each file that can be taken now, oldest first, with its rows; `done(path)` once they are written.
        This process's own file is closed first (new rows start a new one); a file another live process holds is skipped."""
        self._close_own()
        for path in sorted(self.folder.glob("*" + SUFFIX)):
            try:
                file = open(path, "rb")
            except FileNotFoundError:  # taken by another drainer meanwhile
                self._counts.pop(path.name, None)
                continue
            with file:
                try:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # its writer is alive: it drains its own
                    continue
                yield path, list(_rows(path, file))

    def done(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._counts.pop(path.name, None)

    def close(self) -> None:
        self._close_own()

    def _close_own(self) -> None:
        if self._file is not None:
            self._file.close()  # the lock goes with it
            self._file = None

    def _scan(self) -> None:
        """Count the rows of files not seen before (another process's, or a run before this one)."""
        for path in self.folder.glob("*" + SUFFIX):
            if path.name not in self._counts:
                try:
                    with open(path, "rb") as file:
                        self._counts[path.name] = sum(1 for _ in file)
                except FileNotFoundError:
                    continue


def _rows(path: Path, file: IO[bytes]) -> Iterator[dict]:
    for number, line in enumerate(file, 1):
        try:
            yield json.loads(line)
        except ValueError:  # the last line of a writer killed mid-write
            log.warning("history journal %s line %d is not whole; skipped", path, number)
