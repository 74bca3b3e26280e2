"""The worker: a spooled message → every object stored → the spool entry removed.

The conversion (esmail.conversion) is a pure function of the raw message, run
in a process pool so that the event loop stays free; storing happens on the loop.
Because keys are fixed by the envelope and the store never overwrites, a
message processed twice (a crash, a replay) yields the same objects once.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from esmail import history, links, mail, metrics, report
from esmail.chain import AMR_DATA, INBOX, UNPROCESSABLE, Output
from esmail.config import Config
from esmail.conversion import Converted, convert_entries, convert_entry, convert_files, start_process
from esmail.errors import ConversionCrashed, NeedsFixing, StorageFailure, TemporaryFailure
from esmail.group_commit import Batches, settle
from esmail.history import FileRow, History
from esmail.importer import HEADER_CHANGED, OK, REJECTED, Report
from esmail.logs import counted
from esmail.outage import Outage
from esmail.shapes import Shapes, seed
from esmail.spool import Entry, EntryState, Envelope, Spool
from esmail.store import Store

if TYPE_CHECKING:  # the checks themselves (dkimpy, pyspf, dnspython) are imported only where feeds are declared
    from esmail.authentication import Authentication, Request
    from esmail.dns_health import DnsHealth
    from esmail.feeds import Refusal

log = logging.getLogger(__name__)

NO_PREFIX = "unknown"
MAX_CRASHES = 2  # conversions of one entry that may kill their process (the second one alone)
CRASHED = ("its conversion killed the converting process twice, the second time alone "
           "(a file that exhausts [worker] memory_limit, or crashes a reader)")
MAX_BACKOFF = 600.0  # seconds: a storage outage is retried at least every 10 minutes
IN_FLIGHT = 32  # entries the scheduler runs at once (their conversions wait for the pool): their stores and removals share flushes
IN_FLIGHT_BYTES = 64 << 20  # and the size of their messages together; a bigger message runs once it is alone
BATCH = 16  # small messages that wait for the pool go to a process together (the trip costs more than converting one)
BATCH_BYTES = 1 << 20  # ... as long as they come to no more than this together
# What an attempt is doing and what it has stored so far, kept with its error when it fails (the page shows them)
STEP: contextvars.ContextVar[str] = contextvars.ContextVar("step", default="")
STORED: contextvars.ContextVar[list | None] = contextvars.ContextVar("stored", default=None)


@dataclass(frozen=True)
class Stored:
    bucket: str  # the real bucket name
    key: str
    size: int

    def __str__(self) -> str:
        return f"{self.bucket}\t{self.key}\t{self.size}"


class Worker:
    """Processes spool entries; with `processes=True` the conversions run in a pool of its own."""

    def __init__(self, config: Config, spool: Spool, store: Store, processes: bool = False, history: History | None = None,
                 dns: DnsHealth | None = None):
        self.config = config
        self.spool = spool
        self.store = store
        self.history = history
        self.dns = dns  # whether DNS answers now (the daemon's); None: always ask it
        self.executor: ProcessPoolExecutor | None = self._new_pool() if processes else None
        self.outage = Outage(lambda: store.check(config.buckets.named(INBOX)))
        self.waiting_for_store: set[str] = set()  # entries whose last attempt failed on the store: woken when it works again
        self._told = False  # a NeedsFixing went to Rollbar since the last write that worked: once is enough
        self.pool_size = process_pool_size(config)  # os.cpu_count() asked once, not for every small message
        self._converting = asyncio.Semaphore(self.pool_size)  # calls in the pool at once: one per process
        self._finished: Batches[str, None] = Batches(lambda entry_ids: self.spool.done(*entry_ids))
        # the final results of concurrent entries, kept with them (on ext4 a call that can wait for the journal)
        self._authenticated: Batches[tuple[Entry, dict], None] = Batches(
            lambda recorded: [self.spool.record_authentication(entry, results) for entry, results in recorded])
        # small entries waiting for the pool: sizes, formats, authentication requests (None: not to authenticate)
        self._to_convert: deque[tuple[Path, int, dict, Request | None, asyncio.Future]] = deque()
        self._senders = 0  # tasks sending them there, at most one a process
        # What the importer will make of each CSV (DESIGN §16), remembered here so that no message waits on a database:
        self.shapes = Shapes(config.history.keep_days * 86400)  # prefixes without a format: their recent header rows
        self.alerted: set[str] = set()  # feeds reported to Rollbar as header changed or rejected, until a CSV of theirs is ok

    async def remember_checks(self) -> None:
        """Learned shapes and alerted feeds from the history's recent reports (at start, beside the work: nothing waits on it)."""
        if self.history is not None:
            await asyncio.to_thread(seed, self.history, self.shapes, self.alerted)

    @property
    def store_error(self) -> str | None:
        """The store's last failure while it fails; None once it works (/healthz)."""
        return self.outage.error

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    async def process(self, entry: Entry | str) -> list[Stored]:
        """Store everything one spool entry (or the entry of that id) yields, then remove it; TemporaryFailure leaves it queued.

        With feeds declared, the message is authenticated first and each
        prefix's feed judges it: a refused prefix gets the inbox copy and a
        quarantine entry, nothing else.
        """
        started = time.monotonic()
        if isinstance(entry, str):
            entry = self.spool.entry(entry)
        entry_id, envelope, state = entry.id, entry.envelope, entry.state
        alone = state.crashes > 0  # a suspect: converted in a process of its own
        STEP.set("authenticating the sender (SPF, DKIM, DMARC)")
        auth, converted = await self._authenticate(entry, alone)
        refused = self._judge(envelope, auth)
        if auth is not None and state.authentication is None and not envelope.held:  # final now: a replay stores the same copy
            await self._authenticated.submit((entry, asdict(auth)))
        passing = [prefix for prefix in envelope.folders if prefix not in refused]
        if envelope.folders and not passing:  # every feed refused it: nothing to convert
            converted = Converted([], [], 0)
        elif converted is None:  # not converted on the way (see _authenticate)
            STEP.set("converting the attachments")
            try:
                with metrics.CONVERSION.time():
                    converted = await self._convert(entry, alone)
            except TemporaryFailure:
                raise
            except Exception as exc:  # the message itself broke the parser: keep it whole, in failed/ too
                return await self._give_up(entry, f"cannot process the message: {type(exc).__name__}: {exc}", started)
        state.attachments = [{"name": name, "bytes": size} for name, size in converted.attachments]
        raw = self.spool.message(entry)  # for the inbox copy, read only now: the conversion read its own
        copy = inbox_copy(raw, state, auth)
        outputs, checks = converted.outputs, converted.checks
        if converted.links and passing:
            STEP.set("downloading the files its links point to")
            downloaded = await self._in_pool(alone, convert_files, await self._download(envelope, converted.links),
                                             self.config.csv.ascii_only, self.config.formats_for(envelope.folders))
            outputs, checks = downloaded.outputs, downloaded.checks
        reports = self._reports(passing, outputs, checks)
        held = self._hold(envelope, reports) if auth is not None else {}
        refused.update(held)
        passing = [prefix for prefix in passing if prefix not in held]
        files: list[FileRow] = []
        if not envelope.folders:
            log.warning("%s: no usable recipient; the message goes whole to unprocessable", entry_id)
            report.problem("a message with no usable recipient went to unprocessable", "warning", spool_id=entry_id)
            files += await self._put_message(envelope, copy, (INBOX, UNPROCESSABLE), self._places(envelope))
        for prefix, folder in envelope.folders.items():
            files += await self._put_message(envelope, copy, (INBOX,), [(prefix, f"{prefix}/{folder}")])
            if prefix in refused:
                continue
            for out in outputs:
                stored = await self._put(entry_id, out.bucket, f"{prefix}/{folder}/{out.name}", out.data, out.content_type, out.rule)
                checked = reports[prefix].get(out.name) if out.bucket == AMR_DATA else None
                files.append(FileRow(prefix, out.bucket, out.name, out.kind, out.rule, stored.bucket, stored.key, stored.size, out.reason or "",
                                     checked.to_json() if checked is not None else None))
                if out.reason:
                    log.warning("%s: %s/%s/%s is unprocessable: %s", entry_id, prefix, folder, out.name, out.reason)
                    report.problem("a file went to unprocessable", "warning", prefix=prefix, key=stored.key,
                                   reason=out.reason, spool_id=entry_id)
        STEP.set("moving it on in the spool")
        if refused:
            self.spool.quarantine(entry, raw, {prefix: str(refusal) for prefix, refusal in refused.items()}, auth.header)
            for prefix, refusal in refused.items():
                metrics.QUARANTINED.labels(prefix, refusal.kind).inc()
                log.warning("%s: quarantined for %s: %s (`esmail spool release %s` lets it through)", entry_id, prefix, refusal, entry_id,
                            extra={"spool_id": entry_id, "prefixes": [prefix], "outcome": "quarantined", "reason": str(refusal)})
        await self._finished.submit(entry_id)
        self._account(envelope, reports, held)
        outcome = "stored" if passing or not envelope.folders else "quarantined"
        metrics.MESSAGES.labels(outcome).inc()
        self._log_message(envelope, len(raw), outcome, started, objects=len(files), inline_images=converted.inline_images,
                          auth=auth, quarantined=list(refused))
        reasons = "; ".join(f"{prefix}: {refusal}" for prefix, refusal in refused.items())
        if envelope.held:  # the history says what was overridden, as the log does
            reasons = "; ".join(f"{prefix}: released by an operator, overriding: {why}" for prefix, why in envelope.held.items())
        await self._record(entry, raw, history.RELEASED if envelope.held else outcome, started, state.attempts + 1, files,
                           {prefix: history.QUARANTINED if prefix in refused else history.STORED for prefix in envelope.folders},
                           auth, reasons, converted.summary)
        return [Stored(f.bucket, f.key, f.bytes) for f in files]

    async def _put_message(self, envelope: Envelope, raw: bytes, buckets: tuple[str, ...], places: list[tuple[str, str]]) -> list[FileRow]:
        """The raw message (with its Authentication-Results, when it has them) in each bucket, at each (prefix, folder)."""
        rows = []
        for prefix, folder in places:
            for bucket in buckets:
                stored = await self._put(envelope.id, bucket, f"{folder}/{envelope.id}.eml", raw, "message/rfc822")
                rows.append(FileRow(prefix, bucket, f"{envelope.id}.eml", "message", "", stored.bucket, stored.key, stored.size))
        return rows

    # --- what the importer will make of each CSV (DESIGN §16) ---------------------------------------------------------

    def _reports(self, prefixes: list[str], outputs: list[Output], checks: dict[str, dict[str, Report]]) -> dict[str, dict[str, Report]]:
        """prefix → CSV name → report: the conversion's checks for a prefix with a format, the learned check for the others."""
        reports = {}
        for prefix in prefixes:
            if prefix in checks:
                reports[prefix] = checks[prefix]
            else:
                reports[prefix] = {out.name: self.shapes.check(prefix, out.name, out.data) for out in outputs if out.bucket == AMR_DATA}
        return reports

    def _hold(self, envelope: Envelope, reports: dict[str, dict[str, Report]]) -> dict[str, Refusal]:
        """The prefixes whose feed holds a message with a `header changed` CSV (on_header_change = "hold"); a message
        a human released is stored as it is."""
        from esmail.feeds import HEADER_CHANGED as KIND, Refusal

        held = {}
        for prefix, found in reports.items():
            feed = self.config.feed(prefix)
            changed = [each for each in found.values() if each.verdict == HEADER_CHANGED]
            if feed is None or feed.on_header_change != "hold" or not changed or prefix in envelope.held:
                continue
            more = f" (and {len(changed) - 1} more CSVs)" if len(changed) > 1 else ""
            held[prefix] = Refusal(KIND, f"header changed: {changed[0].name}: {changed[0].header_changes()}{more}")
        return held

    def _account(self, envelope: Envelope, reports: dict[str, dict[str, Report]], held: dict[str, Refusal]) -> None:
        """Once the message is finished: each report counted, logged unless ok, reported to Rollbar when its feed turns
        to header changed or rejected (once, until a CSV of the feed is ok again); learned shapes remembered."""
        for prefix, found in reports.items():
            folder = f"{prefix}/{envelope.folders[prefix]}"
            for name, checked in found.items():
                metrics.FILE_CHECKS.labels(prefix, checked.verdict).inc()
                if prefix not in self.config.feed_formats:  # a learned check: its header is the shape
                    self.shapes.remember(prefix, checked.header.found)
                if checked.verdict == OK:
                    self.alerted.discard(prefix)
                    continue
                fate = " (held in quarantine)" if prefix in held else ""
                log.log(logging.INFO if checked.would_import else logging.WARNING, "%s: %s/%s: %s%s: %s", envelope.id, folder, name,
                        checked.verdict, fate, checked.summary(),
                        extra={"spool_id": envelope.id, "prefixes": [prefix], "key": f"{folder}/{name}", "verdict": checked.verdict})
                if checked.verdict in (HEADER_CHANGED, REJECTED) and prefix not in self.alerted:
                    self.alerted.add(prefix)
                    report.problem(f"a feed's CSV {'changed its header' if checked.verdict == HEADER_CHANGED else 'would be rejected'}: "
                                   "the importer would not read it as configured", prefix=prefix, key=f"{folder}/{name}",
                                   verdict=checked.verdict, reason=checked.summary(), spool_id=envelope.id)

    async def _record(self, entry: Entry, raw: bytes, outcome: str, started: float, attempts: int, files: list[FileRow],
                      prefixes: dict[str, str], auth: Authentication | None = None, reason: str = "", summary: dict[str, str] | None = None) -> None:
        """One outcome into the history (when there is one), with the attempts that failed before it, the attachments
        as received and who had it retried or released; it never holds a message up. `summary`: mail.summary of the
        message, when the conversion read it."""
        if self.history is None:
            return
        envelope, state = entry.envelope, entry.state
        await self.history.record(history.Finished(
            envelope.id, envelope.received, envelope.origin, outcome, prefixes or {NO_PREFIX: outcome}, client=envelope.client,
            helo=envelope.helo, mail_from=envelope.sender, **(summary or mail.summary(mail.parse_headers(raw))), size=len(raw),
            authentication=auth.header if auth is not None else "", reason=reason, attempts=attempts,
            seconds=round(time.monotonic() - started, 3), files=files, by=state.by, tries=list(state.tries),
            attachments=[history.Attached(**a) for a in state.attachments]))

    async def _authenticate(self, entry: Entry, alone: bool) -> tuple[Authentication | None, Converted | None]:
        """SPF, DKIM and DMARC of the message (DESIGN §12), once feeds are declared; None when none are (no DNS at all).
        With them, when they are worked out, the message's conversion, in the same trip to the pool (or None).

        Results that were final are reused: from the state when the entry is
        processed again, from the envelope when a human released it.
        """
        if not self.config.feeds:
            return None, None
        from esmail.authentication import Authentication, Request

        envelope, state = entry.envelope, entry.state
        if envelope.held:
            return Authentication(envelope.authentication, "", True), None
        if state.authentication is not None:
            return Authentication(**state.authentication), None
        smtp = envelope.origin == "smtp"
        needs = any(feed is not None and feed.authenticated for feed in map(self.config.feed, envelope.folders))
        dns, dns_down = self.dns.for_message(needs) if self.dns is not None else (self.config.dns, "")
        request = Request(dns, self.config.smtp.hostname, client=envelope.client if smtp else "",
                          helo=envelope.helo if smtp else "", mail_from=envelope.sender if smtp else "",
                          trusted_authserv_id=envelope.trusted_authserv_id, dns_down=dns_down)
        auth, converted = await self._convert(entry, alone, request)
        if self.dns is not None and not dns_down:
            self.dns.heard(auth.dns_trouble)
        return auth, converted

    def _judge(self, envelope: Envelope, auth: Authentication | None) -> dict[str, Refusal]:
        """The prefixes whose feed refuses the message (TemporaryFailure when DNS trouble leaves that open)."""
        if auth is None:
            return {}
        if envelope.held:
            for prefix, reason in envelope.held.items():
                log.warning("%s: released by an operator for %s, overriding: %s", envelope.id, prefix, reason,
                            extra={"spool_id": envelope.id, "prefixes": [prefix], "reason": reason})
            return {}
        from esmail.feeds import judge

        refused = {prefix: judge(self.config.feed(prefix), auth) for prefix in envelope.folders}
        return {prefix: refusal for prefix, refusal in refused.items() if refusal is not None}

    @staticmethod
    def _log_message(envelope: Envelope, size: int, outcome: str, started: float, objects: int = 0, inline_images: int = 0,
                     auth: Authentication | None = None, quarantined: list[str] = ()) -> None:
        """The one line per message: who sent what to whom, how it was authenticated, and how it ended."""
        seconds = round(time.monotonic() - started, 3)
        prefixes = list(envelope.folders) or [NO_PREFIX]
        skipped = f", {counted(inline_images, 'inline image')} skipped" if inline_images else ""
        held = f", quarantined for {','.join(quarantined)}" if quarantined and outcome != "quarantined" else ""
        results = f"; {auth.summary}" if auth is not None else ""
        extra = {"authentication": auth.summary} if auth is not None else {}
        log.log(logging.ERROR if outcome == "failed" else logging.INFO,
                "%s: %s; from %s <%s> for %s, %d bytes, %s, %.2fs%s%s%s", envelope.id, outcome, envelope.client or envelope.origin,
                envelope.sender, ",".join(prefixes), size, counted(objects, "object"), seconds, skipped, held, results,
                extra={"spool_id": envelope.id, "client": envelope.client, "sender": envelope.sender, "prefixes": prefixes,
                       "size": size, "outcome": outcome, "objects": objects, "seconds": seconds, **extra})

    async def _convert(self, entry: Entry, alone: bool, request: Request | None = None):
        """`convert_entry` in the pool (with a `request`, authenticated first); small entries that wait for it
        meanwhile are sent together (BATCH)."""
        size = entry.path.stat().st_size
        formats = self.config.formats_for(entry.envelope.folders)  # each CSV checked with them there (DESIGN §16)
        if alone or self.executor is None or size >= BATCH_BYTES:
            return await self._in_pool(alone, convert_entry, entry.path, self.config.csv.ascii_only, self.config.links.patterns,
                                       formats, request)
        converted = asyncio.get_running_loop().create_future()
        self._to_convert.append((entry.path, size, formats, request, converted))
        if self._senders < self.pool_size:
            self._senders += 1
            asyncio.create_task(self._send_conversions())
        return await converted

    async def _send_conversions(self) -> None:
        try:
            while self._to_convert:
                batch, size = [], 0
                while self._to_convert and len(batch) < BATCH and size < BATCH_BYTES:
                    batch.append(self._to_convert.popleft())
                    size += batch[-1][1]
                paths, _, formats, requests, futures = zip(*batch)
                try:
                    results = await self._in_pool(False, convert_entries, list(paths), self.config.csv.ascii_only,
                                                  self.config.links.patterns, list(formats), list(requests))
                except Exception as exc:  # the pool died (every entry in it shares the blame) or a bug
                    results = [exc] * len(batch)
                settle(list(futures), results)
        finally:
            self._senders -= 1

    async def _in_pool(self, alone: bool, function, *args):
        """`function(*args)` in the conversion pool, or `alone` in a process of its own.

        A dead process (over [worker] memory_limit, a crash in a native
        library, the OOM killer) raises ConversionCrashed and the pool is
        renewed. Every entry that was in the pool then shares the blame, so
        each is tried once more alone before it is given up on.
        """
        loop = asyncio.get_running_loop()
        if alone and self.executor is not None:
            with self._new_pool(workers=1) as own:
                try:
                    return await loop.run_in_executor(own, function, *args)
                except BrokenProcessPool:
                    raise ConversionCrashed("its conversion process died again, converting it alone") from None
        async with self._converting:  # the others wait here, not in the pool: they are not to blame if it dies
            executor = self.executor
            try:
                return await loop.run_in_executor(executor, function, *args)
            except BrokenProcessPool:
                if self.executor is executor:
                    self.executor = self._new_pool()
                    executor.shutdown(wait=False)
                raise ConversionCrashed("a conversion process died (over [worker] memory_limit, or killed); the pool was restarted") from None

    def _new_pool(self, workers: int = 0) -> ProcessPoolExecutor:
        return process_pool(self.config, workers, spill_dir=self.spool.tmp)

    async def _download(self, envelope: Envelope, urls: list[str]) -> list[tuple[str, bytes]]:
        """The files behind a message's links; a link that fails is logged and left out (DESIGN §6)."""
        prefixes = ",".join(envelope.folders) or NO_PREFIX
        if len(urls) > links.MAX_LINKS:
            log.warning("%s: %d links in the body; only the first %d are downloaded", envelope.id, len(urls), links.MAX_LINKS)
        files = []
        for result in await links.download_all(urls[: links.MAX_LINKS], self.config.links):
            metrics.LINK_DOWNLOADS.labels("failed" if isinstance(result, links.LinkFailed) else "ok").inc()
            if isinstance(result, links.LinkFailed):
                log.error("%s: link download failed for %s: %s", envelope.id, prefixes, result)
                report.problem("a link download failed", link=result.url, prefix=prefixes, reason=str(result), spool_id=envelope.id)
            else:
                log.info("%s: downloaded %s as %s (%d bytes)", envelope.id, result.url, result.name, len(result.data))
                files.append((result.name, result.data))
        return files

    async def attempt(self, entry_id: str) -> float | None:
        """One try at an entry: None when it is finished (stored, or in failed/), else the seconds to wait before the next."""
        self.waiting_for_store.discard(entry_id)
        try:
            entry = self.spool.entry(entry_id)  # read once, carried through the attempt
        except FileNotFoundError:  # finished meanwhile by another process (`esmail ingest`), or moved by `spool retry`
            return None
        STEP.set("waiting for the store (it was failing)")
        STORED.set([])
        try:
            await self.outage.wait_until_up()  # while the store is down, one probe decides for every entry
            await self.process(entry)
            return None
        except FileNotFoundError:  # the same, while this attempt ran
            return None
        except Exception as exc:  # TemporaryFailure (storage, spool), or a bug: both get the same bounded retries
            if not isinstance(exc, TemporaryFailure):
                log.exception("%s: unexpected error", entry_id)
                report.exception("unexpected error while processing a spool entry", spool_id=entry_id)
            crashed = isinstance(exc, ConversionCrashed)
            state = self.spool.record_attempt(entry, f"{type(exc).__name__}: {exc}" if not isinstance(exc, TemporaryFailure) else str(exc),
                                              crashed, STEP.get(), list(STORED.get()))
            if state.crashes >= MAX_CRASHES:
                await self._give_up(entry, CRASHED)
                return None
            if state.attempts >= self.config.worker.max_attempts:
                await self._give_up(entry, f"gave up after {counted(state.attempts, 'attempt')}; the last error: {state.last_error}")
                return None
            delay = backoff(state.attempts)
            metrics.RETRIES.inc()
            # WARNING the first time and every tenth: during an outage every queued entry fails, and once is news;
            # ERROR for what will not pass by itself (a permission), reported once
            loud = state.attempts == 1 or state.attempts % 10 == 0
            level = (logging.ERROR if isinstance(exc, NeedsFixing) else logging.WARNING) if loud else logging.INFO
            if isinstance(exc, NeedsFixing) and not self._told:
                self._told = True
                report.problem("esmail cannot write to its storage: a human must fix it", reason=str(exc), spool_id=entry_id)
            log.log(level, "%s: attempt %d of %d failed (%s); next in %.0fs", entry_id, state.attempts, self.config.worker.max_attempts, exc, delay)
            if isinstance(exc, StorageFailure):
                self.waiting_for_store.add(entry_id)
            return delay

    async def _give_up(self, entry: Entry, reason: str, started: float | None = None) -> list[Stored]:
        """A permanent failure: the raw message to inbox and unprocessable (when storage lets us), the entry to failed/."""
        started = started or time.monotonic()
        envelope, raw = entry.envelope, self.spool.message(entry)
        log.error("%s: %s", envelope.id, reason)
        report.problem("a message failed for good: its raw copy went to unprocessable, its entry to failed/",
                       prefix=",".join(envelope.folders) or NO_PREFIX, reason=reason, spool_id=envelope.id)
        files: list[FileRow] = []
        state = entry.state
        if state.inbox_header is None:  # a success after `spool retry` stores these same bytes in inbox, not a `-2` copy
            self.spool.record_inbox_header(entry, state.authentication["header"] if state.authentication else "")
        copy = inbox_copy(raw, state, None)
        try:
            files += await self._put_message(envelope, copy, (INBOX,), self._places(envelope))
            files += await self._put_message(envelope, raw, (UNPROCESSABLE,), self._places(envelope))
        except TemporaryFailure as exc:
            log.error("%s: cannot store the raw message either (%s); it is kept in %s", envelope.id, exc, self.spool.failed)
        attempts = entry.state.attempts
        self.spool.fail(entry, reason)
        metrics.MESSAGES.labels("failed").inc()
        self._log_message(envelope, len(raw), "failed", started, objects=len(files))
        await self._record(entry, raw, history.FAILED, started, max(attempts, 1), files,
                           {prefix: history.FAILED for prefix, _ in self._places(envelope)}, reason=reason)
        return [Stored(f.bucket, f.key, f.bytes) for f in files]

    @staticmethod
    def _places(envelope: Envelope) -> list[tuple[str, str]]:
        """(prefix, key folder) of each copy of the raw message: one per prefix, or `unknown/{time}` when it has none."""
        if envelope.folders:
            return [(prefix, f"{prefix}/{folder}") for prefix, folder in envelope.folders.items()]
        return [(NO_PREFIX, f"{NO_PREFIX}/{envelope.received_at:%Y%m%d-%H%M%S}")]

    async def _put(self, entry_id: str, logical: str, key: str, data: bytes, content_type: str, rule: str = "") -> Stored:
        """Store one object, and log it with the rule that routed it."""
        bucket = self.config.buckets.named(logical)
        STEP.set(f"storing {key.rsplit('/', 1)[-1]} in {bucket}")
        try:
            written = await self.store.put(bucket, key, data, content_type)
        except StorageFailure as exc:  # NeedsFixing: as it is, for the log and Rollbar
            self.outage.failed(exc)
            raise
        except TemporaryFailure as exc:
            self.outage.failed(exc)
            raise StorageFailure(str(exc)) from exc
        self.outage.worked()
        self._told = False
        if written.new:
            metrics.OBJECTS.labels(logical).inc()
            metrics.STORED_BYTES.labels(logical).inc(len(data))
        log.info("%s: %s %s/%s, %d bytes%s", entry_id, "stored" if written.new else "already stored", bucket, written, len(data),
                 f" ({rule})" if rule else "",
                 extra={"spool_id": entry_id, "bucket": bucket, "key": str(written), "bytes": len(data), "rule": rule})
        if (stored := STORED.get()) is not None:
            stored.append({"bucket": bucket, "key": str(written), "bytes": len(data)})
        return Stored(bucket, str(written), len(data))

    async def process_with_retries(self, entry_id: str, attempts: int, first_delay: float = 1.0) -> list[Stored]:
        """`process`, retried with exponential backoff on temporary failures; the last failure is raised."""
        for attempt in range(1, attempts + 1):
            entry = self.spool.entry(entry_id)
            STORED.set([])
            try:
                return await self.process(entry)
            except TemporaryFailure as exc:
                state = self.spool.record_attempt(entry, str(exc), isinstance(exc, ConversionCrashed), STEP.get(), list(STORED.get()))
                log.warning("%s: attempt %d failed: %s", entry_id, state.attempts, exc)
                if state.crashes >= MAX_CRASHES:
                    return await self._give_up(entry, CRASHED)
                if attempt == attempts:
                    raise
                await asyncio.sleep(backoff(attempt, first_delay))
        raise AssertionError("unreachable")


def inbox_copy(raw: bytes, state: EntryState, auth: Authentication | None) -> bytes:
    """The raw message as the inbox bucket keeps it: with the Authentication-Results it was first stored with
    (a give-up's, when there was one), else with these results; one copy, however often it is tried."""
    if state.inbox_header is not None:
        if not state.inbox_header:
            return raw
        from esmail.authentication import Authentication

        auth = Authentication(state.inbox_header, "", False)
    return auth.prepended(raw) if auth is not None else raw


def backoff(attempts: int, first: float = 1.0) -> float:
    """Seconds before the next try: 1, 2, 4, … capped at 10 minutes."""
    return min(first * 2 ** (attempts - 1), MAX_BACKOFF)


class Scheduler:
    """Feeds spool entries to the worker: in arrival order, a few at a time, each retried after its backoff.

    New entries come from `submit` (the SMTP receiver, right after spooling)
    and from a scan of the spool at start and every `rescan` seconds, which
    also finds entries that `esmail spool retry` moved back.
    """

    def __init__(self, worker: Worker, concurrency: int = IN_FLIGHT, rescan: float = 60.0, budget: int = IN_FLIGHT_BYTES):
        self.worker = worker
        self.concurrency = concurrency
        self.rescan = rescan
        self._budget = _Budget(budget)
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._known: set[str] = set()  # queued, in progress or waiting to retry
        self._running: set[asyncio.Task] = set()
        self._retries: dict[str, asyncio.TimerHandle] = {}
        worker.outage.on_back = self._store_back

    def submit(self, entry_id: str) -> None:
        if entry_id not in self._known:
            self._known.add(entry_id)
            self._ready.put_nowait(entry_id)

    async def run(self) -> None:
        """Process entries until cancelled."""
        scanner = asyncio.create_task(self._scan())
        prober = asyncio.create_task(self.worker.outage.watch(lambda: bool(self.worker.waiting_for_store)))
        slots = asyncio.Semaphore(self.concurrency)
        try:
            while True:
                entry_id = await self._ready.get()
                await slots.acquire()
                size = await self._budget.take(self._size(entry_id))
                task = asyncio.create_task(self._one(entry_id, slots, size))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            scanner.cancel()
            prober.cancel()
            for handle in self._retries.values():
                handle.cancel()

    async def _scan(self) -> None:
        while True:
            for entry_id in self.worker.spool.pending():
                self.submit(entry_id)
            await asyncio.sleep(self.rescan)

    def _size(self, entry_id: str) -> int:
        try:
            return os.stat(self.worker.spool.entry_path(entry_id)).st_size
        except OSError:  # gone meanwhile: the attempt will see
            return 0

    async def _one(self, entry_id: str, slots: asyncio.Semaphore, size: int) -> None:
        try:
            delay = await self.worker.attempt(entry_id)
        except Exception:  # the spool itself failed us (a full or broken disk): keep the entry, look again later
            log.exception("%s: cannot record the outcome in the spool", entry_id)
            report.exception("cannot record an entry's outcome in the spool", spool_id=entry_id)
            delay = MAX_BACKOFF
        finally:
            slots.release()
            self._budget.give(size)
        if delay is not None and entry_id in self.worker.waiting_for_store and self.worker.outage.error is None:
            delay = min(delay, 1.0)  # the store came back while this attempt failed on it
        if delay is None:
            self._known.discard(entry_id)
        else:
            self._retries[entry_id] = asyncio.get_running_loop().call_later(delay, self._retry, entry_id)

    def _store_back(self) -> None:
        """The store works again: the entries waiting for it go now (IN_FLIGHT at a time), not when their backoff ends."""
        for entry_id in sorted(self.worker.waiting_for_store):
            handle = self._retries.pop(entry_id, None)
            if handle is not None:
                handle.cancel()
                self._ready.put_nowait(entry_id)

    def _retry(self, entry_id: str) -> None:
        del self._retries[entry_id]
        self._ready.put_nowait(entry_id)

    async def finish(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) for the entries in progress; True if they all finished."""
        if not self._running:
            return True
        _, pending = await asyncio.wait(set(self._running), timeout=timeout)
        for task in pending:
            task.cancel()
        return not pending


class _Budget:
    """Bytes of messages the running entries may hold together; a message bigger than all of it runs alone."""

    def __init__(self, total: int):
        self.total = self.free = total
        self._freed = asyncio.Event()

    async def take(self, size: int) -> int:
        """Wait until `size` bytes (at most the whole budget) are free and take them; how many were taken."""
        size = min(size, self.total)
        while self.free < size:
            self._freed.clear()
            await self._freed.wait()
        self.free -= size
        return size

    def give(self, size: int) -> None:
        self.free += size
        self._freed.set()


def process_pool_size(config: Config) -> int:
    return config.worker.processes or os.cpu_count() or 1


def process_pool(config: Config, workers: int = 0, spill_dir: Path | None = None) -> ProcessPoolExecutor:
    """The pool that runs conversions off the event loop (spawned: no inherited locks or sockets), each process
    memory-capped; big outputs come back through files in `spill_dir` (see conversion.Converted)."""
    return ProcessPoolExecutor(max_workers=workers or process_pool_size(config), mp_context=multiprocessing.get_context("spawn"),
                               initializer=start_process, initargs=(config.worker.memory_limit, str(spill_dir) if spill_dir else None, os.getpid()))
