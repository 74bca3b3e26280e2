"""The embedded default: `{spool}/history.sqlite`, for one host (no database server to run).

stdlib sqlite3 in WAL mode. One writer, the worker, in a thread of its own
(the event loop never waits on the disk); readers open their own
connections, which WAL lets run beside the writer. A file that cannot be
read is logged, moved aside and started again: the spool and the buckets
hold the mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from esmail.group_commit import Batches
from esmail.history.base import (OUTCOMES_IN_DETAIL, Db, Finished, History, now_text, write_declared, write_dropped,
                                 write_finished, write_pruned)

log = logging.getLogger("esmail.history")

FILE_NAME = "history.sqlite"
VERSION = 4

_TABLES = """
CREATE TABLE schema (version INTEGER NOT NULL);
CREATE TABLE messages (
    id TEXT PRIMARY KEY, received TEXT NOT NULL, origin TEXT NOT NULL, client TEXT, helo TEXT, mail_from TEXT,
    header_from TEXT, subject TEXT, date TEXT, size INTEGER, authentication TEXT,
    state TEXT NOT NULL, reason TEXT, attempts INTEGER, seconds REAL, finished TEXT NOT NULL);
CREATE INDEX messages_by_time ON messages (received);
CREATE TABLE message_prefixes (
    id TEXT NOT NULL, prefix TEXT NOT NULL, received TEXT NOT NULL, state TEXT NOT NULL,
    csvs INTEGER NOT NULL, unprocessable INTEGER NOT NULL, PRIMARY KEY (id, prefix));
CREATE INDEX prefixes_by_time ON message_prefixes (prefix, received);
CREATE TABLE outcomes (id TEXT NOT NULL, at TEXT NOT NULL, outcome TEXT NOT NULL, reason TEXT, attempts INTEGER, seconds REAL);
CREATE INDEX outcomes_by_message ON outcomes (id);
CREATE TABLE files (
    id TEXT NOT NULL, prefix TEXT NOT NULL, role TEXT NOT NULL, name TEXT NOT NULL, kind TEXT, rule TEXT,
    bucket TEXT NOT NULL, key TEXT NOT NULL, bytes INTEGER, reason TEXT);
CREATE INDEX files_by_message ON files (id);
CREATE TABLE prefixes (
    prefix TEXT PRIMARY KEY, first_declared TEXT, last_message TEXT, last_csv TEXT, last_unprocessable INTEGER NOT NULL DEFAULT 0);
"""
# Version by version from the first: a file made by an older esmail is brought up to date when opened.
_MIGRATIONS = {
    2: """
ALTER TABLE messages ADD COLUMN host TEXT NOT NULL DEFAULT '';
ALTER TABLE outcomes ADD COLUMN event TEXT;
CREATE UNIQUE INDEX outcomes_by_event ON outcomes (event);
CREATE INDEX messages_by_host ON messages (host);
CREATE INDEX message_prefixes_by_time ON message_prefixes (received);
CREATE TABLE late_feeds (prefix TEXT PRIMARY KEY, since TEXT NOT NULL, host TEXT NOT NULL);
CREATE TABLE actions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, host TEXT NOT NULL, action TEXT NOT NULL, by TEXT NOT NULL,
    requested TEXT NOT NULL, requested_from TEXT NOT NULL, done TEXT, outcome TEXT);
CREATE INDEX actions_by_host ON actions (host, done);
CREATE INDEX actions_by_message ON actions (id);
""",
    3: "ALTER TABLE files ADD COLUMN check_report TEXT;",  # a CSV's report (DESIGN §16), as JSON
    4: OUTCOMES_IN_DETAIL,
}


class _Db:
    """sqlite3 as the shared SQL wants it (base.Db)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def run(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, args)


    def run_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    @staticmethod
    def pipeline() -> contextlib.nullcontext:
        return contextlib.nullcontext()  # in the same process: nothing to wait for


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


class SqliteHistory(History):
    """Writes in a thread of its own; a failure is logged, never raised to the worker."""

    def __init__(self, spool_path: Path, host: str = ""):
        super().__init__(host)
        self.path = Path(spool_path) / FILE_NAME
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="history")
        self._conn: sqlite3.Connection | None = None
        # outcomes finished while the last were written go in together: one trip to the thread, one transaction
        self._outcomes = Batches(lambda conn, rows: self._in_transaction(conn, write_finished, rows), thread=self._run)

    def __str__(self) -> str:
        return str(self.path)

    # --- writing: the writer's thread --------------------------------------------

    async def record(self, finished: Finished) -> None:
        await self._outcomes.submit((finished, self.host, self.new_event()))

    async def declare(self, prefixes: list[str]) -> None:
        await self._run(self._in_transaction, write_declared, prefixes, now_text())

    async def dropped(self, entry_id: str, prefixes: list[str], reason: str) -> None:
        await self._run(self._in_transaction, write_dropped, entry_id, prefixes, reason, now_text(), self.new_event())

    async def prune(self, keep_days: float) -> None:
        await self._run(self._in_transaction, write_pruned, keep_days)
        await self._run(_analyze)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self, function, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self._guarded, function, *args)
        except Exception:  # a bug in here must not stop a message
            log.exception("cannot write to the history %s", self.path)
            return None

    def _guarded(self, function, *args):
        """`function` on the connection; a damaged file is moved aside and the call made once more on a new one."""
        try:
            return function(self._connection(), *args)
        except sqlite3.DatabaseError as exc:
            self._set_aside(f"{type(exc).__name__}: {exc}")
            return function(self._connection(), *args)

    @staticmethod
    def _in_transaction(conn: sqlite3.Connection, write: Callable, *args):
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = write(_Db(conn), *args)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self._conn = _opened(self.path)
            except sqlite3.DatabaseError as exc:
                self._set_aside(f"{type(exc).__name__}: {exc}")
                self._conn = _opened(self.path)
        return self._conn

    def _set_aside(self, why: str) -> None:
        """Move a damaged file (and its WAL) aside, so that a new one can start; the mail is safe in the spool and buckets."""
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None
        aside = self.path.with_name(f"{FILE_NAME}.damaged-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                source.rename(f"{aside}{suffix}")
        log.error("the history %s cannot be used (%s): moved aside to %s; a new one starts now (no mail is lost: "
                  "the history is a record, the spool and the buckets hold the messages)", self.path, why, aside)

    # --- reading: a connection of its own per use ----------------------------------

    async def _decide(self, write: Callable, *args) -> Any:
        return await self._run(self._in_transaction, write, *args)

    def _read(self, function: Callable[[Db], Any], key: tuple | None) -> Any:
        if not self.path.exists():  # no history yet
            return None
        try:
            conn = _connect(self.path)
        except sqlite3.Error:
            return None
        try:
            conn.execute("PRAGMA query_only = 1")
            return function(_Db(conn))
        except sqlite3.Error as exc:  # damaged, or older than this esmail: the writer sets it aside or migrates it
            if not str(exc).startswith("no such table"):  # else: made a moment ago, its tables not yet (the first start)
                log.warning("cannot read the history %s: %s", self.path, exc)
            return None
        finally:
            conn.close()


def probe(spool_path: Path) -> str:
    """For check-config: the file and how many messages it holds (none yet: made at the first message)."""
    path = Path(spool_path) / FILE_NAME
    if not path.exists():
        return f"{path}: not made yet (the first message makes it)"
    conn = _connect(path)
    try:
        count = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    finally:
        conn.close()
    return f"{path}: {count:,} message{'' if count == 1 else 's'}"


def _opened(path: Path) -> sqlite3.Connection:
    """The writer's connection: the schema made, checked, or brought up to this esmail's version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = _connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # a record, not the truth: no fsync per message
        if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("quick_check found damage")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            conn.executescript(_TABLES)
            conn.execute("INSERT INTO schema VALUES (1)")
        elif "schema" not in tables:
            raise sqlite3.DatabaseError("not an esmail history (no schema table)")
        version = conn.execute("SELECT version FROM schema").fetchone()[0]
        if version > VERSION:
            raise sqlite3.DatabaseError(f"schema version {version}, this esmail knows {VERSION}")
        for step in range(version + 1, VERSION + 1):
            conn.executescript(f"BEGIN IMMEDIATE; {_MIGRATIONS[step]} UPDATE schema SET version = {step}; COMMIT;")
    except BaseException:
        conn.close()
        raise
    return conn


def _analyze(conn: sqlite3.Connection) -> None:
    """Fresh statistics for the query planner (a sample of each index: milliseconds), so that the page's questions take
    the indexes that answer them best as the history grows; at start and daily, with the pruning."""
    conn.execute("PRAGMA analysis_limit = 1000")
    conn.execute("ANALYZE")
