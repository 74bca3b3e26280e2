"""The worker: a spooled message → every object stored → the spool entry removed.

The conversion (`convert`) is a pure function of the raw message, run in a
process pool so that the event loop stays free; storing happens on the loop.
Because keys are fixed by the envelope and the store never overwrites, a
message processed twice (a crash, a replay) yields the same objects once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, replace

from esmail import mail
from esmail.chain import INBOX, UNPROCESSABLE, Output, route
from esmail.config import Config
from esmail.errors import TemporaryFailure
from esmail.keys import unique_names
from esmail.spool import Envelope, Spool
from esmail.store import Store

log = logging.getLogger(__name__)

NO_PREFIX = "unknown"


def convert(raw: bytes, ascii_only: bool = False) -> list[Output]:
    """Every output of one message, named uniquely per bucket (`export-2.csv` for a repeat)."""
    msg = mail.parse(raw)
    outputs = [out for att in mail.attachments(msg) for out in route(att.name, att.data, ascii_only)]
    names = unique_names((out.bucket, out.name) for out in outputs)
    return [replace(out, name=name) for out, (_, name) in zip(outputs, names)]


@dataclass(frozen=True)
class Stored:
    bucket: str  # the real bucket name
    key: str
    size: int

    def __str__(self) -> str:
        return f"{self.bucket}\t{self.key}\t{self.size}"


class Worker:
    def __init__(self, config: Config, spool: Spool, store: Store, executor: Executor | None = None):
        self.config = config
        self.spool = spool
        self.store = store
        self.executor = executor

    async def process(self, entry_id: str) -> list[Stored]:
        """Store everything one spool entry yields, then remove it; TemporaryFailure leaves it queued."""
        started = time.monotonic()
        envelope, raw = self.spool.load(entry_id)
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self.executor, convert, raw, self.config.csv.ascii_only)
        except Exception as exc:  # the message itself broke the parser: keep it whole, in failed/ too
            return await self._give_up(envelope, raw, f"cannot process the message: {type(exc).__name__}: {exc}")
        stored = []
        if not envelope.folders:
            log.warning("%s: no usable recipient; the message goes whole to unprocessable", entry_id)
            for bucket in (INBOX, UNPROCESSABLE):
                stored.append(await self._put(bucket, f"{self._message_folders(envelope)[0]}/{entry_id}.eml", raw, "message/rfc822"))
        for prefix, folder in envelope.folders.items():
            stored.append(await self._put(INBOX, f"{prefix}/{folder}/{entry_id}.eml", raw, "message/rfc822"))
            for out in outputs:
                stored.append(await self._put(out.bucket, f"{prefix}/{folder}/{out.name}", out.data, out.content_type))
                if out.reason:
                    log.warning("%s: %s/%s/%s is unprocessable: %s", entry_id, prefix, folder, out.name, out.reason)
        self.spool.done(entry_id)
        log.info("%s: %d objects stored for %s in %.2fs", entry_id, len(stored), ",".join(envelope.folders) or NO_PREFIX, time.monotonic() - started)
        return stored

    async def _give_up(self, envelope: Envelope, raw: bytes, reason: str) -> list[Stored]:
        """A permanent failure: the raw message to inbox and unprocessable, the entry to failed/."""
        log.error("%s: %s", envelope.id, reason)
        stored = []
        for folder in self._message_folders(envelope):
            for bucket in (INBOX, UNPROCESSABLE):
                stored.append(await self._put(bucket, f"{folder}/{envelope.id}.eml", raw, "message/rfc822"))
        self.spool.fail(envelope.id, reason)
        return stored

    @staticmethod
    def _message_folders(envelope: Envelope) -> list[str]:
        if envelope.folders:
            return [f"{prefix}/{folder}" for prefix, folder in envelope.folders.items()]
        return [f"{NO_PREFIX}/{envelope.received_at:%Y%m%d-%H%M%S}"]

    async def _put(self, logical: str, key: str, data: bytes, content_type: str) -> Stored:
        bucket = self.config.buckets.named(logical)
        written = await self.store.put(bucket, key, data, content_type)
        return Stored(bucket, written, len(data))

    async def process_with_retries(self, entry_id: str, attempts: int, first_delay: float = 1.0, max_delay: float = 600.0) -> list[Stored]:
        """`process`, retried with exponential backoff on temporary failures; the last failure is raised."""
        delay = first_delay
        for attempt in range(1, attempts + 1):
            try:
                return await self.process(entry_id)
            except TemporaryFailure as exc:
                state = self.spool.record_attempt(entry_id, str(exc))
                log.warning("%s: attempt %d failed: %s", entry_id, state.attempts, exc)
                if attempt == attempts:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_delay)
        raise AssertionError("unreachable")

