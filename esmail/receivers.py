"""`[smtp] processes = N` (DESIGN §15): N receiver processes on one port, supervised by the daemon.

One process uses one core. With N > 1 the daemon runs no SMTP server
itself: it spawns N receivers, each with its own event loop, its own
listening socket on the same port (SO_REUSEPORT: the kernel spreads the
connections) and its own group commit into the one spool. A receiver tells
the daemon what it spooled (the worker takes it at once) and, every second,
how many replies it gave (so /metrics counts every process's replies in
one series). A receiver that dies is logged and started again; whatever it
answered 250 for is in the spool. SIGTERM to the daemon stops them all, each
letting its sessions finish their message; a receiver whose daemon is gone
stops by itself.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection

from esmail import metrics
from esmail.config import Address, Config
from esmail.errors import CannotListen

log = logging.getLogger(__name__)

COUNTS_EVERY = 1.0  # seconds between a receiver's reports of its reply counts
RESTART_AT_MOST = 60.0  # seconds between restarts of a receiver that keeps dying
# The counters a receiver counts, reported to the daemon, whose /metrics serves them
FORWARDED = {"smtp_replies": metrics.SMTP_REPLIES, "tls_failures": metrics.TLS_FAILURES}


class Receivers:
    """The supervisor: the same face as SmtpServer (start, stop, listening, port, reload_tls) for the daemon."""

    def __init__(self, config: Config, count: int, on_spooled: Callable[[str], None], log_settings: tuple[str, str]):
        self.config = config
        self.count = count
        self.on_spooled = on_spooled
        self.log_settings = log_settings
        self._children: list[_Child | None] = [None] * count
        self._reserved: socket.socket | None = None
        self._stopping = False
        self.port = 0
        self.tls_problem: str | None = None  # as SmtpServer's; a receiver reloads in its own process, and logs a failure there

    @property
    def listening(self) -> bool:
        return not self._stopping and all(child is not None and child.ready and child.process.is_alive() for child in self._children)

    @property
    def pids(self) -> list[int]:
        return [child.process.pid for child in self._children if child is not None]

    async def start(self) -> None:
        self._reserve_port()
        try:
            await asyncio.gather(*(self._spawn(index) for index in range(self.count)))
        except BaseException:
            await self.stop(grace=0)
            raise
        log.info("%d receiver processes listen on port %d (pids %s)", self.count, self.port, ", ".join(map(str, self.pids)))

    def _reserve_port(self) -> None:
        """Bind (not listen) the address with SO_REUSEPORT: a port 0 becomes a real one, and no other program takes it."""
        host, port = self.config.smtp.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise CannotListen("[smtp] listen", self.config.smtp.listen, exc) from None
        self._reserved = sock
        self.port = sock.getsockname()[1]

    async def _spawn(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = multiprocessing.Pipe(duplex=False)
        config = replace(self.config, smtp=replace(self.config.smtp, listen=Address(self.config.smtp.listen.host, self.port)))
        process = multiprocessing.get_context("spawn").Process(
            target=run_receiver, args=(config, index, theirs, self.log_settings, os.getpid()), name=f"esmail-receiver-{index}",
            daemon=False)
        process.start()
        theirs.close()
        child = _Child(index, process, ours, time.monotonic())
        self._children[index] = child
        started = loop.create_future()
        loop.add_reader(ours.fileno(), self._message, child, started)
        loop.add_reader(process.sentinel, self._ended, child)
        error = await started
        if error:
            raise CannotListen("[smtp] listen", self.config.smtp.listen, OSError(*error) if isinstance(error, tuple) else OSError(0, error))

    def _message(self, child: "_Child", started: asyncio.Future | None = None) -> bool:
        """What a receiver says: ready (or why not), the entries it spooled, its counts; False once it can say no more."""
        try:
            kind, value = child.pipe.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(child.pipe.fileno())
            if started is not None and not started.done():
                started.set_result(f"receiver process {child.index} ended before it listened")
            return False
        if kind == "spooled":
            for entry_id in value:
                self.on_spooled(entry_id)
        elif kind == "counts":
            self._count(value)
        elif kind == "ready":
            child.ready = True
            if started is not None and not started.done():
                started.set_result(None)
        elif kind == "error" and started is not None and not started.done():
            started.set_result(value)
        return True

    @staticmethod
    def _count(counts: dict) -> None:
        for (name, labels), n in counts.items():
            counter = FORWARDED[name]
            (counter.labels(**dict(labels)) if labels else counter).inc(n)

    def _ended(self, child: "_Child") -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(child.process.sentinel)
        child.process.join(5)  # it has ended (its sentinel says so): reap it, for its exit code
        if self._stopping or self._children[child.index] is not child:
            return
        lived = time.monotonic() - child.started
        child.failures = 0 if lived > RESTART_AT_MOST else child.failures + 1
        delay = min(2.0 ** child.failures - 1, RESTART_AT_MOST)
        log.warning("receiver process %d (pid %d) ended with exit code %s after %.0fs; starting another in %.0fs",
                    child.index, child.process.pid, child.process.exitcode, lived, delay)
        loop.call_later(delay, lambda: loop.create_task(self._respawn(child)))

    async def _respawn(self, dead: "_Child") -> None:
        if self._stopping:
            return
        try:
            await self._spawn(dead.index)
        except CannotListen as exc:
            log.error("receiver process %d could not start again: %s", dead.index, exc)
            replacement = self._children[dead.index]
            if replacement is not None:
                replacement.failures = dead.failures
            return
        self._children[dead.index].failures = dead.failures
        log.info("receiver process %d started again (pid %d)", dead.index, self._children[dead.index].process.pid)

    def reload_tls(self) -> None:
        """SIGHUP: every receiver reads the certificate again."""
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    async def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to each receiver (it lets sessions finish their message), then wait; whatever is left is killed."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        children = [child for child in self._children if child is not None]
        for child in children:
            if child.process.is_alive():
                child.process.terminate()
        deadline = time.monotonic() + grace + 5
        while any(child.process.is_alive() for child in children) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for child in children:
            if child.process.is_alive():
                log.warning("receiver process %d did not stop in time; killed", child.index)
                child.process.kill()
            child.process.join(5)
            for fd in (child.pipe.fileno(), child.process.sentinel):
                loop.remove_reader(fd)
            while child.pipe.poll() and self._message(child):  # what it said last: its final counts, an entry spooled at the end
                pass
            child.pipe.close()
        if self._reserved is not None:
            self._reserved.close()


class _Child:
    def __init__(self, index: int, process, pipe: Connection, started: float):
        self.index, self.process, self.pipe, self.started = index, process, pipe, started
        self.ready = False
        self.failures = 0


# --- in a receiver process ----------------------------------------------------------------


def run_receiver(config: Config, index: int, pipe: Connection, log_settings: tuple[str, str], parent: int) -> None:
    """A receiver process: the SMTP server and its group commit, until SIGTERM or the daemon is gone."""
    from esmail import logs
    from esmail.orphans import die_with_parent

    die_with_parent(parent, signal.SIGTERM)  # a daemon killed -9 takes its receivers along (they let sessions finish)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the daemon decides
    logs.setup(*log_settings)
    try:
        asyncio.run(_receive(config, index, pipe))
    except CannotListen as exc:
        pipe.send(("error", (exc.errno, exc.strerror)))


async def _receive(config: Config, index: int, pipe: Connection) -> None:
    from esmail import report
    from esmail.group_commit import GroupCommit
    from esmail.smtp import Receiver, SmtpServer
    from esmail.spool import Spool

    report.setup(config)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    spool = Spool(config.spool.path, config.spool.min_free)
    committer = GroupCommit(spool)
    known = frozenset(feed.prefix for feed in config.feeds) if config.smtp.unknown_feeds == "reject" else None
    handover = _Handover(pipe, loop)
    receiver = Receiver(config.smtp, committer, handover.spooled, known)
    server = SmtpServer(config.smtp, receiver, reuse_port=True)
    await server.start()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tls)
    loop.add_reader(pipe.fileno(), stopping.set)  # the daemon never writes: readable means it is gone
    pipe.send(("ready", os.getpid()))
    reported: dict[tuple[str, tuple], float] = {}
    counting = asyncio.create_task(_report_counts(pipe, reported))
    try:
        await stopping.wait()
    finally:
        counting.cancel()
        await server.stop()
        await committer.close()
        handover.send()
        _send_counts(pipe, reported)
        report.flush()


class _Handover:
    """Tells the daemon what was spooled: the entries of a group commit in one message, sent once their sessions have run.

    A pipe message per entry (pickled, a write each) was 5% of a receiver's
    time for small messages; a group commit answers its sessions together,
    so their ids go in one.
    """

    def __init__(self, pipe: Connection, loop: asyncio.AbstractEventLoop):
        self.pipe = pipe
        self.loop = loop
        self._ids: list[str] = []

    def spooled(self, entry_id: str) -> None:
        if not self._ids:
            self.loop.call_soon(self.send)
        self._ids.append(entry_id)

    def send(self) -> None:
        ids, self._ids = self._ids, []
        if not ids:
            return
        try:
            self.pipe.send(("spooled", ids))
        except OSError as exc:  # the daemon is gone (this receiver stops too): the entries are in the spool, its scan finds them
            log.warning("cannot hand %d spooled entries to the daemon: %s; they wait in the spool", len(ids), exc)


async def _report_counts(pipe: Connection, reported: dict) -> None:
    while True:
        await asyncio.sleep(COUNTS_EVERY)
        _send_counts(pipe, reported)


def _send_counts(pipe: Connection, reported: dict) -> None:
    """What the counters counted since the last report, by (counter, labels)."""
    now: dict[tuple[str, tuple], float] = {}
    for name, counter in FORWARDED.items():
        for family in counter.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    now[(name, tuple(sorted(sample.labels.items())))] = sample.value
    delta = {key: value - reported.get(key, 0) for key, value in now.items() if value != reported.get(key, 0)}
    if delta:
        try:
            pipe.send(("counts", delta))
        except (BrokenPipeError, OSError):
            return
        reported.update(now)
