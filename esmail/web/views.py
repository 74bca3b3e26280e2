"""The page's request handlers: read (in a thread), render a template or answer JSON; retry and release act on the spool."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import mimetypes
import re
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import quote

from aiohttp import web
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from esmail.config import describe_age, describe_duration
from esmail.errors import ActionRefused, TemporaryFailure
from esmail.history import FILES, STATES, Filters
from esmail.importer import OK
from esmail.web import data
from esmail.web.access import CSRF_FIELD, check_csrf, csrf_token, who
from esmail.web.chart import daily_bars

if TYPE_CHECKING:
    from esmail.daemon import Daemon

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z-]{0,80}")  # a spool id: it names files, so nothing else gets near the spool
MAX_PAGE = 1_000_000  # 50 million messages back: far more than a history holds, and well inside a 64-bit OFFSET
MAX_DAYS = 100_000  # ?days=: far more than a history keeps
NOTES = {  # what a redirect after an action says (?done=): fixed texts, never the query's own
    "retry": "Queued again: the worker takes it now.",
    "release": "Released: it is processed now as if its feed had let it through.",
    "requested": "Requested: the host that holds it acts within seconds; this page shows what came of it.",
}
MEANINGS = {  # the importer's warnings and esmail's notes (DESIGN §16), in a few words beside their names
    "missing_readings": "rows with too few half hours (blank or -): they do not import",
    "missing_mpan_mprn": "rows without an MPAN/MPRN",
    "invalid_non_numeric_mpan_mprn": "MPANs that are not all digits (Excel's 1.23405E+12)",
    "missing_reading_date": "rows without a date",
    "invalid_reading_date": "dates that date_format does not read",
    "future_reading_date": "dates after today",
    "duplicate_reading": "a meter and day (or half hour) again: the last one wins",
    "header_row_moved": "the header is not on the row number_of_header_rows says",
    "date_format_differs": "dates date_format does not read but the importer's fallback does: they import",
    "columns_added": "more columns than header_example has",
    "columns_removed": "fewer columns than header_example has, none of them read",
    "unread_columns_renamed": "columns renamed that the importer does not read",
}


class Views:
    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self.config = daemon.config
        self.spool = daemon.spool
        self.history = daemon.history
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined)
        self.templates.filters.update(when=_when, ago=_ago, size=_size, every=_every)
        # the stylesheet read once; its link names its content, so a browser never keeps an old one after an upgrade
        self.css = (HERE / "static" / "esmail.css").read_text()
        self.templates.globals.update(verdicts=(*data.VERDICTS, OK), needs_a_human=data.NEEDS_A_HUMAN, meanings=MEANINGS,
                                      stylesheet=f"/static/esmail.css?v={hashlib.sha256(self.css.encode()).hexdigest()[:12]}")
        self.buckets = {self.config.buckets.named(logical): logical for logical in ("inbox", "amr_data", "unprocessable")}

    # --- pages -----------------------------------------------------------------

    async def feeds(self, request: web.Request) -> web.Response:
        overview = await asyncio.to_thread(data.overview, self.config, self.spool, self.history)
        return self._render(request, "feeds.html", chart=daily_bars(overview["days"]), **overview)

    async def messages(self, request: web.Request) -> web.Response:
        filters = self._filters(request)
        listed = await asyncio.to_thread(data.messages, self.spool, self.history, filters)
        prefixes = await asyncio.to_thread(self._known_prefixes)
        hosts = await asyncio.to_thread(self.history.hosts) if self.history.shared else []
        return self._render(request, "messages.html", states=STATES, prefixes=prefixes, hosts=hosts, files_filters=FILES,
                            query=filters.query, **listed)

    async def message(self, request: web.Request) -> web.Response:
        found = await self._message(request)
        return self._render(request, "message.html", message=found)

    async def stylesheet(self, request: web.Request) -> web.Response:
        return web.Response(text=self.css, content_type="text/css", headers={"Cache-Control": "max-age=86400"})

    # --- actions ---------------------------------------------------------------

    async def retry(self, request: web.Request) -> web.Response:
        """A failed entry back to the queue, and to the worker at once."""
        return await self._act(request, "retry")

    async def release(self, request: web.Request) -> web.Response:
        """A quarantined entry let through: processed now as if its feed had passed it (the worker logs the reason overridden)."""
        return await self._act(request, "release")

    async def _act(self, request: web.Request, action: str) -> web.Response:
        """Done here when this host's spool holds the entry; asked of the host that holds it otherwise (a shared history)."""
        await check_csrf(request)
        entry_id = self._id(request)
        by = who(request)
        try:
            await self.daemon.act(entry_id, action, by)
        except ActionRefused as exc:
            holder = await asyncio.to_thread(self._holder, entry_id, action)
            if holder is None:
                raise web.HTTPConflict(text=f"409: {exc}\n") from None
            if not await self.history.request(entry_id, holder, action, by):
                raise web.HTTPServiceUnavailable(text=f"503: {holder} holds this message, and the history database that would pass "
                                                      "the request on does not answer now; try again in a moment\n") from None
            log.info("%s: %s asked of %s by %s, on the page", entry_id, action, holder, by, extra={"spool_id": entry_id})
            raise web.HTTPSeeOther(f"/messages/{entry_id}?done=requested")
        raise web.HTTPSeeOther(f"/messages/{entry_id}?done={action}")

    def _holder(self, entry_id: str, action: str) -> str | None:
        """The other host whose spool holds the entry waiting for this action, as the shared history says; None otherwise."""
        return data.holder(self.history, entry_id, action)

    # --- objects -----------------------------------------------------------------

    async def object(self, request: web.Request) -> web.Response:
        """An object from one of the three configured buckets, through the store, as a download."""
        bucket, key = request.match_info["bucket"], request.match_info["key"]
        if bucket not in self.buckets or not _safe_key(key):
            raise web.HTTPNotFound(text="404: no such object (only the inbox, amr-data and unprocessable buckets are served)\n")
        try:
            body = await self.daemon.store.get(bucket, key)
        except TemporaryFailure as exc:
            raise web.HTTPServiceUnavailable(text=f"503: the store cannot be read now: {exc}\n") from None
        if body is None:
            raise web.HTTPNotFound(text="404: no such object\n")
        name = PurePosixPath(key).name
        return web.Response(body=body, headers={
            "Content-Type": _content_type(name),
            "Content-Disposition": f"attachment; filename=\"{_ascii(name)}\"; filename*=UTF-8''{quote(name)}"})

    # --- JSON ----------------------------------------------------------------------

    async def api_feeds(self, request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(data.overview, self.config, self.spool, self.history))

    async def api_messages(self, request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(data.messages, self.spool, self.history, self._filters(request)))

    async def api_message(self, request: web.Request) -> web.Response:
        return web.json_response(await self._message(request))

    # --- helpers -------------------------------------------------------------------

    def _render(self, request: web.Request, template: str, **context) -> web.Response:
        html = self.templates.get_template(template).render(
            stage=self.config.stage, csrf_field=CSRF_FIELD, csrf=csrf_token(request), note=NOTES.get(request.query.get("done", "")),
            history_problem=self.history.problem(), history_backlog=self.history.backlog(), this_host=self.history.host,
            shared=self.history.shared,
            dns_problem=self.daemon.dns.problem() if self.daemon.dns is not None else None, **context)
        return web.Response(text=html, content_type="text/html", charset="utf-8")

    async def _message(self, request: web.Request) -> dict:
        found = await asyncio.to_thread(data.message, self.spool, self.history, self._id(request))
        if found is None:
            raise web.HTTPNotFound(text="404: no such message in the history or the spool\n")
        return found

    @staticmethod
    def _id(request: web.Request) -> str:
        entry_id = request.match_info["id"]
        if not _ID.fullmatch(entry_id):
            raise web.HTTPNotFound(text="404: no such message\n")
        return entry_id

    @staticmethod
    def _filters(request: web.Request) -> Filters:
        query = request.query
        state, files = query.get("state", ""), query.get("files", "")
        if state and state not in STATES:
            raise web.HTTPBadRequest(text=f"400: state must be one of {', '.join(STATES)}\n")
        if files and files not in FILES:
            raise web.HTTPBadRequest(text=f"400: files must be one of {', '.join(FILES)}\n")
        page, days = _number(query, "page", 1, MAX_PAGE, 1), _number(query, "days", 0, MAX_DAYS, 0)
        return Filters(prefix=query.get("prefix", "").strip().lower()[:100], state=state, text=query.get("q", "").strip()[:200],
                       files=files, host=query.get("host", "").strip()[:255], days=days, page=page)

    def _known_prefixes(self) -> list[str]:
        return sorted({feed.prefix for feed in self.config.feeds} | set(self.history.prefixes()))


def _number(query, name: str, lowest: int, highest: int, default: int) -> int:
    """A whole number from the query, within bounds; 400 otherwise."""
    try:
        value = int(query.get(name) or default)
    except ValueError:
        value = lowest - 1
    if not lowest <= value <= highest:
        raise web.HTTPBadRequest(text=f"400: {name} must be a number from {lowest} to {highest:,}\n")
    return value


def _safe_key(key: str) -> bool:
    """A key as esmail writes them (DESIGN §3): no empty, `.` or `..` segments, no leading `/`, no backslash or control characters."""
    segments = key.split("/")
    return (0 < len(key) <= 1024 and "\\" not in key and not any(ord(c) < 32 or ord(c) == 127 for c in key)
            and all(segment not in ("", ".", "..") for segment in segments))


def _content_type(name: str) -> str:
    if name.lower().endswith(".csv"):
        return "text/csv; charset=utf-8"
    if name.lower().endswith(".eml"):
        return "message/rfc822"
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _ascii(name: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)


# --- template filters -----------------------------------------------------------------

def _when(iso: str | None) -> str:
    """`2026-12-03T09:23:11+00:00` → `2026-12-03 09:23:11 UTC`."""
    if not iso:
        return "never"
    return datetime.fromisoformat(iso).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(iso: str | None) -> str:
    if not iso:
        return ""
    return describe_age((datetime.now(timezone.utc) - datetime.fromisoformat(iso)).total_seconds()) + " ago"


def _size(count: int | None) -> str:
    if count is None:
        return ""
    for unit, size in (("MB", 10**6), ("KB", 10**3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _every(seconds: float | None) -> str:
    return describe_duration(seconds) if seconds else ""
