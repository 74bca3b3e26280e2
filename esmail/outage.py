"""A storage outage as the worker lives through it: one probe at a time while the store is down, and every
entry that waits for it woken at once when it is back.

Without this, each waiting entry tries the store on its own backoff timer
(up to 10 minutes apart): N entries probe a dead store N times, and after a
long outage the backlog drains over as long as the last backoff. Here the
first failure marks the store down; from then on one probe at a time asks it
(`store.check`: a small write), whenever an entry wants the store and every
PROBE_EVERY seconds while entries wait, and everyone else waits for that
verdict. The first success marks it up and calls `on_back`.

Only a failed probe makes it an outage in the log: a failure that one key
meets (a file where its folder should be, a policy on one prefix) while the
probe's write works is that entry's, said by its own retries, not a store
going down and up at each of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from esmail.errors import StorageFailure, TemporaryFailure

log = logging.getLogger(__name__)

PROBE_EVERY = 5.0  # seconds between probes of a store that is down, while entries wait for it


class Outage:
    def __init__(self, probe: Callable[[], Awaitable[None]]):
        self.probe = probe
        self.error: str | None = None  # why the store is down; None while it works
        self.on_back: Callable[[], None] = lambda: None
        self._verdict: asyncio.Task | None = None
        self._said = False  # a probe confirmed the outage, and the log said so

    def failed(self, exc: TemporaryFailure) -> None:
        self.error = str(exc)

    def worked(self) -> None:
        if self.error is not None:
            self.error = None
            if self._said:
                self._said = False
                log.warning("the store works again: the entries waiting for it start now")
            self.on_back()

    def _confirmed(self, exc: TemporaryFailure) -> None:
        self.failed(exc)
        if not self._said:
            self._said = True
            log.warning("the store fails (%s): one probe at a time until it works again", exc)

    async def wait_until_up(self) -> None:
        """Return at once while the store works; while it is down, the verdict of the one probe (StorageFailure if it failed)."""
        if self.error is None:
            return
        if self._verdict is None or self._verdict.done():
            self._verdict = asyncio.create_task(self._probe())
            self._verdict.add_done_callback(lambda task: task.cancelled() or task.exception())  # the waiters have it
        await asyncio.shield(self._verdict)

    async def watch(self, waiting: Callable[[], bool]) -> None:
        """Until cancelled: probe a store that is down every PROBE_EVERY seconds while `waiting()` (entries wait for it)."""
        while True:
            await asyncio.sleep(PROBE_EVERY)
            if self.error is not None and waiting():
                try:
                    await self.wait_until_up()
                except TemporaryFailure:
                    continue

    async def _probe(self) -> None:
        try:
            await self.probe()
        except StorageFailure as exc:  # NeedsFixing: as it is
            self._confirmed(exc)
            raise
        except TemporaryFailure as exc:
            self._confirmed(exc)
            raise StorageFailure(self.error) from exc
        self.worked()
