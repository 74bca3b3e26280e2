"""`[http] listen`: `/healthz` for a load balancer or uptime check, `/metrics` for Prometheus, and the page (esmail.web).

Off by default. Health is 200 only when mail can be taken and kept: the SMTP
port listens, a message could be spooled now, the last write to storage
succeeded (or none was needed yet), and every IMAP mailbox could be read at
its last try; otherwise 503 with the reasons.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from esmail import metrics, web as page
from esmail.errors import CannotListen, TemporaryFailure

if TYPE_CHECKING:
    from esmail.daemon import Daemon


class Monitor:
    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        http = daemon.config.http
        app = web.Application()
        self.logins = page.protect(app, daemon.config.secrets.get(http.password_env) if http.password_env else None, daemon.spool.path)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        page.setup(app, daemon)
        self.runner = web.AppRunner(app, access_log=None)
        self.port: int | None = None

    async def start(self) -> None:
        host, port = self.daemon.config.http.listen
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise CannotListen("[http] listen", self.daemon.config.http.listen, exc) from None
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def healthz(self, request: web.Request) -> web.Response:
        problems, notes = await asyncio.to_thread(lambda: (self.problems(), self.notes()))
        if problems:
            return web.json_response({"status": "unhealthy", "problems": problems, **({"notes": notes} if notes else {})}, status=503)
        return web.json_response({"status": "ok", **({"notes": notes} if notes else {})})

    def notes(self) -> list[str]:
        """What is wrong but does not stop mail: the history's database away (rows wait in the spool); DNS not answering
        (feeds that need no sender check take their mail without it)."""
        found = []
        history = self.daemon.history
        problem, waiting = history.problem(), history.backlog()
        if problem is not None:
            found.append(f"history: unreachable ({waiting} row{'' if waiting == 1 else 's'} waiting) {problem.removeprefix('unreachable ')}")
        if self.daemon.dns is not None and self.daemon.dns.problem():
            found.append(self.daemon.dns.problem())
        return found

    def problems(self) -> list[str]:
        """What stops esmail from taking mail and storing it now (empty: healthy)."""
        found = []
        if self.daemon.smtp is not None and not self.daemon.smtp.listening:
            found.append("the SMTP port is not listening")
        if self.daemon.smtp is not None and self.daemon.smtp.tls_problem:
            found.append(self.daemon.smtp.tls_problem)
        try:
            self.daemon.spool.check_writable()
        except TemporaryFailure as exc:
            found.append(str(exc))
        if self.daemon.worker.store_error:
            found.append(f"the last store write failed: {self.daemon.worker.store_error}")
        found += [f"the mailbox {mailbox.config} cannot be read: {mailbox.problem}" for mailbox in self.daemon.mailboxes if mailbox.problem]
        return found

    async def metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self._scrape)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _scrape(self) -> bytes:
        spool = self.daemon.spool
        metrics.SPOOL_DEPTH.set(len(spool.pending()))
        metrics.SPOOL_OLDEST.set(spool.oldest_age())
        metrics.SPOOL_FAILED.set(len(spool.failed_ids()))
        metrics.SPOOL_QUARANTINED.set(len(spool.quarantined_ids()))
        metrics.HISTORY_BACKLOG.set(self.daemon.history.backlog())
        return generate_latest(metrics.REGISTRY)
