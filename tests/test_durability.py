"""Nothing answered 250 is ever lost: kill -9 mid-stream, a storage outage, a clean SIGTERM, a dead conversion process."""

import asyncio
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import FAKE_AWS, REGION, RunningDaemon, Server, bucket_contents, eventually, free_port, make_buckets
from moto.server import ThreadedMotoServer
from test_smtp import feed

from esmail.config import Buckets, Config, SpoolConfig, StorageConfig, WorkerConfig
from esmail.spool import Spool
from esmail.store import open_store
from esmail.worker import Worker


def send_until_stopped(port: int, prefix: str, accepted: list, stop: threading.Event) -> None:
    """Send one message after another (each with its own CSV) and note every one answered 250."""
    n = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                while not stop.is_set():
                    n += 1
                    csv = f"MPAN,seq\r\n{prefix},{n}\r\n".encode()
                    client.sendmail("a@b", [f"{prefix}@x"], feed(f"{prefix}@x", csv, f"m{n}.csv"))
                    accepted.append((prefix, n))
        except (OSError, smtplib.SMTPException):
            time.sleep(0.05)  # the server is down (killed): try again until told to stop


async def test_kill_9_mid_stream_loses_nothing_and_duplicates_nothing(config, store, tmp_path):
    """Four senders; esmail is killed with SIGKILL mid-stream and restarted: every 250 lands exactly once."""
    server = Server(config, tmp_path)
    server.start()
    accepted: list = []
    stop = threading.Event()
    senders = [threading.Thread(target=send_until_stopped, args=(server.port, f"feed{t}", accepted, stop)) for t in range(4)]
    for sender in senders:
        sender.start()
    assert await eventually(lambda: len(accepted) >= 40, timeout=60)
    server.kill()
    killed_at = len(accepted)
    server.start()
    assert await eventually(lambda: len(accepted) >= killed_at + 20, timeout=60)
    stop.set()
    for sender in senders:
        sender.join(30)
    spool = Spool(config.spool.path)
    assert await eventually(lambda: not spool.pending(), timeout=60), server.log.read_text()[-3000:]
    assert server.terminate() == 0

    amr = await bucket_contents(store, config.buckets.amr_data)
    stored = {}
    for key, data in amr.items():
        prefix, _folder, name = key.split("/")
        stored.setdefault((prefix, data), []).append(name)
    for prefix, n in accepted:
        expected = f"MPAN,seq\n{prefix},{n}\n".encode()
        assert stored.get((prefix, expected)) == [f"m{n}.csv"], (prefix, n, stored.get((prefix, expected)))
    assert all(len(names) == 1 for names in stored.values()), "a message was stored twice"
    inbox = await bucket_contents(store, config.buckets.inbox)
    assert len(inbox) == len(stored) and len({key.rsplit("/", 1)[1] for key in inbox}) == len(inbox)


def test_sigterm_stops_cleanly_and_keeps_unfinished_entries(tmp_path):
    """SIGTERM exits 0; with storage unreachable, the accepted message stays in the spool for the next start."""
    port = free_port()  # nothing listens here: every store write fails
    config = Config(storage=StorageConfig(backend="s3", endpoint_url=f"http://127.0.0.1:{port}", region=REGION),
                    spool=SpoolConfig(path=tmp_path / "spool"))
    server = Server(config, tmp_path)
    server.start()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("a@b", ["sheffield@x"], feed())
    time.sleep(0.5)
    assert server.terminate() == 0
    assert len(Spool(tmp_path / "spool").pending()) == 1
    assert "stopped; 1 entry waits in the spool" in server.log.read_text()


@pytest.fixture
def outage_s3(tmp_path):
    """A moto server of the test's own, so that the test can stop and restart it."""
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    buckets = Buckets(inbox="outage-inbox", amr_data="outage-amr-data", unprocessable="outage-unprocessable")
    url = f"http://127.0.0.1:{port}"
    make_buckets(url, buckets)
    config = Config(storage=StorageConfig(backend="s3", endpoint_url=url, region=REGION), buckets=buckets,
                    spool=SpoolConfig(path=tmp_path / "spool", min_free=0), worker=WorkerConfig(processes=1),
                    secrets=dict(FAKE_AWS))
    state = {"moto": moto}
    yield config, state, port
    state["moto"].stop()


async def test_storage_outage_mail_is_still_accepted_and_lands_after(outage_s3):
    """S3 goes away: mail is still accepted and held in the spool with its error; S3 comes back: all of it lands."""
    config, state, port = outage_s3
    state["moto"].stop()
    with RunningDaemon(config) as server:
        with server.smtp() as client:
            for n in range(5):
                client.sendmail("a@b", [f"feed{n}@x"], feed(f"feed{n}@x", f"n,{n}\r\n".encode()))
        spool = server.spool
        assert len(spool.pending()) == 5
        assert await eventually(lambda: all(spool.read_state(i).attempts >= 1 for i in spool.pending()), timeout=60)
        assert "Could not connect" in spool.read_state(spool.pending()[0]).last_error
        state["moto"] = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        state["moto"].start()  # moto keeps its buckets in the test process: they are still there
        assert await eventually(lambda: not spool.pending(), timeout=90)
    store = open_store(config)
    try:
        amr = await bucket_contents(store, config.buckets.amr_data)
    finally:
        await store.close()
    assert sorted(amr.values()) == [f"n,{n}\n".encode() for n in range(5)]


async def test_after_max_attempts_the_entry_goes_to_failed(tmp_path):
    """Storage that never comes back: after [worker] max_attempts the entry is kept in failed/ with the reason."""
    config = Config(storage=StorageConfig(backend="s3", endpoint_url=f"http://127.0.0.1:{free_port()}", region=REGION),
                    buckets=Buckets(inbox="gone-inbox", amr_data="gone-amr-data", unprocessable="gone-unprocessable"),
                    spool=SpoolConfig(path=tmp_path / "spool", min_free=0), worker=WorkerConfig(processes=1, max_attempts=2),
                    secrets=dict(FAKE_AWS))
    with RunningDaemon(config) as server:
        with server.smtp() as client:
            client.sendmail("a@b", ["sheffield@x"], feed())
        assert await eventually(lambda: server.spool.failed_ids(), timeout=90)
        [entry_id] = server.spool.failed_ids()
        assert server.spool.pending() == []
        reason = server.spool.read_state(entry_id).reason
        assert reason.startswith("gave up after 2 attempts") and "Could not connect" in reason


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_a_dead_conversion_process_is_a_temporary_failure(config, store):
    """A conversion process killed (as by the OOM killer) breaks the pool: the entry is retried, not given up."""
    spool = Spool(config.spool.path)
    envelope = spool.accept(feed(), ["sheffield"])
    worker = Worker(config, spool, store, processes=True)
    try:
        worker.executor.submit(int).result()  # start the process, then kill it behind the pool's back
        for pid in list(worker.executor._processes):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        delay = await worker.attempt(envelope.id)
        assert delay == 1.0 and spool.pending() == [envelope.id]
        assert "conversion process died" in spool.read_state(envelope.id).last_error
        assert await worker.attempt(envelope.id) is None  # the new pool converts it
    finally:
        worker.close()
    assert list((await bucket_contents(store, config.buckets.amr_data)).values()) == [b"MPAN,00:30\n2200013680374,1.5\n"]


def pool_processes() -> list[int]:
    """This process's conversion processes (spawned by multiprocessing), not its resource tracker."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid() and b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_an_entry_whose_conversion_keeps_killing_its_process_is_given_up(config, store):
    """A poison message (a file that exhausts memory_limit or crashes a reader): once in the pool, once alone, then given up."""
    spool = Spool(config.spool.path)
    raw = feed()
    envelope = spool.accept(raw, ["sheffield"])
    worker = Worker(config, spool, store, processes=True)
    stop = threading.Event()

    def kill_conversions() -> None:  # what a poison file does to the process that converts it
        while not stop.is_set():
            for pid in pool_processes():
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)

    killer = threading.Thread(target=kill_conversions, daemon=True)
    killer.start()
    try:
        assert await worker.attempt(envelope.id) == 1.0  # the pool died: every entry in it shares the blame
        assert spool.read_state(envelope.id).crashes == 1
        assert await worker.attempt(envelope.id) is None  # alone, and it died again: this entry's fault
    finally:
        stop.set()
        killer.join()
        worker.close()
    assert spool.pending() == [] and spool.failed_ids() == [envelope.id]
    assert "killed the converting process twice, the second time alone" in (spool.failed / f"{envelope.id}.reason").read_text()
    assert list((await bucket_contents(store, config.buckets.unprocessable)).values()) == [raw]


def test_start_removes_what_a_crash_left_half_written(tmp_path):
    """Files in tmp/ were never acknowledged: an old one is removed at start, a young one (being written) is not."""
    spool = Spool(tmp_path / "spool")
    old, young = spool.tmp / "old.msg", spool.tmp / "young.msg"
    old.write_bytes(b"half a mess")
    young.write_bytes(b"being writ")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert spool.remove_stale() == 1 and not old.exists() and young.exists() and spool.pending() == []


def test_spool_list_and_retry(tmp_path):
    """`esmail spool list` shows failed entries with their reason; `spool retry ID` puts one back in the queue."""
    spool = Spool(tmp_path / "spool")
    kept = spool.accept(b"To: a@x\r\n\r\nwaiting\r\n", ["waiting"], recipients=("waiting@x",))
    broken = spool.accept(b"To: b@x\r\n\r\nbroken\r\n", ["broken"], recipients=("broken@x",))
    spool.record_attempt(spool.entry(kept.id), "s3://bucket/key: Could not connect")
    spool.fail(spool.entry(broken.id), "gave up after 3 attempts")
    toml = tmp_path / "c.toml"
    toml.write_text(f'[spool]\npath = "{tmp_path / "spool"}"\n')

    def esmail(*args):
        return subprocess.run([sys.executable, "-m", "esmail", "--config", str(toml), "spool", *args],
                              capture_output=True, text=True, timeout=60)

    listed = esmail("list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert rows[kept.id].split()[1] == "queued" and "waiting@x" in rows[kept.id] and "Could not connect" in rows[kept.id]
    assert "failed" in rows[broken.id] and "gave up after 3 attempts" in rows[broken.id]
    unknown = esmail("retry", "no-such-id")
    assert unknown.returncode == 1 and "no-such-id" in unknown.stderr
    retried = esmail("retry", broken.id)
    assert retried.returncode == 0 and "1 entry moved back" in retried.stdout
    assert sorted(spool.pending()) == sorted([kept.id, broken.id]) and spool.failed_ids() == []
    assert esmail("retry").stdout == "no failed entries to retry\n"
    toml.write_text(f'[spool]\npath = "{tmp_path / "no-such-spool"}"\n')
    missing = esmail("list")
    assert missing.returncode == 1 and "there is no spool at" in missing.stderr and not (tmp_path / "no-such-spool").exists()



@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_a_storage_outage_warns_once_per_entry_then_every_tenth_attempt(config, tmp_path, caplog):
    """During an outage every queued entry fails on every try: WARNING the first time (and every tenth), INFO between."""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("the buckets cannot be made under a file")
    config = replace(config, storage=replace(config.storage, path=blocked))
    spool = Spool(config.spool.path)
    envelope = spool.accept(feed(), ["sheffield"])
    store = open_store(config)
    worker = Worker(config, spool, store)
    with caplog.at_level("INFO", logger="esmail.worker"):
        for _ in range(10):
            assert await worker.attempt(envelope.id) is not None
    await store.close()
    levels = [r.levelname for r in caplog.records if "failed (cannot write" in r.getMessage()]
    assert levels == ["WARNING"] + ["INFO"] * 8 + ["WARNING"]
    assert spool.pending() == [envelope.id]


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_when_the_store_works_again_the_entries_waiting_for_it_go_at_once(config, store):
    """After a storage outage the waiting entries are stored within seconds of its return (a probe every few seconds),
    long before their own backoff (here 256 s, as after a long outage) would have tried them again."""
    spool = Spool(config.spool.path)
    ids = [spool.accept(feed(f"feed{n}@x", f"n,{n}\r\n".encode()), [f"feed{n}"]).id for n in range(5)]
    for entry_id in ids:  # as if each had failed eight times already: after the next failure it waits 256 s
        entry = spool.entry(entry_id)
        for _ in range(8):
            spool.record_attempt(entry, "cannot write: the store is down")
    config.storage.path.write_text("a file where the buckets' folder should be: every write fails")
    with RunningDaemon(config):
        assert await eventually(lambda: all(spool.read_state(i).attempts == 9 for i in ids), timeout=60)
        assert spool.pending() == sorted(ids)
        config.storage.path.unlink()  # the store works again
        assert await eventually(lambda: not spool.pending(), timeout=90)
    assert sorted((await bucket_contents(store, config.buckets.amr_data)).values()) == [f"n,{n}\n".encode() for n in range(5)]


async def test_while_the_store_is_down_one_probe_at_a_time_asks_it(tmp_path, caplog):
    """Twenty entries that want a store that is down wait for one probe's verdict (one store call, not twenty);
    the probe that finds it working again says so once, and lets them all through."""
    from esmail.errors import StorageFailure, TemporaryFailure
    from esmail.outage import Outage
    from esmail.store.local import LocalStore

    root = tmp_path / "data"
    root.write_text("not a folder")
    store = LocalStore(root)
    probes = []

    async def probe():
        probes.append(len(probes))
        await store.check("inbox")

    outage = Outage(probe)
    back = []
    outage.on_back = lambda: back.append(True)
    outage.failed(TemporaryFailure("cannot write: down"))
    verdicts = await asyncio.gather(*(outage.wait_until_up() for _ in range(20)), return_exceptions=True)
    assert len(probes) == 1 and all(isinstance(v, StorageFailure) and "cannot write" in str(v) for v in verdicts)
    assert outage.error is not None and back == []
    root.unlink()
    await asyncio.gather(*(outage.wait_until_up() for _ in range(20)))
    assert len(probes) == 2 and back == [True] and outage.error is None
    await outage.wait_until_up()  # up: no probe at all
    assert len(probes) == 2
    said = [r.getMessage().split(" (")[0].split(":")[0] for r in caplog.records if r.name == "esmail.outage"]
    assert said == ["the store fails", "the store works again"]


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_one_key_the_store_refuses_is_that_messages_failure_not_an_outage(config, store, caplog):
    """A file where one feed's folder should be fails that message on every attempt, while the store's probe and the
    other feeds' mail go through: no "the store fails" / "works again" in the log at each attempt, the others stored."""
    config = replace(config, worker=replace(config.worker, max_attempts=3))
    blocked = config.storage.path / config.buckets.amr_data / "bristol"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where bristol's folder should be")
    spool = Spool(config.spool.path)
    bad = spool.accept(feed("bristol@x", b"n,1\r\n"), ["bristol"]).id
    good = [spool.accept(feed(f"feed{n}@x", f"n,{n}\r\n".encode()), [f"feed{n}"]).id for n in range(3)]
    with caplog.at_level("INFO"), RunningDaemon(config):
        assert await eventually(lambda: spool.failed_ids() == [bad] and not spool.pending(), timeout=60)
    assert good and not [r for r in caplog.records if r.name == "esmail.outage"]
    assert sorted(v for k, v in (await bucket_contents(store, config.buckets.amr_data)).items() if k.split("/")[0] != "bristol") == \
        [f"n,{n}\n".encode() for n in range(3)]
