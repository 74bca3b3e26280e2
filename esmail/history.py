"""The history (DESIGN §13): what arrived, what came of it — for the data team's page, not for safekeeping.

`{spool}/history.sqlite`, stdlib sqlite3 in WAL mode. One writer, the
worker, through `History` (a thread of its own: the event loop never waits
on the disk); readers open their own connections (`Reader`), which WAL lets
run beside the writer. The spool and the buckets are the truth: a history
that cannot be read is logged, moved aside and started again, and no
message is held up for it.

    messages          one row per message: envelope, headers, its state now
    message_prefixes  one row per message and prefix: state, CSVs and unprocessable files
    outcomes          every outcome of a message, in order (a failure, then its retry)
    files             every object a message stored: name, kind, rule, bucket, key, bytes, reason
    prefixes          per prefix: first declared as a [[feed]], last message, last CSV
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "history.sqlite"
VERSION = 1
PAGE = 50  # messages a page

# The outcomes a message can have; its state is the last one, with released and retried counted as stored.
STORED, QUARANTINED, FAILED, RELEASED, RETRIED = "stored", "quarantined", "failed", "released", "retried"
QUEUED = "queued"  # not an outcome: a message still in the spool's queue
STATES = (QUEUED, STORED, QUARANTINED, FAILED)

_SCHEMA = """
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


@dataclass(frozen=True)
class FileRow:
    prefix: str
    role: str  # the logical bucket: inbox (the raw message), amr_data (a CSV), unprocessable
    name: str  # the output's name under the key folder
    kind: str
    rule: str
    bucket: str  # the real bucket name
    key: str
    bytes: int
    reason: str = ""  # why it is unprocessable


@dataclass(frozen=True)
class Finished:
    """One outcome of one message, as the worker saw it."""

    id: str
    received: str
    origin: str
    outcome: str  # STORED, QUARANTINED, FAILED, RELEASED
    prefixes: dict[str, str]  # prefix → its state (stored, quarantined, failed)
    client: str = ""
    helo: str = ""
    mail_from: str = ""
    header_from: str = ""
    subject: str = ""
    date: str = ""
    size: int = 0
    authentication: str = ""
    reason: str = ""
    attempts: int = 1
    seconds: float = 0.0
    files: list[FileRow] = field(default_factory=list)


def now_text() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


class History:
    """The writer. Every method runs in its own thread; a failure is logged, never raised to the worker."""

    def __init__(self, spool_path: Path):
        self.path = Path(spool_path) / FILE_NAME
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="history")
        self._conn: sqlite3.Connection | None = None

    # --- the writer's thread ---------------------------------------------------

    async def record(self, finished: Finished) -> None:
        await self._run(self._record, finished)

    async def declare(self, prefixes: list[str]) -> None:
        """Remember when each feed was first declared (a feed that never received anything is late from then)."""
        await self._run(self._declare, prefixes)

    async def prune(self, keep_days: float) -> int:
        """Forget messages received more than `keep_days` ago; how many."""
        return await self._run(self._prune, keep_days) or 0

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

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        try:
            return _opened(self.path)
        except sqlite3.DatabaseError as exc:
            self._set_aside(f"{type(exc).__name__}: {exc}")
            return _opened(self.path)

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

    @staticmethod
    def _record(conn: sqlite3.Connection, item: Finished) -> None:
        at = now_text()
        with _transaction(conn):
            previous = conn.execute("SELECT state FROM messages WHERE id = ?", (item.id,)).fetchone()
            outcome = RETRIED if item.outcome == STORED and previous is not None and previous["state"] == FAILED else item.outcome
            state = STORED if outcome in (RELEASED, RETRIED) else outcome
            conn.execute(
                "INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item.id, item.received, item.origin, item.client, item.helo, item.mail_from, item.header_from, item.subject,
                 item.date, item.size, item.authentication, state, item.reason, item.attempts, item.seconds, at))
            conn.execute("INSERT INTO outcomes VALUES (?, ?, ?, ?, ?, ?)", (item.id, at, outcome, item.reason, item.attempts, item.seconds))
            if outcome == RELEASED:  # the files stored before (the inbox copy) stay; the released prefixes get theirs
                conn.execute(f"DELETE FROM files WHERE id = ? AND prefix IN ({','.join('?' * len(item.prefixes))})", (item.id, *item.prefixes))
            else:
                conn.execute("DELETE FROM files WHERE id = ?", (item.id,))
            conn.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             [(item.id, f.prefix, f.role, f.name, f.kind, f.rule, f.bucket, f.key, f.bytes, f.reason) for f in item.files])
            for prefix, prefix_state in item.prefixes.items():
                csvs = sum(1 for f in item.files if f.prefix == prefix and f.role == "amr_data")
                unprocessable = sum(1 for f in item.files if f.prefix == prefix and f.role == "unprocessable")
                conn.execute("INSERT OR REPLACE INTO message_prefixes VALUES (?, ?, ?, ?, ?, ?)",
                             (item.id, prefix, item.received, prefix_state, csvs, unprocessable))
                conn.execute("INSERT INTO prefixes (prefix) VALUES (?) ON CONFLICT DO NOTHING", (prefix,))
                conn.execute("UPDATE prefixes SET last_unprocessable = ?, last_message = ? WHERE prefix = ? "
                             "AND (last_message IS NULL OR last_message <= ?)", (unprocessable, item.received, prefix, item.received))
                if csvs:
                    conn.execute("UPDATE prefixes SET last_csv = ? WHERE prefix = ? AND (last_csv IS NULL OR last_csv < ?)",
                                 (item.received, prefix, item.received))

    @staticmethod
    def _declare(conn: sqlite3.Connection, prefixes: list[str]) -> None:
        at = now_text()
        with _transaction(conn):
            for prefix in prefixes:
                conn.execute("INSERT INTO prefixes (prefix, first_declared) VALUES (?, ?) "
                             "ON CONFLICT (prefix) DO UPDATE SET first_declared = coalesce(first_declared, excluded.first_declared)",
                             (prefix, at))

    @staticmethod
    def _prune(conn: sqlite3.Connection, keep_days: float) -> int:
        cutoff = (datetime.now(timezone.utc) - timedelta(days=keep_days)).isoformat()
        with _transaction(conn):
            old = "SELECT id FROM messages WHERE received < ?"
            for table in ("files", "outcomes", "message_prefixes"):
                conn.execute(f"DELETE FROM {table} WHERE id IN ({old})", (cutoff,))
            return conn.execute("DELETE FROM messages WHERE received < ?", (cutoff,)).rowcount


class _transaction:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback):
        self.conn.execute("COMMIT" if kind is None else "ROLLBACK")


def _opened(path: Path) -> sqlite3.Connection:
    """The writer's connection: the schema made or checked (a later version would migrate here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = _connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # a record, not the truth: no fsync per message
        if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("quick_check found damage")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            conn.executescript(_SCHEMA)
            conn.execute("INSERT INTO schema VALUES (?)", (VERSION,))
        elif "schema" not in tables:
            raise sqlite3.DatabaseError("not an esmail history (no schema table)")
        else:
            version = conn.execute("SELECT version FROM schema").fetchone()[0]
            if version != VERSION:
                raise sqlite3.DatabaseError(f"schema version {version}, this esmail knows {VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn


class Reader:
    """A read-only view for the page: a connection of its own per use, so that it never waits on the writer (WAL)."""

    def __init__(self, spool_path: Path):
        self.path = Path(spool_path) / FILE_NAME

    def connect(self) -> sqlite3.Connection | None:
        """None while there is no history yet (or it cannot be read: the writer will set it aside)."""
        if not self.path.exists():
            return None
        try:
            conn = _connect(self.path)
            conn.execute("PRAGMA query_only = 1")
            return conn
        except sqlite3.Error:
            return None

    def query(self, sql: str, *args) -> list[sqlite3.Row]:
        conn = self.connect()
        if conn is None:
            return []
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            log.warning("cannot read the history %s: %s", self.path, exc)
            return []
        finally:
            conn.close()

    # --- what the page shows ---------------------------------------------------

    def prefixes(self) -> dict[str, sqlite3.Row]:
        return {row["prefix"]: row for row in self.query("SELECT * FROM prefixes")}

    def counts_since(self, since: str) -> dict[str, int]:
        """Messages per prefix received since `since`."""
        rows = self.query("SELECT prefix, COUNT(*) AS n FROM message_prefixes WHERE received >= ? GROUP BY prefix", since)
        return {row["prefix"]: row["n"] for row in rows}

    def totals_since(self, since: str) -> dict[str, int]:
        rows = self.query("SELECT state, COUNT(*) AS n FROM messages WHERE received >= ? GROUP BY state", since)
        return {row["state"]: row["n"] for row in rows}

    def per_day(self, days: int) -> dict[str, dict[str, int]]:
        """UTC day → state → messages, for the last `days` days."""
        since = (datetime.now(timezone.utc) - timedelta(days=days - 1)).strftime("%Y-%m-%d")
        rows = self.query("SELECT substr(received, 1, 10) AS day, state, COUNT(*) AS n FROM messages "
                          "WHERE received >= ? GROUP BY day, state", since)
        found: dict[str, dict[str, int]] = {}
        for row in rows:
            found.setdefault(row["day"], {})[row["state"]] = row["n"]
        return found

    def messages(self, prefix: str = "", state: str = "", text: str = "", page: int = 1) -> tuple[list[sqlite3.Row], bool]:
        """A page of messages, newest first, and whether there is a next page."""
        where, args = [], []
        if prefix:
            where.append("id IN (SELECT id FROM message_prefixes WHERE prefix = ?)")
            args.append(prefix)
        if state:
            where.append("state = ?")
            args.append(state)
        if text:
            like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append("(header_from LIKE ? ESCAPE '\\' OR subject LIKE ? ESCAPE '\\' OR mail_from LIKE ? ESCAPE '\\' "
                         "OR id IN (SELECT id FROM files WHERE name LIKE ? ESCAPE '\\'))")
            args += [like] * 4
        sql = ("SELECT m.*, (SELECT group_concat(prefix, ',') FROM message_prefixes p WHERE p.id = m.id) AS prefix_list "
               "FROM messages m" + (" WHERE " + " AND ".join(where) if where else "") +
               " ORDER BY received DESC, m.rowid DESC LIMIT ? OFFSET ?")  # within a second: the order they were finished in
        rows = self.query(sql, *args, PAGE + 1, (max(page, 1) - 1) * PAGE)
        return rows[:PAGE], len(rows) > PAGE

    def message(self, entry_id: str) -> tuple[sqlite3.Row | None, list[sqlite3.Row], list[sqlite3.Row], list[sqlite3.Row]]:
        """A message, its prefixes, its files and its outcomes (oldest first)."""
        conn = self.connect()
        if conn is None:
            return None, [], [], []
        try:
            row = conn.execute("SELECT * FROM messages WHERE id = ?", (entry_id,)).fetchone()
            prefixes = conn.execute("SELECT * FROM message_prefixes WHERE id = ? ORDER BY prefix", (entry_id,)).fetchall()
            files = conn.execute("SELECT * FROM files WHERE id = ? ORDER BY rowid", (entry_id,)).fetchall()
            outcomes = conn.execute("SELECT * FROM outcomes WHERE id = ? ORDER BY rowid", (entry_id,)).fetchall()
            return row, prefixes, files, outcomes
        except sqlite3.Error as exc:
            log.warning("cannot read the history %s: %s", self.path, exc)
            return None, [], [], []
        finally:
            conn.close()


def since(**delta: float) -> str:
    """The ISO time `delta` ago, to compare with the stored times."""
    return (datetime.now(timezone.utc) - timedelta(**delta)).replace(microsecond=0).isoformat()


def timestamp(iso: str | None) -> float | None:
    """A stored time as seconds since the epoch; None for none."""
    return datetime.fromisoformat(iso).timestamp() if iso else None
