"""The history interface, and what every backend shares: the records, the tables' meaning and the queries.

A backend supplies a connection (`_read`, and its writer's own) through a
small adapter (`Db`: one `run` with `?` placeholders) and its dialect's few
words (`SEQ`, `LIKE`); the SQL that writes a finished message and the SQL
that the page reads are written once, here.
"""

from __future__ import annotations

import json
import logging
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, ContextManager, Iterable, NamedTuple, Protocol, Sequence, Sized

from esmail.logs import counted

log = logging.getLogger("esmail.history")

PAGE = 50  # messages a page

# The outcomes a message can have; its state is the last one, with released and retried counted as stored.
STORED, QUARANTINED, FAILED, RELEASED, RETRIED = "stored", "quarantined", "failed", "released", "retried"
DROPPED = "dropped"  # a quarantined entry deleted after [spool] quarantine_days, never released
QUEUED = "queued"  # not an outcome: a message still in the spool's queue
STATES = (QUEUED, STORED, QUARANTINED, FAILED, DROPPED)
WAITING = (QUEUED, FAILED, QUARANTINED)  # the states of entries a spool holds: its folders say, not the history
URGENCY = (FAILED, QUARANTINED, QUEUED, DROPPED, STORED)  # a message's state on the list: the first one of its feeds' states
FILES = ("unprocessable", "none")  # ?files=: at least one unprocessable file; nothing but the raw message


def urgency(state: str) -> int:
    """Failed, quarantined, queued, dropped, stored: what needs a human first."""
    return URGENCY.index(state) if state in URGENCY else len(URGENCY)


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
class Attached:
    """A file as the message carried it, before any conversion (a zip, not the CSVs in it)."""

    name: str
    bytes: int


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
    by: str = ""  # who had it retried or released (the page's user name, `local` without a password); "" for the worker alone
    tries: list[dict] = field(default_factory=list)  # each failed attempt before this outcome: {"at", "step", "error", "stored"}
    attachments: list[Attached] = field(default_factory=list)  # as received; empty when the message was not taken apart

    def to_json(self) -> dict:
        """As a journal line holds it (journal.py)."""
        return {**vars(self), "files": [vars(f) for f in self.files], "attachments": [vars(a) for a in self.attachments]}

    @classmethod
    def from_json(cls, data: dict) -> "Finished":
        return cls(**{**data, "files": [FileRow(**f) for f in data.get("files", ())],
                      "attachments": [Attached(**a) for a in data.get("attachments", ())]})


@dataclass(frozen=True)
class Filters:
    """What the messages list is narrowed to (GET /messages, /api/messages), and which page of it."""

    prefix: str = ""
    state: str = ""  # one of STATES: a message is listed under every state one of its feeds is in
    text: str = ""  # in From, MAIL FROM, Subject, a stored file's name or an attachment's name as sent
    files: str = ""  # one of FILES
    host: str = ""
    days: int = 0  # received in the last `days` × 24 hours; 0: whenever
    page: int = 1

    def query(self, **changes) -> str:
        """The URL query that lists these filters (with `changes`), for links."""
        from urllib.parse import urlencode

        values = {**vars(self), **changes}
        return urlencode({k: v for k, v in values.items() if v and not (k == "page" and v == 1)})


class Record(NamedTuple):
    """One message as the history has it, for its page."""

    row: Any  # the messages row; None when the history does not know the message
    prefixes: list[dict]
    files: list[dict]  # the objects of its latest outcome (a release's beside those of the feeds it did not release)
    outcomes: list[dict]  # oldest first
    attachments: list[dict]  # as received
    left_behind: list[dict]  # objects earlier outcomes stored that the latest did not store again (a failure's copy in unprocessable)


class Db(Protocol):
    """What the shared SQL needs of a connection: statements with `?` placeholders, and a pipeline (statements sent
    without waiting for each answer, where the backend has one)."""

    def run(self, sql: str, args: Sequence[Any] = ()) -> Any: ...

    def run_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def pipeline(self) -> ContextManager: ...


# One schema step, the same SQL in both backends (SQLite's 4, PostgreSQL's 3): each outcome keeps who asked for it, the
# feeds it covered and every failed attempt before it; objects are kept per outcome (their event); attachments as sent;
# the few feeds' states that wait for a human (other hosts' failed and quarantined entries) found without a scan.
OUTCOMES_IN_DETAIL = """
ALTER TABLE outcomes ADD COLUMN by TEXT NOT NULL DEFAULT '';
ALTER TABLE outcomes ADD COLUMN prefixes TEXT;
ALTER TABLE outcomes ADD COLUMN tries TEXT NOT NULL DEFAULT '[]';
ALTER TABLE files ADD COLUMN event TEXT;
CREATE TABLE attachments (id TEXT NOT NULL, n INTEGER NOT NULL, name TEXT NOT NULL, bytes BIGINT, PRIMARY KEY (id, n));
CREATE INDEX message_prefixes_waiting ON message_prefixes (state) WHERE state IN ('failed', 'quarantined');
CREATE INDEX messages_by_time_and_id ON messages (received, id);
"""

_MESSAGE_COLUMNS = ("id", "host", "received", "origin", "client", "helo", "mail_from", "header_from", "subject", "date", "size",
                    "authentication", "state", "reason", "attempts", "seconds", "finished")
_FILE_COLUMNS = ("id", "prefix", "role", "name", "kind", "rule", "bucket", "key", "bytes", "reason", "check_report", "event")
_OUTCOME_COLUMNS = ("id", "at", "outcome", "reason", "attempts", "seconds", "event", "by", "prefixes", "tries")


def marks(values: Sized) -> str:
    """`?, ?, ?` for an IN list of `values`."""
    return ", ".join("?" * len(values))


def write_finished(db: Db, rows: list[tuple[Finished, str, str]]) -> None:
    """Outcomes (each with the host it happened on and its event) into the tables, in the caller's transaction, as if
    written one after the other — but a table at a time, each statement prepared once for all its rows and sent
    without waiting for the one before (a round trip to a database server costs more than the row). Each is written
    once: an event seen before is skipped (the journal may hand a row over twice: a crash between the database's commit
    and the journal's). Every outcome's objects are kept with its event; the page works out which are current."""
    events = [event for _, _, event in rows]
    seen = {row["event"] for row in db.run(f"SELECT event FROM outcomes WHERE event IN ({marks(events)})", events).fetchall()}
    rows = [row for row in rows if row[2] not in seen]
    if not rows:
        return
    ids = list({item.id: None for item, _, _ in rows})
    states = {row["id"]: row["state"] for row in db.run(f"SELECT id, state FROM messages WHERE id IN ({marks(ids)})", ids).fetchall()}
    messages: dict[str, tuple] = {}  # the last outcome of each message is its row
    outcomes: list[tuple] = []
    files: list[tuple] = []
    attachments: dict[str, list[Attached]] = {}  # the last list of each message that has one
    message_prefixes: dict[tuple[str, str], tuple] = {}
    prefixes: dict[str, _Prefix] = {}
    for item, host, event in rows:
        previous = states.get(item.id)
        outcome = RETRIED if item.outcome == STORED and previous == FAILED else item.outcome
        # a message's state: its most urgent feed's (quarantined for one feed and stored for another is quarantined)
        state = states[item.id] = STORED if outcome in (RELEASED, RETRIED) else min(item.prefixes.values(), key=urgency)
        messages[item.id] = (item.id, host, item.received, item.origin, item.client, item.helo, item.mail_from, item.header_from,
                             item.subject, item.date, item.size, item.authentication, state, item.reason, item.attempts, item.seconds,
                             item.at)
        outcomes.append((item.id, item.at, outcome, item.reason, item.attempts, item.seconds, event, item.by,
                         json.dumps(item.prefixes), json.dumps(item.tries)))
        files += [(item.id, f.prefix, f.role, f.name, f.kind, f.rule, f.bucket, f.key, f.bytes, f.reason, f.check, event)
                  for f in item.files]
        if item.attachments:
            attachments[item.id] = item.attachments
        for prefix, prefix_state in item.prefixes.items():
            csvs = sum(1 for f in item.files if f.prefix == prefix and f.role == "amr_data")
            # a failure's raw copy in unprocessable is esmail's trouble, not a file the feed sent that cannot be read
            unprocessable = 0 if prefix_state == FAILED else sum(1 for f in item.files if f.prefix == prefix and f.role == "unprocessable")
            message_prefixes[item.id, prefix] = (item.id, prefix, item.received, prefix_state, csvs, unprocessable)
            prefixes.setdefault(prefix, _Prefix(prefix)).add(item.received, unprocessable, csvs)
    with db.pipeline():
        _insert(db, "messages", _MESSAGE_COLUMNS, list(messages.values()), "ON CONFLICT (id) DO UPDATE SET " +
                ", ".join(f"{c} = excluded.{c}" for c in _MESSAGE_COLUMNS[1:]))
        _insert(db, "outcomes", _OUTCOME_COLUMNS, outcomes)
        _insert(db, "files", _FILE_COLUMNS, files)
        if attachments:
            db.run(f"DELETE FROM attachments WHERE id IN ({marks(attachments)})", list(attachments))
            _insert(db, "attachments", ("id", "n", "name", "bytes"),
                    [(entry_id, n, a.name, a.bytes) for entry_id, found in attachments.items() for n, a in enumerate(found)])
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


def write_dropped(db: Db, entry_id: str, prefixes: list[str], reason: str, at: str, event: str) -> None:
    """A quarantined entry deleted from the spool unreleased: its feeds' state is `dropped` (it waits for no one now)."""
    if db.run("SELECT 1 FROM outcomes WHERE event = ?", (event,)).fetchone():
        return
    db.run(f"INSERT INTO outcomes ({', '.join(_OUTCOME_COLUMNS)}) VALUES ({marks(_OUTCOME_COLUMNS)})",
           (entry_id, at, DROPPED, reason, 0, 0.0, event, "", json.dumps(dict.fromkeys(prefixes, DROPPED)), "[]"))
    db.run(f"UPDATE message_prefixes SET state = ? WHERE id = ? AND state = ? AND prefix IN ({marks(prefixes)})",
           (DROPPED, entry_id, QUARANTINED, *prefixes))
    db.run("UPDATE messages SET state = ? WHERE id = ? AND state = ?", (DROPPED, entry_id, QUARANTINED))


def write_pruned(db: Db, keep_days: float) -> None:
    """Forget messages received more than `keep_days` ago ([history] keep_days), and say how many."""
    cutoff = (datetime.now(timezone.utc) - timedelta(days=keep_days)).isoformat()
    old = "SELECT id FROM messages WHERE received < ?"
    for table in ("files", "outcomes", "message_prefixes", "attachments"):
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
    async def dropped(self, entry_id: str, prefixes: list[str], reason: str) -> None:
        """Keep that a quarantined entry was deleted unreleased (after [spool] quarantine_days)."""

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

    def last_checks(self) -> list[dict]:
        """The reports of each prefix's CSVs in its latest message that stored any (`prefixes.last_csv`, by the index on
        message_prefixes): prefix, id, received, name, bucket, key, check_report — in the order they were written."""
        return self._rows(("last_checks",), "SELECT f.prefix, f.id, mp.received, f.name, f.bucket, f.key, f.check_report "
                          "FROM prefixes p JOIN message_prefixes mp ON mp.prefix = p.prefix AND mp.received = p.last_csv "
                          "JOIN files f ON f.id = mp.id AND f.prefix = p.prefix "
                          f"WHERE f.role = 'amr_data' AND f.check_report IS NOT NULL ORDER BY f.{self.SEQ}")

    def counts_since(self, since: str) -> dict[str, int]:
        """Messages per prefix received since `since` (the rows of `?prefix=…&days=…`)."""
        rows = self._rows(("counts_since",), "SELECT prefix, COUNT(*) AS n FROM message_prefixes WHERE received >= ? "
                          "GROUP BY prefix", since)
        return {row["prefix"]: row["n"] for row in rows}

    def unprocessable_since(self, since: str) -> dict[str, dict[str, int]]:
        """Per prefix, its messages received since `since` with unprocessable files (the rows of
        `?prefix=…&files=unprocessable&days=…`), and how many files those are."""
        rows = self._rows(("unprocessable_since",), "SELECT prefix, COUNT(*) AS messages, SUM(unprocessable) AS files "
                          "FROM message_prefixes WHERE received >= ? AND unprocessable > 0 GROUP BY prefix", since)
        return {row["prefix"]: {"messages": row["messages"], "files": int(row["files"])} for row in rows}

    def per_day(self, days: int) -> dict[str, dict[str, int]]:
        """UTC day → state → messages, for the last `days` days; each message once, by its state (its most urgent
        feed's: failed, then quarantined — a dropped one was quarantined —, else stored)."""
        start = (datetime.now(timezone.utc) - timedelta(days=days - 1)).strftime("%Y-%m-%d")
        rows = self._rows(("per_day", days), "SELECT substr(received, 1, 10) AS day, state, COUNT(*) AS n FROM messages "
                          "WHERE received >= ? GROUP BY substr(received, 1, 10), state", start)
        found: dict[str, dict[str, int]] = {}
        for row in rows:
            state = {DROPPED: QUARANTINED}.get(row["state"], row["state"])
            day = found.setdefault(row["day"], {})
            day[state] = day.get(state, 0) + row["n"]
        return found

    def _where(self, filters: Filters, by_state: bool = True) -> tuple[list[str], list]:
        """The SQL conditions on `messages` for `filters` (the state too, unless `by_state` is False)."""
        where, args, feed, feed_args = [], [], [], []
        if filters.host:
            where.append("host = ?")
            args.append(filters.host)
        if filters.days:
            where.append("received >= ?")
            args.append(since(days=filters.days))
        if filters.prefix:
            feed.append("prefix = ?")
            feed_args.append(filters.prefix)
        if by_state and filters.state:
            feed.append("state = ?")
            feed_args.append(filters.state)
        if filters.files == "unprocessable":
            feed.append("unprocessable > 0")
        elif filters.files == "none":  # stored, and nothing came of it but the raw message
            feed.append(f"state = '{STORED}' AND csvs = 0 AND unprocessable = 0")
            if not filters.prefix:  # for none of its feeds
                where.append("id NOT IN (SELECT id FROM message_prefixes WHERE csvs > 0 OR unprocessable > 0)")
        if feed and filters.prefix:  # a feed's few rows, by its index
            where.append(f"id IN (SELECT id FROM message_prefixes WHERE {' AND '.join(feed)})")
            args += feed_args
        elif feed:  # each message's own rows, by its key (a state or the files alone select too many to gather first)
            where.append(f"EXISTS (SELECT 1 FROM message_prefixes p WHERE p.id = messages.id AND {' AND '.join(feed)})")
            args += feed_args
        if filters.text:
            like = "%" + filters.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            match = f"{self.LIKE} ? ESCAPE '\\'"
            where.append(f"(header_from {match} OR subject {match} OR mail_from {match} "
                         f"OR id IN (SELECT id FROM files WHERE name {match}) OR id IN (SELECT id FROM attachments WHERE name {match}))")
            args += [like] * 5
        return where, args

    def messages(self, filters: Filters = Filters()) -> tuple[list[dict], int]:
        """A page of the messages `filters` select, newest first (those of one second in the order they arrived),
        each with its feeds (`feeds`: prefix → state, CSVs, unprocessable files); and how many they select in all."""
        where, args = self._where(filters)
        sql = f"SELECT * FROM messages{_conditions(where)} ORDER BY received DESC, id DESC LIMIT ? OFFSET ?"

        def read(db: Db) -> tuple[list[dict], int]:
            skipped = (max(filters.page, 1) - 1) * PAGE
            rows = [dict(row) for row in db.run(sql, (*args, PAGE, skipped)).fetchall()]
            last = 0 < len(rows) < PAGE or (not rows and not skipped)  # the list ends on this page: no need to count it
            return _with_feeds(db, rows, self.SEQ), skipped + len(rows) if last else self._count(db, filters)

        return self._read(read, ("messages", filters)) or ([], 0)

    def count(self, filters: Filters) -> int:
        """How many messages `filters` select (the total `messages` gives with them)."""
        return self._read(lambda db: self._count(db, filters), ("count", filters)) or 0

    def _count(self, db: Db, filters: Filters) -> int:
        where, args = self._where(filters)
        return db.run(f"SELECT COUNT(*) AS n FROM messages{_conditions(where)}", args).fetchone()["n"]

    def matching(self, filters: Filters, ids: list[str]) -> tuple[set[str], set[str]]:
        """Of `ids`, those `filters` select, the state aside (the spool says what waits); and those the history knows."""
        where, args = self._where(filters, by_state=False)
        hit = f"CASE WHEN {' AND '.join(where)} THEN 1 ELSE 0 END" if where else "1"

        def read(db: Db) -> tuple[set[str], set[str]]:
            hits: set[str] = set()
            known: set[str] = set()
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                for row in db.run(f"SELECT id, {hit} AS hit FROM messages WHERE id IN ({marks(chunk)})", (*args, *chunk)).fetchall():
                    known.add(row["id"])
                    if row["hit"]:
                        hits.add(row["id"])
            return hits, known

        return self._read(read, ("matching", filters, tuple(ids))) or (set(), set())

    def rows(self, ids: list[str]) -> dict[str, dict]:
        """The messages rows of `ids` (those the history has), each with its feeds."""
        def read(db: Db) -> dict[str, dict]:
            rows = [dict(row) for row in db.run(f"SELECT * FROM messages WHERE id IN ({marks(ids)})", ids).fetchall()]
            return {row["id"]: row for row in _with_feeds(db, rows, self.SEQ)}

        return (self._read(read, ("rows", tuple(ids))) or {}) if ids else {}

    def waiting_elsewhere(self) -> list[dict]:
        """Other hosts' entries that wait in their spools for a human (failed, quarantined for a feed), as the shared
        history says: id, host, received, prefix, state. Empty when the history is this host's alone."""
        if not self.shared:
            return []
        return self._rows(("waiting_elsewhere",), "SELECT m.id, m.host, m.received, p.prefix, p.state FROM message_prefixes p "
                          f"JOIN messages m ON m.id = p.id WHERE p.state IN ('{FAILED}', '{QUARANTINED}') AND m.host NOT IN (?, '')",
                          self.host)

    def message(self, entry_id: str) -> Record:
        """A message, its prefixes, the objects of its latest outcome, its outcomes (oldest first), its attachments
        as received, and what earlier outcomes left behind."""
        def read(db: Db) -> Record:
            row = db.run("SELECT * FROM messages WHERE id = ?", (entry_id,)).fetchone()
            prefixes, files, outcomes, attachments = ([dict(r) for r in db.run(sql, (entry_id,)).fetchall()] for sql in (
                "SELECT * FROM message_prefixes WHERE id = ? ORDER BY prefix",
                f"SELECT * FROM files WHERE id = ? ORDER BY {self.SEQ}",
                f"SELECT * FROM outcomes WHERE id = ? ORDER BY {self.SEQ}",
                "SELECT * FROM attachments WHERE id = ? ORDER BY n"))
            current, left = _objects(files, outcomes)
            return Record(dict(row) if row else None, prefixes, current, outcomes, attachments, left)

        return self._read(read, ("message", entry_id)) or Record(None, [], [], [], [], [])

    def hosts(self) -> list[str]:
        """Every host whose messages the history holds: the index walked from one name to the next, not every row read."""
        return [row["host"] for row in self._rows(("hosts",), (
            "WITH RECURSIVE hosts(host) AS (SELECT min(host) FROM messages WHERE host > '' UNION ALL "
            "SELECT (SELECT min(host) FROM messages WHERE host > hosts.host) FROM hosts WHERE hosts.host IS NOT NULL) "
            "SELECT host FROM hosts WHERE host IS NOT NULL"))]


def _conditions(where: list[str]) -> str:
    return " WHERE " + " AND ".join(where) if where else ""


def _with_feeds(db: Db, rows: list[dict], seq: str) -> list[dict]:
    """`rows` of messages, each with `feeds`: prefix → {state, csvs, unprocessable}, in the order they were written."""
    ids = [row["id"] for row in rows]
    feeds: dict[str, dict[str, dict]] = {}
    if ids:
        for row in db.run(f"SELECT id, prefix, state, csvs, unprocessable FROM message_prefixes WHERE id IN ({marks(ids)}) "
                          f"ORDER BY {seq}", ids).fetchall():
            feeds.setdefault(row["id"], {})[row["prefix"]] = {k: row[k] for k in ("state", "csvs", "unprocessable")}
    return [{**row, "feeds": feeds.get(row["id"], {})} for row in rows]


def _objects(files: list[dict], outcomes: list[dict]) -> tuple[list[dict], list[dict]]:
    """The objects of a message now, and those earlier outcomes stored that are not among them, from every outcome's
    objects: each outcome's replace those before it, a release's only those of the feeds it released. Objects written
    before outcomes kept theirs (no event) are taken as they were: current."""
    by_event: dict[str, list[dict]] = {}
    current = []
    for f in files:
        if f["event"] is None:
            current.append(f)
        else:
            by_event.setdefault(f["event"], []).append(f)
    replaced: list[dict] = []
    stored_by = {o["event"]: {"left_by": f"the {o['outcome']} outcome", "left_at": o["at"]} for o in outcomes if o["event"]}
    for outcome in outcomes:
        if outcome["prefixes"] is None or outcome["outcome"] == DROPPED:  # written before objects were kept per outcome; or nothing stored
            continue
        scope = set(json.loads(outcome["prefixes"])) if outcome["outcome"] == RELEASED else None
        replaced += [{**f, **stored_by.get(f["event"], {"left_by": "an earlier outcome", "left_at": None})} for f in current
                     if scope is None or f["prefix"] in scope]
        current = [f for f in current if scope is not None and f["prefix"] not in scope] + by_event.get(outcome["event"], [])
        for n, attempt in enumerate(json.loads(outcome["tries"] or "[]"), 1):  # what the failed attempts before it had stored
            replaced += [{**f, "left_by": f"attempt {n}, before it failed", "left_at": attempt["at"]} for f in attempt.get("stored", ())]
    now = {(f["bucket"], f["key"]) for f in current}
    left = {}
    for f in replaced:
        if (f["bucket"], f["key"]) not in now:
            left.setdefault((f["bucket"], f["key"]), f)
    return current, list(left.values())


def since(**delta: float) -> str:
    """The ISO time `delta` ago, to compare with the stored times."""
    return (datetime.now(timezone.utc) - timedelta(**delta)).replace(microsecond=0).isoformat()


def timestamp(iso: str | None) -> float | None:
    """A stored time as seconds since the epoch; None for none."""
    return datetime.fromisoformat(iso).timestamp() if iso else None
