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
from typing import Any, Callable, ContextManager, Iterable, Protocol, Sequence, Sized

from esmail.logs import counted

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
    check: str | None = None  # a CSV's report (DESIGN §16) as JSON: what the importer will make of it


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
    """What the shared SQL needs of a connection: statements with `?` placeholders, and a pipeline (statements sent
    without waiting for each answer, where the backend has one)."""

    def run(self, sql: str, args: Sequence[Any] = ()) -> Any: ...

    def run_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def pipeline(self) -> ContextManager: ...


_MESSAGE_COLUMNS = ("id", "host", "received", "origin", "client", "helo", "mail_from", "header_from", "subject", "date", "size",
                    "authentication", "state", "reason", "attempts", "seconds", "finished")
_FILE_COLUMNS = ("id", "prefix", "role", "name", "kind", "rule", "bucket", "key", "bytes", "reason", "check_report")


def marks(values: Sized) -> str:
    """`?, ?, ?` for an IN list of `values`."""
    return ", ".join("?" * len(values))


def write_finished(db: Db, rows: list[tuple[Finished, str, str]]) -> None:
    """Outcomes (each with the host it happened on and its event) into the tables, in the caller's transaction, as if
    written one after the other — but a table at a time, each statement prepared once for all its rows and sent
    without waiting for the one before (a round trip to a database server costs more than the row). Each is written once: an event seen before is skipped (the journal may hand a row
    over twice: a crash between the database's commit and the journal's)."""
    events = [event for _, _, event in rows]
    seen = {row["event"] for row in db.run(f"SELECT event FROM outcomes WHERE event IN ({marks(events)})", events).fetchall()}
    rows = [row for row in rows if row[2] not in seen]
    if not rows:
        return
    ids = list({item.id: None for item, _, _ in rows})
    states = {row["id"]: row["state"] for row in db.run(f"SELECT id, state FROM messages WHERE id IN ({marks(ids)})", ids).fetchall()}
    messages: dict[str, tuple] = {}  # the last outcome of each message is its row
    outcomes: list[tuple] = []
    files = {entry_id: _Files() for entry_id in ids}
    message_prefixes: dict[tuple[str, str], tuple] = {}
    prefixes: dict[str, _Prefix] = {}
    for item, host, event in rows:
        previous = states.get(item.id)
        outcome = RETRIED if item.outcome == STORED and previous == FAILED else item.outcome
        state = states[item.id] = STORED if outcome in (RELEASED, RETRIED) else outcome
        messages[item.id] = (item.id, host, item.received, item.origin, item.client, item.helo, item.mail_from, item.header_from,
                             item.subject, item.date, item.size, item.authentication, state, item.reason, item.attempts, item.seconds,
                             item.at)
        outcomes.append((item.id, item.at, outcome, item.reason, item.attempts, item.seconds, event))
        files[item.id].add(item, released=outcome == RELEASED)
        for prefix, prefix_state in item.prefixes.items():
            csvs = sum(1 for f in item.files if f.prefix == prefix and f.role == "amr_data")
            unprocessable = sum(1 for f in item.files if f.prefix == prefix and f.role == "unprocessable")
            message_prefixes[item.id, prefix] = (item.id, prefix, item.received, prefix_state, csvs, unprocessable)
            prefixes.setdefault(prefix, _Prefix(prefix)).add(item.received, unprocessable, csvs)
    with db.pipeline():
        _insert(db, "messages", _MESSAGE_COLUMNS, list(messages.values()), "ON CONFLICT (id) DO UPDATE SET " +
                ", ".join(f"{c} = excluded.{c}" for c in _MESSAGE_COLUMNS[1:]))
        _insert(db, "outcomes", ("id", "at", "outcome", "reason", "attempts", "seconds", "event"), outcomes)
        replaced = [entry_id for entry_id, kept in files.items() if kept.everything]
        if replaced:
            db.run(f"DELETE FROM files WHERE id IN ({marks(replaced)})", replaced)
        for entry_id, kept in files.items():
            if not kept.everything and kept.prefixes:
                db.run(f"DELETE FROM files WHERE id = ? AND prefix IN ({marks(kept.prefixes)})", (entry_id, *kept.prefixes))
        _insert(db, "files", _FILE_COLUMNS, [row for kept in files.values() for row in kept.rows])
        _insert(db, "message_prefixes", ("id", "prefix", "received", "state", "csvs", "unprocessable"), list(message_prefixes.values()),
                "ON CONFLICT (id, prefix) DO UPDATE SET received = excluded.received, state = excluded.state, "
                "csvs = excluded.csvs, unprocessable = excluded.unprocessable")
        _insert(db, "prefixes", ("prefix", "last_message", "last_unprocessable", "last_csv"), [p.row() for p in prefixes.values()],
                "ON CONFLICT (prefix) DO UPDATE SET "
                "last_unprocessable = CASE WHEN prefixes.last_message IS NULL OR prefixes.last_message <= excluded.last_message "
                "THEN excluded.last_unprocessable ELSE prefixes.last_unprocessable END, "
                "last_message = CASE WHEN prefixes.last_message IS NULL OR prefixes.last_message <= excluded.last_message "
                "THEN excluded.last_message ELSE prefixes.last_message END, "
                "last_csv = CASE WHEN excluded.last_csv IS NOT NULL AND (prefixes.last_csv IS NULL OR prefixes.last_csv < excluded.last_csv) "
                "THEN excluded.last_csv ELSE prefixes.last_csv END")


def _insert(db: Db, table: str, columns: Sequence[str], rows: list[tuple], conflict: str = "") -> None:
    """Rows into a table: one statement, prepared once, for all of them."""
    if rows:
        db.run_many(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks(columns)}) {conflict}", rows)


class _Files:
    """A message's file rows after its outcomes in a batch, one after the other: each outcome replaces them all,
    but a release only those of the prefixes it releases (the inbox copies stored before stay)."""

    def __init__(self):
        self.everything = False  # the database's rows of this message all go
        self.prefixes: set[str] = set()  # else those of these prefixes
        self.rows: list[tuple] = []

    def add(self, item: Finished, released: bool) -> None:
        if released:
            self.prefixes |= set(item.prefixes)
            self.rows = [row for row in self.rows if row[1] not in item.prefixes]
        else:
            self.everything, self.rows = True, []
        self.rows += [(item.id, f.prefix, f.role, f.name, f.kind, f.rule, f.bucket, f.key, f.bytes, f.reason, f.check) for f in item.files]


class _Prefix:
    """A prefix's summary after a batch: its latest message (a later one of the same second wins), its latest CSV."""

    def __init__(self, prefix: str):
        self.prefix, self.last_message, self.unprocessable, self.last_csv = prefix, "", 0, None

    def add(self, received: str, unprocessable: int, csvs: int) -> None:
        if received >= self.last_message:
            self.last_message, self.unprocessable = received, unprocessable
        if csvs and (self.last_csv is None or received > self.last_csv):
            self.last_csv = received

    def row(self) -> tuple:
        return self.prefix, self.last_message, self.unprocessable, self.last_csv


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
        log.info("history: forgot %s received over %g days ago ([history] keep_days)", counted(pruned, "message"), keep_days)


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

    def recent_checks(self, since: str) -> list[dict]:
        """prefix, check_report and received of each CSV received since `since` that has a report (DESIGN §16), oldest first."""
        return self._rows(None, "SELECT f.prefix, f.check_report, m.received FROM files f JOIN messages m ON m.id = f.id "
                                "WHERE f.role = 'amr_data' AND f.check_report IS NOT NULL AND m.received >= ? "
                                f"ORDER BY m.received, f.{self.SEQ}", since)

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
        """Every host whose messages the history holds: the index walked from one name to the next, not every row read."""
        return [row["host"] for row in self._rows(("hosts",), (
            "WITH RECURSIVE hosts(host) AS (SELECT min(host) FROM messages WHERE host > '' UNION ALL "
            "SELECT (SELECT min(host) FROM messages WHERE host > hosts.host) FROM hosts WHERE hosts.host IS NOT NULL) "
            "SELECT host FROM hosts WHERE host IS NOT NULL"))]


def since(**delta: float) -> str:
    """The ISO time `delta` ago, to compare with the stored times."""
    return (datetime.now(timezone.utc) - timedelta(**delta)).replace(microsecond=0).isoformat()


def timestamp(iso: str | None) -> float | None:
    """A stored time as seconds since the epoch; None for none."""
    return datetime.fromisoformat(iso).timestamp() if iso else None
