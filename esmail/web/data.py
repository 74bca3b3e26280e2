"""What the page shows, as plain dicts: the same data for the HTML templates and the JSON API.

Read from the history (finished messages, per-prefix summaries) and from
the spool (what waits now: queued, failed, quarantined). Everything here
blocks on files, so the views call it in a thread.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

from esmail import feeds, mail
from esmail.config import Config
from esmail.history import PAGE, QUEUED, History, since, timestamp
from esmail.spool import SUFFIX, Spool

CHART_DAYS = 30
STATUSES = ("failed", "quarantined", "late", "unprocessable files", "ok")


def waiting(spool: Spool) -> dict[str, dict[str, list[str]]]:
    """For failed/ and quarantine/: prefix → the ids of the entries that wait there for a human."""
    found: dict[str, dict[str, list[str]]] = {"failed": {}, "quarantined": {}}
    for state, folder, ids in (("failed", spool.failed, spool.failed_ids()), ("quarantined", spool.quarantine_dir, spool.quarantined_ids())):
        for entry_id in ids:
            try:
                envelope = spool.envelope(entry_id, folder)
            except (OSError, ValueError):
                continue
            for prefix in (envelope.held or envelope.folders or {"unknown": ""}):
                found[state].setdefault(prefix, []).append(entry_id)
    return found


def overview(config: Config, spool: Spool, history: History) -> dict:
    """`GET /`: every declared feed and every prefix seen, the last 24 hours, the spool, and 30 days by outcome."""
    now = time.time()
    rows = history.prefixes()
    recent = history.counts_since(since(days=7))
    held = waiting(spool)
    declared = [feed.prefix for feed in config.feeds]
    seen = sorted(prefix for prefix, row in rows.items() if row["last_message"] and prefix not in declared)
    listed = []
    for prefix in declared + seen:
        row, feed = rows.get(prefix), config.feed(prefix)
        last = row["last_message"] if row else None
        late = feed is not None and feeds.late(feed, timestamp(last), timestamp(row["first_declared"]) if row else None, now)
        flags = {"failed": prefix in held["failed"], "quarantined": prefix in held["quarantined"], "late": late,
                 "unprocessable files": bool(row and row["last_unprocessable"]), "ok": True}
        listed.append({
            "prefix": prefix, "name": feed.name if feed else "", "declared": feed is not None,
            "expected_every": feed.expected_every if feed else None,
            "last_message": last, "last_csv": row["last_csv"] if row else None, "messages_7d": recent.get(prefix, 0),
            "status": next(status for status in STATUSES if flags[status]),
            "waiting": {state: held[state].get(prefix, []) for state in ("failed", "quarantined")},
        })
    totals = history.totals_since(since(hours=24))
    per_day = history.per_day(CHART_DAYS)
    today = datetime.now(timezone.utc).date()
    days = [(today - timedelta(days=n)).isoformat() for n in range(CHART_DAYS - 1, -1, -1)]
    return {
        "feeds": listed,
        "last_24h": {state: totals.get(state, 0) for state in ("stored", "quarantined", "failed")},
        "spool": {"queued": len(spool.pending()), "failed": len(spool.failed_ids()), "quarantined": len(spool.quarantined_ids())},
        "days": [{"day": day, **{state: per_day.get(day, {}).get(state, 0) for state in ("stored", "quarantined", "failed")}}
                 for day in days],
    }


def messages(spool: Spool, history: History, prefix: str = "", state: str = "", text: str = "", page: int = 1, host: str = "") -> dict:
    """`GET /messages`: a page of messages, newest first. Queued ones come from this host's spool (the history has only
    finished ones, of every host that shares it)."""
    if state == QUEUED:
        found = [_from_spool(spool, entry_id, spool.queue, QUEUED) for entry_id in reversed(spool.pending())] \
            if host in ("", history.host) else []
        found = [{**m, "host": history.host} for m in found if m and (not prefix or prefix in m["prefixes"]) and _matches(m, text)]
        start = (max(page, 1) - 1) * PAGE
        listed, more = found[start:start + PAGE], len(found) > start + PAGE
    else:
        rows, more = history.messages(prefix, state, text, page, host)
        listed = [_listed(row) for row in rows]
    return {"messages": listed, "page": page, "next_page": page + 1 if more else None,
            "filters": {"prefix": prefix, "state": state, "q": text, "host": host}}


def _matches(message: dict, text: str) -> bool:
    text = text.lower()
    return not text or any(text in (message[k] or "").lower() for k in ("from", "subject", "mail_from"))


def _listed(row) -> dict:
    return {"id": row["id"], "host": row["host"], "received": row["received"], "origin": row["origin"], "from": row["header_from"],
            "mail_from": row["mail_from"], "subject": row["subject"], "prefixes": (row["prefix_list"] or "").split(",") if row["prefix_list"] else [],
            "size": row["size"], "state": row["state"], "reason": row["reason"]}


def _from_spool(spool: Spool, entry_id: str, folder: Path, state: str) -> dict | None:
    """A message as the spool holds it (no history yet): its envelope and the headers people look for."""
    try:
        envelope = spool.envelope(entry_id, folder)
        with open(folder / (entry_id + SUFFIX), "rb") as file:
            file.readline()
            headers = mail.parse_headers(file.read(64 * 1024))
    except (OSError, ValueError):
        return None
    return {"id": entry_id, "host": "", "received": envelope.received, "origin": envelope.origin, "from": mail.header_text(headers, "From"),
            "mail_from": envelope.sender, "subject": mail.header_text(headers, "Subject"), "prefixes": list(envelope.held or envelope.folders),
            "size": None, "state": state, "reason": spool.read_state(entry_id).last_error or "; ".join(envelope.held.values())}


def where_now(spool: Spool, entry_id: str) -> tuple[str, Path] | None:
    """Which spool folder holds the entry now (queued, failed, quarantined), or None when it is finished."""
    for state, folder in ((QUEUED, spool.queue), ("failed", spool.failed), ("quarantined", spool.quarantine_dir)):
        if (folder / (entry_id + SUFFIX)).exists():
            return state, folder
    return None


def message(spool: Spool, history: History, entry_id: str) -> dict | None:
    """`GET /messages/{id}`: the message, its outcomes and every object it stored; None when neither history nor spool knows it."""
    row, prefixes, files, outcomes = history.message(entry_id)
    now = where_now(spool, entry_id)
    if row is None:
        if now is None:
            return None
        found = _from_spool(spool, entry_id, now[1], now[0])
        if found is None:
            return None
        envelope = spool.envelope(entry_id, now[1])
        found.update(client=envelope.client, helo=envelope.helo, date="", authentication=envelope.authentication,
                     attempts=spool.read_state(entry_id).attempts, seconds=None, files=[], outcomes=[],
                     prefix_states={prefix: now[0] for prefix in found["prefixes"]})
    else:
        found = {**_listed({**dict(row), "prefix_list": ",".join(p["prefix"] for p in prefixes)}),
                 "client": row["client"], "helo": row["helo"], "date": row["date"], "authentication": row["authentication"],
                 "attempts": row["attempts"], "seconds": row["seconds"],
                 "prefix_states": {p["prefix"]: p["state"] for p in prefixes},
                 "files": [{**{k: f[k] for k in ("prefix", "role", "name", "kind", "rule", "bucket", "key", "bytes", "reason")},
                            "href": object_href(f["bucket"], f["key"])} for f in files],
                 "outcomes": [{k: o[k] for k in ("at", "outcome", "reason", "attempts", "seconds")} for o in outcomes]}
    if now is not None:  # the spool is the truth about what waits
        found["state"] = now[0]
        if now[0] == "quarantined":
            held = spool.envelope(entry_id, now[1]).held
            found["prefix_states"].update({prefix: "quarantined" for prefix in held})
            found["reason"] = "; ".join(f"{prefix}: {reason}" for prefix, reason in held.items())
        elif now[0] == "failed":
            found["reason"] = spool.read_state(entry_id).reason or found["reason"]
    held_by = history.host if now is not None else _holder(history, row, prefixes)
    found["host"] = row["host"] if row is not None and row["host"] else history.host
    found["held_by"] = held_by  # the host whose spool holds it now (it acts on a retry or release); None: finished
    waits = now[0] if now is not None else (row["state"] if held_by else None)
    if held_by and waits != "quarantined" and any(p["state"] == "quarantined" for p in prefixes):
        waits = "quarantined"  # quarantined for one feed, stored for another
    found["actions"] = {"retry": waits == "failed", "release": waits == "quarantined"}
    found["requests"] = [{k: r[k] for k in ("action", "by", "requested", "requested_from", "host", "done", "outcome")}
                         for r in history.actions(entry_id)] if history.shared else []
    return found


def holder(history: History, entry_id: str, action: str) -> str | None:
    """The other host whose spool holds the entry waiting for `action` (retry: failed; release: quarantined), as the
    shared history says; None when no other host does (or the history is this host's alone)."""
    row, prefixes, _, _ = history.message(entry_id)
    host = _holder(history, row, prefixes)
    wanted = "failed" if action == "retry" else "quarantined"
    return host if host and (row["state"] == wanted or any(p["state"] == wanted for p in prefixes)) else None


def _holder(history: History, row, prefixes) -> str | None:
    """Another host's, when the shared history says its spool still holds the message (failed, or quarantined for a feed)."""
    if not history.shared or row is None or not row["host"] or row["host"] == history.host:
        return None
    waiting = row["state"] in ("failed", "quarantined") or any(p["state"] == "quarantined" for p in prefixes)
    return row["host"] if waiting else None


def object_href(bucket: str, key: str) -> str:
    return f"/objects/{quote(bucket)}/{quote(key)}"
