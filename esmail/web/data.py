"""What the page shows, as plain dicts: the same data for the HTML templates and the JSON API.

Read from the history (finished messages, per-prefix summaries) and from
the spool (what waits now: queued, failed, quarantined). Everything here
blocks on files, so the views call it in a thread.

One rule for every list and count: a message is listed under every state
one of its feeds is in, and what waits is what the spools hold — this
host's spool read directly, another host's as the shared history says
(it sees only its own). Each count on `/` is the total of the list its link
opens, worked out by the same code or the same SQL.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

from esmail import feeds, mail
from esmail.config import Config
from esmail.history import FAILED, PAGE, QUARANTINED, QUEUED, STORED, WAITING, Filters, History, since, timestamp, urgency
from esmail.importer import FORMAT_UNUSABLE, HEADER_CHANGED, NEW_SHAPE, OK, REJECTED, WARNINGS
from esmail.spool import SUFFIX, Spool

CHART_DAYS = 30
RECENT_DAYS = 7  # a feed's messages and unprocessable files are counted over this many days
# A feed's status: the first that applies. Its last CSVs' verdict (DESIGN §16) is one: a file the importer would not read
# as configured needs a human (after what waits in a spool, before lateness); warnings and a new shape only want a look.
NEEDS_A_HUMAN = (HEADER_CHANGED, REJECTED, FORMAT_UNUSABLE)
VERDICTS = (*NEEDS_A_HUMAN, WARNINGS, NEW_SHAPE)  # the verdicts that are a feed's status (ok is the last status anyway)
STATUSES = (FAILED, QUARANTINED, *NEEDS_A_HUMAN, "late", "unprocessable files", WARNINGS, NEW_SHAPE, OK)
READINGS = ("verdict", "reason", "rows", "filtered", "valid_rows", "days", "meters", "first_date", "last_date", "warnings")


def _spool_folders(spool: Spool) -> dict[str, Path]:
    """The spool folder that holds the entries in each state, in the order an entry passes them."""
    return {QUEUED: spool.queue, FAILED: spool.failed, QUARANTINED: spool.quarantine_dir}


def waiting(spool: Spool, history: History, states: tuple[str, ...] = (FAILED, QUARANTINED)) -> list[dict]:
    """The entries that wait in a spool, in `states`: this host's from its spool, the other hosts' (failed,
    quarantined) from the shared history. Each: id, host, received, state, prefixes (those it waits for)."""
    found = []
    folders = _spool_folders(spool)
    for state in states:
        ids = {QUEUED: spool.pending, FAILED: spool.failed_ids, QUARANTINED: spool.quarantined_ids}[state]()
        for entry_id in ids:
            try:
                envelope = spool.envelope(entry_id, folders[state])
            except (OSError, ValueError):  # finished meanwhile
                continue
            prefixes = list(envelope.held if state == QUARANTINED else envelope.folders) or ["unknown"]
            found.append({"id": entry_id, "host": history.host, "received": envelope.received, "state": state, "prefixes": prefixes})
    elsewhere: dict[tuple[str, str], dict] = {}
    for row in history.waiting_elsewhere():
        if row["state"] in states:
            item = elsewhere.setdefault((row["id"], row["state"]), {**{k: row[k] for k in ("id", "host", "received", "state")},
                                                                   "prefixes": []})
            item["prefixes"].append(row["prefix"])
    return found + list(elsewhere.values())


def _selects(item: dict, filters: Filters, cutoff: str) -> bool:
    """Whether a waiting entry passes the filters the spool can answer (feed, host, time)."""
    return ((not filters.prefix or filters.prefix in item["prefixes"]) and (not filters.host or item["host"] == filters.host)
            and (not cutoff or item["received"] >= cutoff))


def overview(config: Config, spool: Spool, history: History) -> dict:
    """`GET /`: every declared feed and every prefix seen (what needs a human first), what waits, the last 24 hours,
    and 30 days by outcome. Each count comes with the list that shows its messages (`…_href`)."""
    now = time.time()
    rows = history.prefixes()
    week = since(days=RECENT_DAYS)
    recent = history.counts_since(week)
    unprocessable = history.unprocessable_since(week)
    held = waiting(spool, history)
    checks = last_checks(history)
    day = since(days=1)
    declared = [feed.prefix for feed in config.feeds]
    seen = sorted(prefix for prefix, row in rows.items() if row["last_message"] and prefix not in declared)
    held_by_prefix: dict[tuple[str, str], list[str]] = {}  # (prefix, state): the ids that wait, gathered in one pass
    for item in held:
        for prefix in item["prefixes"]:
            held_by_prefix.setdefault((prefix, item["state"]), []).append(item["id"])
    listed = []
    for prefix in declared + seen + sorted({prefix for prefix, _ in held_by_prefix} - set(declared) - set(seen)):
        row, feed = rows.get(prefix), config.feed(prefix)
        last = row["last_message"] if row else None
        first_declared = row["first_declared"] if row else None
        late = feed is not None and feeds.late(feed, timestamp(last), timestamp(first_declared), now)
        waits = {state: held_by_prefix.get((prefix, state), []) for state in (FAILED, QUARANTINED)}
        bad = unprocessable.get(prefix, {"messages": 0, "files": 0})
        check = checks.get(prefix)
        flags = {FAILED: bool(waits[FAILED]), QUARANTINED: bool(waits[QUARANTINED]), "late": late, "unprocessable files": bool(bad["files"]),
                 **{verdict: check is not None and check["verdict"] == verdict for verdict in VERDICTS}, OK: True}
        expected_by = None
        if feed is not None and feed.expected_every and (last or first_declared):
            expected_by = datetime.fromtimestamp(timestamp(last or first_declared) + feed.expected_every, timezone.utc).isoformat()
        listed.append({
            "prefix": prefix, "name": feed.name if feed else "", "declared": feed is not None,
            "expected_every": feed.expected_every if feed else None, "expected_by": expected_by,
            "last_message": last, "last_csv": row["last_csv"] if row else None, "last_check": check,
            "messages_7d": recent.get(prefix, 0), "messages_7d_href": "/messages?" + Filters(prefix=prefix, days=RECENT_DAYS).query(),
            "unprocessable_7d": {**bad, "href": "/messages?" + Filters(prefix=prefix, files="unprocessable", days=RECENT_DAYS).query()},
            "status": next(status for status in STATUSES if flags[status]),
            "waiting": waits,
            "waiting_href": {state: "/messages?" + Filters(prefix=prefix, state=state).query() for state in (FAILED, QUARANTINED)},
        })
    listed.sort(key=lambda feed: STATUSES.index(feed["status"]))  # what needs a human first; stable: declared order within
    per_day = history.per_day(CHART_DAYS)
    today = datetime.now(timezone.utc).date()
    days = [(today - timedelta(days=n)).isoformat() for n in range(CHART_DAYS - 1, -1, -1)]
    return {
        "feeds": listed,
        "waiting": {state: {"count": sum(1 for item in held if item["state"] == state), "href": f"/messages?state={state}"}
                    for state in (FAILED, QUARANTINED)},
        "queued": {"count": len(spool.pending()), "href": f"/messages?state={QUEUED}"},
        "last_24h": {
            STORED: {"count": history.count(Filters(state=STORED, days=1)), "href": "/messages?" + Filters(state=STORED, days=1).query()},
            **{state: {"count": sum(1 for item in held if item["state"] == state and item["received"] >= day),
                       "href": "/messages?" + Filters(state=state, days=1).query()} for state in (QUARANTINED, FAILED)}},
        "days": [{"day": day, **{state: per_day.get(day, {}).get(state, 0) for state in (STORED, QUARANTINED, FAILED)}}
                 for day in days],
    }


def last_checks(history: History) -> dict[str, dict]:
    """prefix → what the importer will make of its last CSVs (those of its latest message that stored any, as their
    reports say): the message, the most urgent verdict, and each CSV's verdict and readings."""
    latest: dict[str, dict[tuple[str, str], dict[str, dict]]] = {}  # prefix → (received, id) → key → the CSV
    for row in history.last_checks():
        try:
            report = json.loads(row["check_report"])
        except ValueError:
            continue
        latest.setdefault(row["prefix"], {}).setdefault((row["received"], row["id"]), {})[row["key"]] = {
            "name": row["name"], "key": row["key"], "href": object_href(row["bucket"], row["key"]),
            **{name: report.get(name) for name in READINGS}}
    found = {}
    for prefix, by_message in latest.items():
        (received, entry_id), files = max(by_message.items())
        files = list(files.values())
        found[prefix] = {"id": entry_id, "received": received, "href": f"/messages/{entry_id}",
                         "verdict": min((f["verdict"] for f in files), key=_rank), "files": files}
    return found


def _rank(verdict: str) -> int:
    return STATUSES.index(verdict) if verdict in STATUSES else len(STATUSES)


def messages(spool: Spool, history: History, filters: Filters) -> dict:
    """`GET /messages`: a page of the messages the filters select, newest first, and how many they select in all.
    What waits (queued, failed, quarantined) is what the spools hold; the rest is the history's."""
    if filters.state in WAITING:
        listed, total = _waiting_page(spool, history, filters)
    else:
        rows, total = history.messages(filters)
        listed = [_listed(spool, history, row) for row in rows]
    pages = max((total + PAGE - 1) // PAGE, 1)
    return {"messages": listed, "total": total, "page": filters.page, "pages": pages,
            "next_page": filters.page + 1 if filters.page < pages else None, "filters": vars(filters)}


def _waiting_page(spool: Spool, history: History, filters: Filters) -> tuple[list[dict], int]:
    cutoff = since(days=filters.days) if filters.days else ""
    found = [item for item in waiting(spool, history, (filters.state,)) if _selects(item, filters, cutoff)]
    if filters.text or filters.files:  # what the history knows of them; one it does not know is matched on its headers
        hits, known = history.matching(filters, [item["id"] for item in found])
        found = [item for item in found if item["id"] in hits or (item["id"] not in known and not filters.files
                 and _matches(_from_spool(spool, item["id"], filters.state), filters.text))]
    found.sort(key=lambda item: (item["received"], item["id"]), reverse=True)
    start = (max(filters.page, 1) - 1) * PAGE
    shown = found[start:start + PAGE]
    rows = history.rows([item["id"] for item in shown])
    listed = []
    for item in shown:
        message = _listed(spool, history, rows[item["id"]]) if item["id"] in rows else _from_spool(spool, item["id"], filters.state)
        if message is not None:
            listed.append(message)
    return listed, len(found)


def _matches(message: dict | None, text: str) -> bool:
    text = text.lower()
    return message is not None and any(text in (message[k] or "").lower() for k in ("from", "subject", "mail_from"))


def _state_of(prefix_states: dict[str, str]) -> str:
    """A message's state on the list: the most urgent of its feeds'."""
    return min(prefix_states.values(), key=urgency, default=STORED)


def _listed(spool: Spool, history: History, row) -> dict:
    """A history row as the list shows it; what this host's spool holds now overrides the history's word on it."""
    feeds_ = row["feeds"] or {"unknown": {"state": row["state"], "csvs": 0, "unprocessable": 0}}
    prefix_states = {prefix: feed["state"] for prefix, feed in feeds_.items()}
    reason = row["reason"]
    if row["host"] in ("", history.host):
        now = where_now(spool, row["id"])
        if now is not None:
            prefix_states, reason = _spool_states(spool, row["id"], now, prefix_states) or (prefix_states, reason)
    return {"id": row["id"], "host": row["host"], "received": row["received"], "origin": row["origin"], "from": row["header_from"],
            "mail_from": row["mail_from"], "subject": row["subject"], "prefixes": list(prefix_states), "size": row["size"],
            "state": _state_of(prefix_states), "prefix_states": dict(sorted(prefix_states.items(), key=lambda item: urgency(item[1]))),
            "csv_count": sum(feed["csvs"] for feed in feeds_.values()),
            "unprocessable_count": sum(feed["unprocessable"] for feed in feeds_.values()), "reason": reason}


def _spool_states(spool: Spool, entry_id: str, now: tuple[str, Path], prefix_states: dict[str, str]) -> tuple[dict, str] | None:
    """The feeds' states and the reason as this host's spool holds the entry now (`where_now`); None if it moved meanwhile."""
    state, folder = now
    try:
        envelope = spool.envelope(entry_id, folder)
    except (OSError, ValueError):
        return None
    if state == QUARANTINED:
        return {**prefix_states, **dict.fromkeys(envelope.held, QUARANTINED)}, "; ".join(f"{p}: {r}" for p, r in envelope.held.items())
    entry_state = spool.read_state(entry_id)
    waiting_for = list(envelope.folders) or list(prefix_states) or ["unknown"]
    return {**prefix_states, **dict.fromkeys(waiting_for, state)}, entry_state.reason or entry_state.last_error


def _from_spool(spool: Spool, entry_id: str, state: str) -> dict | None:
    """A message as this host's spool holds it (no history yet): its envelope and the headers people look for."""
    folder = _spool_folders(spool)[state]
    try:
        envelope = spool.envelope(entry_id, folder)
        with open(folder / (entry_id + SUFFIX), "rb") as file:
            file.readline()
            headers = mail.parse_headers(file.read(64 * 1024))
    except (OSError, ValueError):
        return None
    entry_state = spool.read_state(entry_id)
    prefixes = list(envelope.held or envelope.folders) or ["unknown"]
    return {"id": entry_id, "host": "", "received": envelope.received, "origin": envelope.origin, "from": mail.header_text(headers, "From"),
            "mail_from": envelope.sender, "subject": mail.header_text(headers, "Subject"), "prefixes": prefixes,
            "size": None, "state": state, "prefix_states": dict.fromkeys(prefixes, state), "csv_count": None, "unprocessable_count": None,
            "reason": entry_state.reason or entry_state.last_error or "; ".join(envelope.held.values())}


def where_now(spool: Spool, entry_id: str) -> tuple[str, Path] | None:
    """Which spool folder holds the entry now (queued, failed, quarantined), or None when it is finished."""
    for state, folder in _spool_folders(spool).items():
        if (folder / (entry_id + SUFFIX)).exists():
            return state, folder
    return None


def message(spool: Spool, history: History, entry_id: str) -> dict | None:
    """`GET /messages/{id}`: the message, its attachments as received, its outcomes with each failed attempt, the
    objects of its latest outcome and what earlier ones left behind; None when neither history nor spool knows it."""
    record = history.message(entry_id)
    row, prefixes = record.row, record.prefixes
    now = where_now(spool, entry_id)
    if row is None:
        if now is None:
            return None
        found = _from_spool(spool, entry_id, now[0])
        if found is None:
            return None
        envelope = spool.envelope(entry_id, now[1])
        found.update(client=envelope.client, helo=envelope.helo, date="", authentication=envelope.authentication,
                     attempts=spool.read_state(entry_id).attempts, seconds=None)
    else:
        found = {**_listed(spool, history, {**dict(row), "feeds": {p["prefix"]: p for p in prefixes}}),
                 "client": row["client"], "helo": row["helo"], "date": row["date"], "authentication": row["authentication"],
                 "attempts": row["attempts"], "seconds": row["seconds"]}
    found.update(
        attachments=[{k: a[k] for k in ("name", "bytes")} for a in record.attachments],
        attachments_known=any(o["prefixes"] is not None for o in record.outcomes),  # kept by outcomes since history schema 3
        files=[_object(f) for f in record.files],
        left_behind=[{**{k: f[k] for k in ("bucket", "key", "bytes", "left_by", "left_at")}, "href": object_href(f["bucket"], f["key"])}
                     for f in record.left_behind],
        outcomes=[{**{k: o[k] for k in ("at", "outcome", "reason", "attempts", "seconds", "by")}, "tries": json.loads(o["tries"] or "[]")}
                  for o in record.outcomes],
        trying=spool.read_state(entry_id).tries if now is not None and now[0] == QUEUED else [])  # its attempts so far
    if not found["attachments"] and now is not None:
        found["attachments"] = spool.read_state(entry_id).attachments
    held_by = history.host if now is not None else _holder(history, row, prefixes)
    found["host"] = row["host"] if row is not None and row["host"] else history.host
    found["held_by"] = held_by  # the host whose spool holds it now (it acts on a retry or release); None: finished
    found["actions"] = {"retry": held_by is not None and FAILED in found["prefix_states"].values(),
                        "release": held_by is not None and QUARANTINED in found["prefix_states"].values()}
    found["requests"] = [{k: r[k] for k in ("action", "by", "requested", "requested_from", "host", "done", "outcome")}
                         for r in history.actions(entry_id)] if history.shared else []
    return found


def _object(f: dict) -> dict:
    """A stored object as the page shows it; `check`: a CSV's report as the history keeps it (DESIGN §16), else None."""
    return {**{k: f[k] for k in ("prefix", "role", "name", "kind", "rule", "bucket", "key", "bytes", "reason")}, "href": object_href(f["bucket"], f["key"]),
            "check": json.loads(f["check_report"]) if f.get("check_report") else None}


def holder(history: History, entry_id: str, action: str) -> str | None:
    """The other host whose spool holds the entry waiting for `action` (retry: failed; release: quarantined), as the
    shared history says; None when no other host does (or the history is this host's alone)."""
    record = history.message(entry_id)
    host = _holder(history, record.row, record.prefixes)
    wanted = FAILED if action == "retry" else QUARANTINED
    return host if host and any(p["state"] == wanted for p in record.prefixes) else None


def _holder(history: History, row, prefixes) -> str | None:
    """Another host's, when the shared history says its spool still holds the message (failed, or quarantined for a feed)."""
    if not history.shared or row is None or not row["host"] or row["host"] == history.host:
        return None
    return row["host"] if any(p["state"] in (FAILED, QUARANTINED) for p in prefixes) else None


def object_href(bucket: str, key: str) -> str:
    return f"/objects/{quote(bucket)}/{quote(key)}"

