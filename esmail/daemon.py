"""`esmail serve`: the SMTP receiver and the worker in one process, started and stopped in the safe order.

Start: the spool is scanned (what a crash left is processed again), then the
port opens. Stop (SIGTERM, SIGINT: see cli): the port closes, sessions finish their
message or are told 421, entries in progress get a moment to finish; any
entry not finished stays in the spool for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from esmail import feeds, logs, metrics, report
from esmail.config import Config, describe_duration
from esmail.errors import ActionRefused
from esmail import history
from esmail.history import open_history, timestamp
from esmail.imap import Mailbox, login_for
from esmail.receivers import Receivers
from esmail.smtp import Receiver, SmtpServer
from esmail.group_commit import GroupCommit
from esmail.spool import Spool
from esmail.store import open_store
from esmail.systemd import Notifier
from esmail.worker import Scheduler, Worker

log = logging.getLogger(__name__)

WORKER_GRACE = 10.0  # seconds entries in progress may take to finish at shutdown
HOUSEKEEPING_EVERY = 3600.0  # seconds between sweeps of the quarantine
LATE_CHECK_EVERY = 60.0  # seconds between looks at the feeds' last messages (sooner for a feed expecting mail more often)


class Daemon:
    """`listen=False`: `esmail poll`, the IMAP mailboxes and the worker without an SMTP server."""

    def __init__(self, config: Config, listen: bool = True):
        self.config = config
        self.spool = Spool(config.spool.path, config.spool.min_free)
        self.store = open_store(config)
        self.history = open_history(config)
        self.dns = None  # whether DNS answers now: looked up only where feeds are declared (DESIGN §12)
        if config.feeds:
            from esmail.dns_health import DnsHealth, probe_name

            self.dns = DnsHealth(config.dns, probe_name(config))
        self.worker = Worker(config, self.spool, self.store, processes=True, history=self.history, dns=self.dns)
        self.scheduler = Scheduler(self.worker)
        self.committer = GroupCommit(self.spool)
        self.smtp: SmtpServer | Receivers | None = None
        receivers = config.smtp.processes or os.cpu_count() or 1
        if listen and receivers > 1:  # N processes on the port; this one only supervises them (esmail.receivers)
            self.smtp = Receivers(config, receivers, self.scheduler.submit, logs.current())
        elif listen:
            known = frozenset(feed.prefix for feed in config.feeds) if config.smtp.unknown_feeds == "reject" else None
            self.smtp = SmtpServer(config.smtp, Receiver(config.smtp, self.committer, self.scheduler.submit, known))
        self.mailboxes = [Mailbox(box, login_for(box, config.secrets), self.spool, self._submit_threadsafe, config.smtp.domains,
                                  config.smtp.max_message_size) for box in config.imap]
        self.monitor = None
        if config.http.listen:  # the page's imports (Jinja2) only where it is served
            from esmail.monitor import Monitor

            self.monitor = Monitor(self)
        self.notifier = Notifier()
        self._stopping = asyncio.Event()

    async def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Serve until `stop()`; 0 on a clean stop. `on_ready` is called once the port listens."""
        stale = self.spool.remove_stale()
        if stale:
            log.warning("removed %d unacknowledged partial messages a crash left in %s", stale, self.spool.tmp)
        remembering = asyncio.create_task(self.worker.remember_checks())  # DESIGN §16's memory, read beside the work
        scheduler = asyncio.create_task(self.scheduler.run())
        await self.history.declare([feed.prefix for feed in self.config.feeds])
        housekeeping = asyncio.create_task(self._housekeeping())
        watching = asyncio.create_task(self._watch_feeds())
        requests = asyncio.create_task(self._take_requests())
        dns = asyncio.create_task(self.dns.watch()) if self.dns is not None else None
        heartbeat = None
        self._loop = asyncio.get_running_loop()
        watchers = ThreadPoolExecutor(max(len(self.mailboxes), 1), thread_name_prefix="imap")
        polling = [self._loop.run_in_executor(watchers, mailbox.run) for mailbox in self.mailboxes]
        try:
            if self.smtp:
                await self.smtp.start()
            if self.monitor:
                await self.monitor.start()
            self._announce()
            self.notifier.notify("READY=1", f"STATUS={self.status()}")
            heartbeat = asyncio.create_task(self._heartbeat())
            if on_ready:
                on_ready()
            await self._stopping.wait()
            log.info("shutting down: no new connections; sessions finish their message")
            self.notifier.notify("STOPPING=1", "STATUS=stopping: sessions finish their message")
            if self.smtp:
                await self.smtp.stop()
                await self.committer.close()
        finally:
            for mailbox in self.mailboxes:
                mailbox.stop()
            if polling:
                await asyncio.wait(polling)
            watchers.shutdown()
            if self.monitor:
                await self.monitor.stop()
            if heartbeat is not None:
                heartbeat.cancel()
            housekeeping.cancel()
            remembering.cancel()
            watching.cancel()
            requests.cancel()
            if dns is not None:
                dns.cancel()
            scheduler.cancel()
            if not await self.scheduler.finish(WORKER_GRACE):
                log.warning("entries still in progress stay in the spool for the next start")
            await asyncio.to_thread(self.worker.close)
            await asyncio.to_thread(self.history.close)
            await self.store.close()
            self.notifier.close()
        log.info("stopped; %s in the spool", logs.counted(len(self.spool.pending()), "entry waits", "entries wait"))
        return 0

    def stop(self) -> None:
        """Begin a clean shutdown (the signal handler; thread-safe callers use loop.call_soon_threadsafe)."""
        self._stopping.set()

    def _submit_threadsafe(self, entry_id: str) -> None:
        """A mailbox thread spooled a message: hand it to the scheduler on the loop."""
        self._loop.call_soon_threadsafe(self.scheduler.submit, entry_id)

    def status(self) -> str:
        """One line for `systemctl status`: the queue as the spool holds it."""
        where = f"listening on {self.config.smtp.listen}" if self.smtp else f"polling {logs.counted(len(self.mailboxes), 'mailbox', 'mailboxes')}"
        return f"{len(self.spool.pending())} queued, {len(self.spool.failed_ids())} failed; {where}"

    async def _heartbeat(self) -> None:
        """Watchdog keep-alives and STATUS= updates, from the event loop itself."""
        while True:
            await asyncio.sleep(self.notifier.interval)
            lines = ["WATCHDOG=1"] if self.notifier.watchdog else []
            self.notifier.notify(*lines, f"STATUS={self.status()}")

    async def _housekeeping(self) -> None:
        """At start and hourly: quarantined entries past [spool] quarantine_days are dropped; daily: the history pruned."""
        pruned_at = 0.0
        while True:
            for envelope in await asyncio.to_thread(self.spool.drop_quarantined, self.config.spool.quarantine_days):
                reasons = "; ".join(f"{p}: {r}" for p, r in envelope.held.items())
                log.info("%s: dropped from quarantine after %g days (%s); its inbox copy stays", envelope.id,
                         self.config.spool.quarantine_days, reasons, extra={"spool_id": envelope.id, "prefixes": list(envelope.held)})
                await self.history.dropped(envelope.id, list(envelope.held),
                                           f"dropped from quarantine after {self.config.spool.quarantine_days:g} days, never released "
                                           f"({reasons}); its inbox copy stays")
            if time.monotonic() - pruned_at >= 86400 or not pruned_at:
                pruned_at = time.monotonic()
                await self.history.prune(self.config.history.keep_days)
            await asyncio.sleep(HOUSEKEEPING_EVERY)

    async def _watch_feeds(self) -> None:
        """Feeds that went quiet: /metrics says so always; the log and Rollbar once when one becomes late, and when it recovers."""
        watched = [feed for feed in self.config.feeds if feed.expected_every]
        if not self.config.feeds:
            return
        every = min([LATE_CHECK_EVERY] + [max(feed.expected_every / 4, 0.5) for feed in watched])
        late: set[str] = set()
        while True:
            rows = await asyncio.to_thread(self.history.prefixes)
            now = time.time()
            for feed in self.config.feeds:
                row = rows.get(feed.prefix)
                last = timestamp(row["last_message"]) if row else None
                if last is not None:
                    metrics.FEED_LAST_MESSAGE.labels(feed.prefix).set(last)
                if not feed.expected_every:
                    continue
                is_late = feeds.late(feed, last, timestamp(row["first_declared"]) if row else None, now)
                metrics.FEED_LATE.labels(feed.prefix).set(int(is_late))
                quiet = f"nothing since {row['last_message']}" if last else "nothing yet"
                if is_late and feed.prefix not in late:
                    first = await self.history.mark_late(feed.prefix, history.now_text())  # one host says it: the first to mark it
                    if first is None:
                        continue  # the history cannot say now; look again next time
                    late.add(feed.prefix)
                    if first:
                        log.warning("feed %s is late: %s, and it expects mail every %s", feed.prefix, quiet,
                                    describe_duration(feed.expected_every), extra={"prefixes": [feed.prefix]})
                        report.problem("a feed is late", "warning", prefix=feed.prefix, last_message=row["last_message"] if last else "never")
                elif not is_late and feed.prefix in late:
                    forgot = await self.history.mark_on_time(feed.prefix)
                    if forgot is None:
                        continue
                    late.discard(feed.prefix)
                    if forgot:
                        log.info("feed %s is on time again: a message arrived %s", feed.prefix, row["last_message"],
                                 extra={"prefixes": [feed.prefix]})
            await asyncio.sleep(every)

    async def _take_requests(self) -> None:
        """Retries and releases that the page of another host asked of this one (a shared history, DESIGN §17)."""
        if not self.history.shared:
            return
        waiting = asyncio.Event()
        self.history.watch_requests(lambda: self._loop.call_soon_threadsafe(waiting.set))
        while True:
            await waiting.wait()
            waiting.clear()
            for request in await asyncio.to_thread(self.history.requests):
                try:
                    outcome = await self.act(request["id"], request["action"], request["by"], f" on {request['requested_from']}")
                except ActionRefused as exc:
                    outcome = f"not done: {exc}"
                await self.history.done(request["seq"], outcome)

    async def act(self, entry_id: str, action: str, by: str, where: str = ", on the page") -> str:
        """Retry a failed entry or release a quarantined one, for a person (`by`, the page's user name; `where` they
        asked, for the log): back to the queue and to the worker at once, and `by` into the outcome it comes to.
        What came of it, for people; ActionRefused when the entry is not where the action needs it."""
        spool = self.spool
        if action == "retry":
            if entry_id not in await asyncio.to_thread(spool.failed_ids):
                raise ActionRefused(f"{entry_id} is not waiting in failed/ on {self.history.host} (already retried?)")
            await asyncio.to_thread(spool.retry, [entry_id], by)
            outcome = "queued again: the worker takes it now"
        elif action == "release":
            if entry_id not in await asyncio.to_thread(spool.quarantined_ids):
                raise ActionRefused(f"{entry_id} is not waiting in quarantine/ on {self.history.host} (already released?)")
            try:
                await asyncio.to_thread(spool.release, [entry_id], by)
            except FileExistsError:
                raise ActionRefused(f"{entry_id} is still being processed; try again in a moment") from None
            outcome = "released: processed now as if its feed had let it through"
        else:
            raise ActionRefused(f"no such action: {action}")
        log.info("%s: %s by %s%s", entry_id, "retried" if action == "retry" else "released", by, where, extra={"spool_id": entry_id})
        self.scheduler.submit(entry_id)
        return outcome

    def _announce(self) -> None:
        smtp = self.config.smtp
        for mailbox in self.mailboxes:
            log.info("watching the mailbox %s (IDLE, and a poll every %.0fs)", mailbox.config, mailbox.config.poll_interval)
        if self.smtp is None:
            log.info("no SMTP server (esmail poll); spool %s, %s waiting", self.spool.path, logs.counted(len(self.spool.pending()), "entry", "entries"))
            return
        for feed in self.config.feeds:
            who = ", ".join(feed.senders) or "anyone"
            log.info("feed %s%s: from %s%s", feed.prefix, f" ({feed.name})" if feed.name else "", who,
                     ", authenticated" if feed.authenticated else "")
        if not smtp.domains:
            log.warning("[smtp] domains is empty: mail for any domain is accepted (fine on localhost, an open door on the internet)")
        log.info("listening on %s (port %d), spool %s, %s waiting", smtp.listen, self.smtp.port, self.spool.path,
                 logs.counted(len(self.spool.pending()), "entry", "entries"))
        if self.monitor:
            log.info("the page, /healthz and /metrics on http://%s (port %d)", self.config.http.listen, self.monitor.port)
