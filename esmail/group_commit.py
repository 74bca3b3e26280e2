"""Group commit: the messages of concurrent SMTP sessions share one flush to disk (DESIGN §10).

One fsync per message would halve the rate of small messages; a batch of
messages written meanwhile is flushed, renamed into the queue and the
queue folder fsync'd together, and each session answers 250 only after.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from esmail.errors import TemporaryFailure
from esmail.spool import Envelope, Spool, Written


class GroupCommit:
    """Spools the messages of concurrent sessions together, so that they share one flush to disk.

    Each message is written on the event loop (a page-cache copy: quick, and
    no thread hand-off per message) into an empty file made ahead in a
    thread; the flush runs in a thread, for every message written meanwhile.
    An idle server adds no delay; a busy one flushes in batches.
    """

    BLANKS = 64  # empty files kept ready: a few flushes' worth at max load

    def __init__(self, spool: Spool):
        self.spool = spool
        self._waiting: list[tuple[Written, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._blanks: list[Path] = []
        self._restocker: asyncio.Task | None = None

    async def accept(self, raw: bytes, prefixes: list[str], **fields) -> Envelope:
        blank = self._blanks.pop() if self._blanks else None
        try:
            written = self.spool.write(raw, prefixes, blank, **fields)
        except TemporaryFailure:
            if blank is not None and blank.exists():  # refused before it was written to (no space): still blank
                self._blanks.append(blank)
            raise
        if len(self._blanks) < self.BLANKS // 2 and (self._restocker is None or self._restocker.done()):
            self._restocker = asyncio.create_task(self._restock())
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((written, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await future
        return written.envelope

    async def close(self) -> None:
        """Remove the blanks not used (once the sessions are over)."""
        if self._restocker is not None:
            await self._restocker
        for path in self._blanks:
            path.unlink(missing_ok=True)
        self._blanks.clear()

    async def _restock(self) -> None:
        self._blanks += await asyncio.to_thread(self.spool.make_blanks, self.BLANKS - len(self._blanks))

    async def _flush(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            written = [each for each, _ in batch]
            failure = None
            try:  # the flush, the renames and the fsync of queue/ wait for the disk: one trip to a thread
                await asyncio.to_thread(self.spool.publish, written)
            except TemporaryFailure as exc:
                failure = exc
            except Exception as exc:  # a bug: these messages are not ours either
                self.spool.discard(written)
                failure = exc
            for _, future in batch:
                if future.done():
                    continue
                if failure:
                    future.set_exception(failure)
                else:
                    future.set_result(None)
