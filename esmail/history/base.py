"""The history interface, and what every backend shares: the records, the tables' meaning and the queries.

A backend supplies a connection (`_read`, and its writer's own) through a
small adapter (`Db`: one `run` with `?` placeholders) and its dialect's few
words (`SEQ`, `LIKE`); the SQL that writes a finished message and the SQL
that the page reads are written once, here.
"""

from __future__ import annotations

import logging
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Protocol, Sequence

log = logging.getLogger("esmail.history")

PAGE = 50  # messages a page

# The outcomes a message can have; its state is the last one, with released and retried counted as stored.
STORED, QUARANTINED, FAILED, RELEASED, RETRIED = "stored", "quarantined", "failed", "released", "retried"
QUEUED = "queued"  # not an outcome: a message still in the spool's queue
STATES = (QUEUED, STORED, QUARANTINED, FAILED)


def now_text() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


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
    """One outcome of one message, as the worker saw it (`at`: when; the database may hear of it later)."""

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
    at: str = field(default_factory=now_text)

    def to_json(self) -> dict:
        """As a journal line holds it (journal.py)."""
        return {**vars(self), "files": [vars(f) for f in self.files]}

    @classmethod
    def from_json(cls, data: dict) -> "Finished":
        return cls(**{**data, "files": [FileRow(**f) for f in data.get("files", ())]})


class Db(Protocol):
    """What the shared SQL needs of a connection: `run(sql, args)` with `?` placeholders, returning a cursor."""

    def run(self, sql: str, args: Sequence[Any] = ()) -> Any: ...


_MESSAGE_COLUMNS = ("id", "host", "received", "origin", "client", "helo", "mail_from", "header_from", "subject", "date", "size",
                    "authentication", "state", "reason", "attempts", "seconds", "finished")


def write_finished(db: Db, item: Finished, host: str, event: str) -> None:
    """One outcome into the tables, in the caller's transaction. Written once: an `event` seen before is skipped
    (the journal may hand the same row over twice: a crash between the database's commit and the journal's)."""
    if db.run("SELECT 1 FROM outcomes WHERE event = ?", (event,)).fetchone():
        return
    previous = db.run("SELECT state FROM messages WHERE id = ?", (item.id,)).fetchone()
    outcome = RETRIED if item.outcome == STORED and previous is not None and previous["state"] == FAILED else item.outcome
    state = STORED if outcome in (RELEASED, RETRIED) else outcome
    values = (item.id, host, item.received, item.origin, item.client, item.helo, item.mail_from, item.header_from, item.subject,
              item.date, item.size, item.authentication, state, item.reason, item.attempts, item.seconds, item.at)
    db.run(f"INSERT INTO messages ({', '.join(_MESSAGE_COLUMNS)}) VALUES ({', '.join('?' * len(values))}) "
           f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _MESSAGE_COLUMNS[1:])}", values)
    db.run("INSERT INTO outcomes (id, at, outcome, reason, attempts, seconds, event) VALUES (?, ?, ?, ?, ?, ?, ?)",
           (item.id, item.at, outcome, item.reason, item.attempts, item.seconds, event))
    if outcome == RELEASED:  # the files stored before (the inbox copy) stay; the released prefixes get theirs
        db.run(f"DELETE FROM files WHERE id = ? AND prefix IN ({', '.join('?' * len(item.prefixes))})", (item.id, *item.prefixes))
    else:
        db.run("DELETE FROM files WHERE id = ?", (item.id,))
    for f in item.files:
        db.run("INSERT INTO files (id, prefix, role, name, kind, rule, bucket, key, bytes, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (item.id, f.prefix, f.role, f.name, f.kind, f.rule, f.bucket, f.key, f.bytes, f.reason))
    for prefix, prefix_state in item.prefixes.items():
        csvs = sum(1 for f in item.files if f.prefix == prefix and f.role == "amr_data")
        unprocessable = sum(1 for f in item.files if f.prefix == prefix and f.role == "unprocessable")
        db.run("DELETE FROM message_prefixes WHERE id = ? AND prefix = ?", (item.id, prefix))
        db.run("INSERT INTO message_prefixes (id, prefix, received, state, csvs, unprocessable) VALUES (?, ?, ?, ?, ?, ?)",
               (item.id, prefix, item.received, prefix_state, csvs, unprocessable))
        db.run("INSERT INTO prefixes (prefix) VALUES (?) ON CONFLICT DO NOTHING", (prefix,))
        db.run("UPDATE prefixes SET last_unprocessable = ?, last_message = ? WHERE prefix = ? "
               "AND (last_message IS NULL OR last_message <= ?)", (unprocessable, item.received, prefix, item.received))
        if csvs:
            db.run("UPDATE prefixes SET last_csv = ? WHERE prefix = ? AND (last_csv IS NULL OR last_csv < ?)",
                   (item.received, prefix, item.received))


def write_declared(db: Db, prefixes: Iterable[str], at: str) -> None:
    """Remember when each feed was first declared (a feed that never received anything is late from then)."""
    for prefix in prefixes:
        db.run("INSERT INTO prefixes (prefix, first_declared) VALUES (?, ?) "
               "ON CONFLICT (prefix) DO UPDATE SET first_declared = coalesce(prefixes.first_declared, excluded.first_declared)",
               (prefix, at))


def write_pruned(db: Db, keep_days: float) -> None:
    """Forget messages received more than `keep_days` ago ([history] keep_days), and say how many."""
    cutoff = (datetime.now(timezone.utc) - timedelta(days=keep_days)).isoformat()
    old = "SELECT id FROM messages WHERE received < ?"
    for table in ("files", "outcomes", "message_prefixes"):
        db.run(f"DELETE FROM {table} WHERE id IN ({old})", (cutoff,))
    if pruned := db.run("DELETE FROM messages WHERE received < ?", (cutoff,)).rowcount:
        log.info("history: forgot %d message%s received over %g days ago ([history] keep_days)", pruned, "" if pruned == 1 else "s", keep_days)


def write_late(db: Db, prefix: str, since: str, host: str) -> bool:
    """Record that a feed is late; True for the host that recorded it first (it reports; the others stay quiet)."""
    return db.run("INSERT INTO late_feeds (prefix, since, host) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (prefix, since, host)).rowcount == 1


def write_on_time(db: Db, prefix: str) -> bool:
    """Forget a feed's lateness; True for the host that forgot it (it says the feed is on time again)."""
    return db.run("DELETE FROM late_feeds WHERE prefix = ?", (prefix,)).rowcount == 1


def write_request(db: Db, entry_id: str, host: str, action: str, by: str, from_host: str) -> bool:
    """Ask `host`, which holds the entry in its spool, to retry or release it."""
    db.run("INSERT INTO actions (id, host, action, by, requested, requested_from) VALUES (?, ?, ?, ?, ?, ?)",
           (entry_id, host, action, by, now_text(), from_host))
    return True


def write_done(db: Db, seq: int, outcome: str) -> None:
    db.run("UPDATE actions SET done = ?, outcome = ? WHERE seq = ?", (now_text(), outcome, seq))


class History(ABC):
    """What the worker writes and the page reads. Writing never raises and never holds a message up;
    reading answers empty (and logs) when the history cannot be read."""

    SEQ = "rowid"  # the column that orders rows as they were written
    LIKE = "LIKE"  # case-insensitive LIKE
    shared = False  # True: other hosts write here too (their messages are listed; actions on them are requests)

    def __init__(self, host: str):
        self.host = host

    # --- writing -----------------------------------------------------------------

    @abstractmethod
    async def record(self, finished: Finished) -> None:
        """Keep one outcome of one message."""

    @abstractmethod
    async def declare(self, prefixes: list[str]) -> None:
        """Remember when each feed was first declared."""

    @abstractmethod
    async def prune(self, keep_days: float) -> None:
        """Forget messages received more than `keep_days` ago."""

    @abstractmethod
    def close(self) -> None:
        """Write what waits (or keep it for the next start) and let go of connections."""

    @abstractmethod
    async def _decide(self, write: Callable, *args) -> Any:
        """`write(db, *args)` in a transaction, now, for its answer; None when the history cannot be written now."""

    async def mark_late(self, prefix: str, since: str) -> bool | None:
        """Record a feed's lateness: True when this host is the first to (it reports), None when it cannot be said now."""
        return await self._decide(write_late, prefix, since, self.host)

    async def mark_on_time(self, prefix: str) -> bool | None:
        """Forget a feed's lateness: True when this host is the one that did (it says so)."""
        return await self._decide(write_on_time, prefix)

    async def request(self, entry_id: str, host: str, action: str, by: str) -> bool:
        """Ask another host to retry or release an entry its spool holds; False when the request cannot be written now."""
        return await self._decide(write_request, entry_id, host, action, by, self.host) is not None

    async def done(self, seq: int, outcome: str) -> None:
        """Say what came of a request this host was asked."""
        await self._decide(write_done, seq, outcome)

    def requests(self) -> list[dict]:
        """Requests for this host that wait, oldest first."""
        return self._rows(None, f"SELECT * FROM actions WHERE host = ? AND done IS NULL ORDER BY {self.SEQ}", self.host)

    def actions(self, entry_id: str) -> list[dict]:
        """Every request made about a message, oldest first, with its outcome once the host that holds it acted."""
        return self._rows(None, f"SELECT * FROM actions WHERE id = ? ORDER BY {self.SEQ}", entry_id)

    def watch_requests(self, wake: Callable[[], None]) -> None:
        """Call `wake()` (from another thread) whenever another host may have asked something of this one."""

    @staticmethod
    def new_event() -> str:
        """The identity of one outcome as written: a row handed over twice is written once."""
        return uuid.uuid4().hex

    # --- health --------------------------------------------------------------------

    def backlog(self) -> int:
        """Rows that wait to be written (0: the history is up to date)."""
        return 0

    def problem(self) -> str | None:
        """Why the history cannot be written now, for /healthz and the page; None when it can."""
        return None

    # --- reading (blocking: the page calls these in a thread) --------------------------

    @abstractmethod
    def _read(self, function: Callable[[Db], Any], key: tuple) -> Any:
        """`function(db)` on a reading connection; None when the history cannot be read (logged).
        `key` names the question, for a backend that answers from what it last read while its database is away
        (None: a question whose old answer is no answer)."""

    def _rows(self, key: tuple, sql: str, *args) -> list:
        return self._read(lambda db: [dict(row) for row in db.run(sql, args).fetchall()], key) or []

    def prefixes(self) -> dict[str, Any]:
        return {row["prefix"]: row for row in self._rows(("prefixes",), "SELECT * FROM prefixes")}

    def counts_since(self, since: str) -> dict[str, int]:
        """Messages per prefix received since `since`."""
        rows = self._rows(("counts_since",), "SELECT prefix, COUNT(*) AS n FROM message_prefixes WHERE received >= ? GROUP BY prefix",
                          since)
        return {row["prefix"]: row["n"] for row in rows}

    def totals_since(self, since: str) -> dict[str, int]:
        rows = self._rows(("totals_since",), "SELECT state, COUNT(*) AS n FROM messages WHERE received >= ? GROUP BY state", since)
        return {row["state"]: row["n"] for row in rows}

    def per_day(self, days: int) -> dict[str, dict[str, int]]:
        """UTC day → state → messages, for the last `days` days."""
        start = (datetime.now(timezone.utc) - timedelta(days=days - 1)).strftime("%Y-%m-%d")
        rows = self._rows(("per_day", days), "SELECT substr(received, 1, 10) AS day, state, COUNT(*) AS n FROM messages "
                          "WHERE received >= ? GROUP BY substr(received, 1, 10), state", start)
        found: dict[str, dict[str, int]] = {}
        for row in rows:
            found.setdefault(row["day"], {})[row["state"]] = row["n"]
        return found

    def messages(self, prefix: str = "", state: str = "", text: str = "", page: int = 1, host: str = "") -> tuple[list[dict], bool]:
        """A page of messages, newest first (each with its `prefix_list`), and whether there is a next page."""
        where, args = [], []
        if host:
            where.append("host = ?")
            args.append(host)
        if prefix:
            where.append("id IN (SELECT id FROM message_prefixes WHERE prefix = ?)")
            args.append(prefix)
        if state:
            where.append("state = ?")
            args.append(state)
        if text:
            like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            match = f"{self.LIKE} ? ESCAPE '\\'"
            where.append(f"(header_from {match} OR subject {match} OR mail_from {match} "
                         f"OR id IN (SELECT id FROM files WHERE name {match}))")
            args += [like] * 4
        sql = ("SELECT * FROM messages" + (" WHERE " + " AND ".join(where) if where else "") +
               f" ORDER BY received DESC, {self.SEQ} DESC LIMIT ? OFFSET ?")  # within a second: the order they were written in

        def read(db: Db) -> list[dict]:
            rows = [dict(row) for row in db.run(sql, (*args, PAGE + 1, (max(page, 1) - 1) * PAGE)).fetchall()]
            ids = [row["id"] for row in rows]
            listed: dict[str, list[str]] = {}
            if ids:
                for row in db.run(f"SELECT id, prefix FROM message_prefixes WHERE id IN ({', '.join('?' * len(ids))}) "
                                  f"ORDER BY {self.SEQ}", ids).fetchall():
                    listed.setdefault(row["id"], []).append(row["prefix"])
            return [{**row, "prefix_list": ",".join(listed.get(row["id"], []))} for row in rows]

        rows = self._read(read, ("messages", prefix, state, text, page, host)) or []
        return rows[:PAGE], len(rows) > PAGE

    def message(self, entry_id: str) -> tuple[Any, list, list, list]:
        """A message, its prefixes, its files and its outcomes (oldest first)."""
        def read(db: Db):
            row = db.run("SELECT * FROM messages WHERE id = ?", (entry_id,)).fetchone()
            return (dict(row) if row else None, *([dict(r) for r in db.run(sql, (entry_id,)).fetchall()] for sql in (
                "SELECT * FROM message_prefixes WHERE id = ? ORDER BY prefix",
                f"SELECT * FROM files WHERE id = ? ORDER BY {self.SEQ}",
                f"SELECT * FROM outcomes WHERE id = ? ORDER BY {self.SEQ}")))

        return self._read(read, ("message", entry_id)) or (None, [], [], [])

    def hosts(self) -> list[str]:
        """Every host whose messages the history holds."""
        return [row["host"] for row in self._rows(("hosts",), "SELECT DISTINCT host FROM messages WHERE host <> '' ORDER BY host")]


def since(**delta: float) -> str:
    """The ISO time `delta` ago, to compare with the stored times."""
    return (datetime.now(timezone.utc) - timedelta(**delta)).replace(microsecond=0).isoformat()


def timestamp(iso: str | None) -> float | None:
    """A stored time as seconds since the epoch; None for none."""
    return datetime.fromisoformat(iso).timestamp() if iso else None
