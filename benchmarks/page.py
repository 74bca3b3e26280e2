"""The page's answer time with a full history (DESIGN §13, §17): `/` under 100 ms with 100,000 messages.

    python benchmarks/page.py [--messages 100000] [--runs 20] [--history-url postgresql://USER@HOST/DB]

Fills a history through the worker's own SQL (history.base.write_finished:
30 feeds, a year of mail, three objects a message, some quarantined (dropped
after 30 days, as esmail does) and failed) — {spool}/history.sqlite, or an empty PostgreSQL database with
--history-url (its password in PGPASSWORD) — starts `esmail serve` on it with
[http] listen, and times each page over HTTP (median and worst of --runs),
with /healthz, the cheapest answer the same server gives, as the baseline
measured in the same run.
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

from esmail.history import FileRow, Finished
from esmail.history.base import write_dropped, write_finished

BATCH = 1000  # messages a transaction while filling
QUARANTINE_DAYS = 30  # [spool] quarantine_days' default: older quarantined messages are written as dropped


def fill(spool: Path, count: int, url: str | None) -> tuple[float, str]:
    """`count` messages over the last 365 days; seconds it took, and what holds them."""
    if url:
        import psycopg

        from esmail.history.postgres import _Db, _migrate

        conn = psycopg.connect(url, autocommit=True, row_factory=psycopg.rows.dict_row)
        _migrate(conn)
        db, transaction = _Db(conn), conn.transaction
    else:
        from esmail.history.sqlite import FILE_NAME, _Db, _opened

        conn = _opened(spool / FILE_NAME)
        conn.execute("PRAGMA synchronous = OFF")
        db, transaction = _Db(conn), _sqlite_transaction(conn)
    seconds = _write(db, transaction, count)
    conn.execute("ANALYZE")  # what autovacuum (PostgreSQL) or esmail's start (SQLite) does for a history that grew over a year
    conn.close()
    if url:
        return seconds, url
    return seconds, f"{spool / FILE_NAME}, {(spool / FILE_NAME).stat().st_size / 1e6:.0f} MB"


def _sqlite_transaction(conn):
    from contextlib import contextmanager

    @contextmanager
    def transaction():
        conn.execute("BEGIN")
        yield
        conn.execute("COMMIT")
    return transaction


def _write(db, transaction, count: int) -> float:
    rng = random.Random(7)
    now = datetime.now(timezone.utc)
    prefixes = [f"school{n:02d}" for n in range(30)]
    started = time.monotonic()
    dropped_before = (now - timedelta(days=QUARANTINE_DAYS)).isoformat()
    for first in range(0, count, BATCH):
        batch = [_message(rng, now, prefixes, n, count) for n in range(first, min(first + BATCH, count))]
        with transaction():
            write_finished(db, [(item, "bench", f"bench-{first + n}") for n, item in enumerate(batch)])
            for item in batch:  # as the owning host's hourly sweep writes it: a quarantine is not kept for ever
                if item.outcome == "quarantined" and item.received < dropped_before:
                    write_dropped(db, item.id, list(item.prefixes), "dropped from quarantine", item.received, f"drop-{item.id}")
    return time.monotonic() - started


def _message(rng: random.Random, now: datetime, prefixes: list[str], n: int, count: int) -> Finished:
    received = (now - timedelta(seconds=(count - n) * 365 * 86400 / count)).replace(microsecond=0).isoformat()
    entry_id = f"{received[:10].replace('-', '')}-{n:06d}-{rng.getrandbits(32):08x}"
    prefix = rng.choice(prefixes)
    outcome = rng.choices(["stored", "quarantined", "failed"], [95, 4, 1])[0]
    files = [FileRow(prefix, "inbox", f"{entry_id}.eml", "message", "", "es-b-data-inbox", f"{prefix}/x/{entry_id}.eml", 5000)]
    if outcome == "stored":
        files += [FileRow(prefix, "amr_data", f"export-{n}.csv", "text", "csv", "es-b-data-amr-data", f"{prefix}/x/export-{n}.csv", 3000),
                  FileRow(prefix, "amr_data", f"meters-{n}.xlsx.csv", "xlsx", "xlsx", "es-b-data-amr-data", f"{prefix}/x/m-{n}.csv", 9000)]
    return Finished(entry_id, received, "smtp", outcome, {prefix: outcome}, client="192.0.2.1", mail_from=f"meters@{prefix}.example",
                    header_from=f"Meters <meters@{prefix}.example>", subject=f"Half-hourly readings {n}", size=5000, files=files)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(url: str, runs: int) -> tuple[float, float]:
    """Median and worst milliseconds of `runs` GETs (after one to warm up)."""
    urllib.request.urlopen(url, timeout=60).read()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=60) as response:
            response.read()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--history-url", metavar="URL", help="an empty PostgreSQL database (password in PGPASSWORD) instead of SQLite")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="esmail-page-"))
    try:
        (work / "spool").mkdir()
        seconds, where = fill(work / "spool", args.messages, args.history_url)
        print(f"history: {args.messages:,} messages in {where}, written in {seconds:.0f} s "
              f"({seconds / args.messages * 1e6:.0f} µs a message through the worker's SQL)\n")
        http, smtp = free_port(), free_port()
        toml = work / "esmail.toml"
        toml.write_text(f'[smtp]\nlisten = "127.0.0.1:{smtp}"\n[http]\nlisten = "127.0.0.1:{http}"\n'
                        f'[storage]\npath = "{work / "data"}"\n[spool]\npath = "{work / "spool"}"\nmin_free = 0\n'
                        + (f'[history]\nurl = "{args.history_url}"\n' if args.history_url else "")
                        + "".join(f'[[feed]]\nprefix = "school{n:02d}"\nexpected_every = "1d"\n' for n in range(0, 30, 3)))
        server = subprocess.Popen([sys.executable, "-m", "esmail", "--config", str(toml), "--log-level", "warning", "serve"])
        try:
            base = f"http://127.0.0.1:{http}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(base + "/healthz", timeout=2).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            baseline = timed(base + "/healthz", args.runs)[0]
            print(f"{'page':40} {'median ms':>10} {'worst ms':>9}   ratio to /healthz (target)")
            for path, target in (("/healthz", ""), ("/", "< 100 ms"), ("/api/feeds", ""), ("/messages", ""),
                                 ("/messages?prefix=school07&page=20", ""), ("/messages?state=failed", ""),
                                 ("/messages?q=readings%2099", ""), ("/messages?q=matches-nothing", ""), ("/messages/" + _some_id(base), "")):
                if path == "/healthz":
                    print(f"{path:40} {baseline:10.1f}")
                    continue
                median, worst = timed(base + path, args.runs)
                print(f"{path:40} {median:10.1f} {worst:9.1f}   {median / baseline:6.1f}×  {target}")
        finally:
            server.terminate()
            server.wait(60)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _some_id(base: str) -> str:
    import json

    with urllib.request.urlopen(base + "/api/messages?page=100", timeout=60) as response:
        return json.load(response)["messages"][0]["id"]


if __name__ == "__main__":
    main()
