"""Group commit: work that waits on the disk is done for many callers at once (DESIGN §10).

One fsync per message would halve the rate of small messages; a batch of
messages written meanwhile is flushed, renamed into the queue and the
queue folder fsync'd together, and each session answers 250 only after.
The worker's side does the same (`Batches`): the local store's objects of
concurrent entries share their flushes, and finished entries leave the
spool together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from esmail.errors import TemporaryFailure
from esmail.spool import Envelope, Spool, Written

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batches(Generic[Item, Result]):
    """`await submit(item)`: `handle(items)` runs in a thread for every item submitted while the last batch ran.

    An idle caller waits for one thread trip; busy callers share one. `handle`
    returns one result per item (None: None for each), an exception instance
    being raised to that item's caller; an exception it raises goes to every
    caller of the batch.
    """

    def __init__(self, handle: Callable[[list[Item]], list[Result | BaseException] | None], thread=asyncio.to_thread):
        self.handle = handle
        self.thread = thread  # `await thread(handle, items)` runs it: a thread of the caller's own, if it keeps one
        self._waiting: list[tuple[Item, asyncio.Future]] = []
        self._runner: asyncio.Task | None = None

    async def submit(self, item: Item) -> Result:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                results = await self.thread(self.handle, [item for item, _ in batch]) or [None] * len(batch)
            except Exception as exc:  # the batch's callers get it
                results = [exc] * len(batch)
            settle([future for _, future in batch], results)


def settle(futures: list[asyncio.Future], results: list) -> None:
    """Each future gets its result, or its exception raised, unless it was given up on meanwhile."""
    for future, result in zip(futures, results):
        if future.done():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


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
        self._batches: Batches[Written, None] = Batches(self._publish)
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
        await self._batches.submit(written)
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

    def _publish(self, written: list[Written]) -> None:
        """The flush, the renames and the fsync of queue/ for a batch (in a thread): they wait for the disk."""
        try:
            self.spool.publish(written)
        except TemporaryFailure:
            raise
        except Exception:  # a bug: these messages are not ours either
            self.spool.discard(written)
            raise
