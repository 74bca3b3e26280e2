"""`[smtp] processes = N` (DESIGN §15): N receiver processes on one port, supervised by `esmail serve`."""

from __future__ import annotations

import os
import signal
import smtplib
import threading
import time
import urllib.request
from email.message import EmailMessage
from pathlib import Path

import pytest

from conftest import Server, eventually, free_port
from esmail.config import Buckets, Config, SpoolConfig, StorageConfig

DOMAIN = "datafeeds.example.org"


def listeners(port: int) -> set[int]:
    """The pids holding a listening TCP socket on the port (from /proc, as `ss -ltnp` finds them)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(fields[9])
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    pids.add(int(proc.name))
        except OSError:
            continue
    return pids


def descendants(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found |= {int(child)} | descendants(int(child))
    return found


def message(n: int) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "meters@supplier.example", f"sheffield@{DOMAIN}", f"readings {n}"
    msg.set_content("attached")
    msg.add_attachment(f"MPAN,00:30\r\n2200013680374,{n}.5\r\n".encode(), maintype="text", subtype="csv", filename="export.csv")
    return msg.as_bytes().replace(b"\n", b"\r\n")


def send_all(port: int, numbers: list[int], sessions: int = 16) -> dict[int, str]:
    """Each message once, over `sessions` concurrent connections; n → the id of the 250 (missing: not accepted)."""
    accepted: dict[int, str] = {}
    lock = threading.Lock()

    def session(mine: list[int]) -> None:
        for n in mine:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
                    client.ehlo("supplier.example")
                    client.mail("meters@supplier.example")
                    client.rcpt(f"sheffield@{DOMAIN}")
                    code, text = client.data(message(n))
                if code == 250:
                    with lock:
                        accepted[n] = text.decode().rsplit(" ", 1)[1]
            except (OSError, smtplib.SMTPException):
                continue  # the connection died under us: not acknowledged, the sender would send it again

    threads = [threading.Thread(target=session, args=(numbers[k::sessions],)) for k in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return accepted


def stored_csvs(config: Config) -> dict[str, bytes]:
    root = config.storage.path / config.buckets.amr_data
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.csv")} if root.exists() else {}


def inbox_ids(config: Config) -> list[str]:
    root = config.storage.path / config.buckets.inbox
    return sorted(p.stem for p in root.rglob("*.eml")) if root.exists() else []


@pytest.fixture
def two(tmp_path):
    config = Config(storage=StorageConfig(path=tmp_path / "data"), spool=SpoolConfig(path=tmp_path / "spool", min_free=0),
                    buckets=Buckets(inbox="r-inbox", amr_data="r-amr-data", unprocessable="r-unprocessable"))
    http = free_port()
    server = Server(config, tmp_path, smtp=f'domains = ["{DOMAIN}"]\nprocesses = 2', tables=f'[http]\nlisten = "127.0.0.1:{http}"')
    server.config, server.http = config, http
    server.start()
    yield server
    if server.process.poll() is None:
        server.terminate()


async def test_two_processes_hold_the_port_and_200_messages_land_once(two):
    """Two pids listen (not the daemon's own); 200 messages over 16 sessions: each stored once; /metrics counts
    every process's 250s in one series."""
    assert await eventually(lambda: len(listeners(two.port)) == 2, timeout=10)
    receivers = listeners(two.port)
    assert two.process.pid not in receivers and receivers <= descendants(two.process.pid)
    accepted = send_all(two.port, list(range(200)))
    assert len(accepted) == 200
    assert await eventually(lambda: len(inbox_ids(two.config)) == 200, timeout=60)
    assert sorted(accepted.values()) == inbox_ids(two.config)
    assert await eventually(lambda: len(stored_csvs(two.config)) >= 200, timeout=60)  # the CSVs come after the inbox copies
    csvs = stored_csvs(two.config)
    assert sorted(csvs.values()) == sorted(f"MPAN,00:30\n2200013680374,{n}.5\n".encode() for n in range(200))

    def data_250s() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{two.http}/metrics", timeout=10).read().decode()
        line = [line for line in text.splitlines() if line.startswith('esmail_smtp_replies_total{code="250",command="DATA"}')]
        return float(line[0].split()[-1]) if line else 0.0

    assert await eventually(lambda: data_250s() == 200.0, timeout=10)
    start = two.log.read_text()
    assert start.count("ROLLBAR_ACCESS_TOKEN is not set") == 1  # said by the daemon, not once more by each receiver
    assert f"the page, /healthz and /metrics on http://127.0.0.1:{two.http}" in start


async def test_kill_9_of_a_receiver_loses_nothing_it_accepted_and_it_is_restarted(two):
    """A receiver killed while mail flows: every message answered 250 is stored; a new receiver takes its place."""
    assert await eventually(lambda: len(listeners(two.port)) == 2, timeout=10)
    first = listeners(two.port)
    victim = sorted(first)[0]
    killer = threading.Timer(1.0, os.kill, (victim, signal.SIGKILL))
    killer.start()
    accepted = send_all(two.port, list(range(300)))
    killer.join()
    assert await eventually(lambda: len(listeners(two.port)) == 2 and victim not in listeners(two.port), timeout=30)
    assert await eventually(lambda: set(accepted.values()) <= set(inbox_ids(two.config)), timeout=60)
    expected = {f"MPAN,00:30\n2200013680374,{n}.5\n".encode() for n in accepted}  # a message's CSVs are stored after its inbox copy
    assert await eventually(lambda: expected <= set(stored_csvs(two.config).values()), timeout=60)
    assert "ended with exit code -9" in two.log.read_text() and "started again" in two.log.read_text()
    assert 100 < len(accepted) <= 300


def test_sigterm_stops_every_process(two):
    """SIGTERM: the daemon, both receivers and the conversion pool all end; exit code 0."""
    deadline = time.monotonic() + 10
    while len(listeners(two.port)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    family = descendants(two.process.pid)
    assert len(family) >= 2
    assert two.terminate() == 0
    time.sleep(0.5)
    alive = [pid for pid in family if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()]
    assert alive == [] and listeners(two.port) == set()


def test_kill_9_of_the_daemon_takes_its_receivers_and_conversion_processes_along(two):
    """The daemon killed -9 (the OOM killer): no receiver keeps the port, no conversion process keeps its memory."""
    assert len(send_all(two.port, list(range(4)), sessions=2)) == 4  # the conversion pool has started
    deadline = time.monotonic() + 10
    while len(listeners(two.port)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    family = descendants(two.process.pid)
    assert len(family) >= 3, family
    two.kill()
    deadline = time.monotonic() + 10
    alive = family
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = {pid for pid in family if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()}
    assert alive == set() and listeners(two.port) == set()
