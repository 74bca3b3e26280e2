"""The history's two backends (DESIGN §13, §17): the same records read back from SQLite and from a real PostgreSQL,
and PostgreSQL never on the mail path (a journal in the spool while the database is away)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest

from conftest import with_history
from esmail.config import Config, SpoolConfig
from esmail.history import FileRow, Filters, Finished, open_history
from esmail.history.journal import FOLDER


def finished(n: int, outcome: str = "stored", prefix: str = "sheffield", received: str = "2026-12-01T10:00:00+00:00") -> Finished:
    return Finished(f"20261201-100000-{n:08x}", received, "smtp", outcome, {prefix: outcome}, client="192.0.2.7",
                    mail_from="exports@npower.example", header_from="Readings <exports@npower.example>", subject=f"readings {n}",
                    size=1000 + n, files=[FileRow(prefix, "amr_data", f"export-{n}.csv", "csv", "csv", "t-amr", f"{prefix}/x/export-{n}.csv", 10 + n)])


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path) -> Config:
    """A config whose history is in each backend."""
    config = Config(spool=SpoolConfig(path=tmp_path / "spool", min_free=0))
    if request.param == "postgres":
        config = with_history(config, request.getfixturevalue("history_url"))
    return config


async def settled(history, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while history.backlog() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert history.backlog() == 0


async def test_both_backends_read_back_what_the_worker_wrote(backend):
    """Messages, their prefixes, files and outcomes (a failure, then its retry), newest first, searched by file name,
    read back the same from SQLite and PostgreSQL; each row carries the host."""
    history = open_history(replace(backend, smtp=replace(backend.smtp, hostname="mx1.example")))
    try:
        for n in range(3):
            await history.record(finished(n, received=f"2026-12-01T10:00:0{n}+00:00"))
        await history.record(finished(7, outcome="failed", prefix="leeds"))
        await history.record(finished(7, prefix="leeds"))
        await settled(history)
        rows, total = history.messages()
        assert [r["subject"] for r in rows] == ["readings 2", "readings 1", "readings 7", "readings 0"] and total == 4
        assert {r["host"] for r in rows} == {"mx1.example"}
        assert [list(r["feeds"]) for r in history.messages(Filters(prefix="leeds"))[0]] == [["leeds"]]
        assert [r["subject"] for r in history.messages(Filters(text="EXPORT-1"))[0]] == ["readings 1"]
        row, prefixes, files, outcomes, _, _ = history.message("20261201-100000-00000007")
        assert row["state"] == "stored" and [o["outcome"] for o in outcomes] == ["failed", "retried"]
        assert [(f["name"], f["bytes"]) for f in files] == [("export-7.csv", 17)]
        assert history.prefixes()["sheffield"]["last_csv"] == "2026-12-01T10:00:02+00:00"
        assert history.counts_since("2026-11-30") == {"sheffield": 3, "leeds": 1}
    finally:
        history.close()


async def test_both_backends_write_outcomes_recorded_at_once_each_once_in_order(backend):
    """Outcomes recorded together (concurrent entries: they share a trip to the writer) are each written once, a message's
    failure and its retry in the order they were recorded."""
    history = open_history(backend)
    try:
        await asyncio.gather(*(history.record(finished(n)) for n in range(40)),
                             history.record(finished(99, outcome="failed")), history.record(finished(99)))
        await settled(history)
        rows = history.messages()[0] + history.messages(Filters(page=2))[0]
        assert sorted(r["subject"] for r in rows) == sorted(f"readings {n}" for n in (*range(40), 99))
        assert [o["outcome"] for o in history.message("20261201-100000-00000063").outcomes] == ["failed", "retried"]
    finally:
        history.close()


async def test_the_worker_never_waits_for_a_database_that_is_away_and_nothing_is_lost(tmp_path, postgres_server, history_url):
    """With the database stopped, recording returns at once and rows wait in the spool's journal (the backlog says how
    many, problem() says since when), also across a restart of esmail; once it is back, every row is written in order."""
    config = with_history(Config(spool=SpoolConfig(path=tmp_path / "spool", min_free=0)), history_url)
    history = open_history(config)
    await history.record(finished(0))
    await settled(history)
    postgres_server.stop()
    try:
        started = time.monotonic()
        for n in range(1, 41):
            await history.record(finished(n))
        assert time.monotonic() - started < 1.0  # 40 rows, not 40 timeouts
        deadline = time.monotonic() + 30
        while history.problem() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "unreachable since" in history.problem()
        assert history.backlog() == 40
        assert history.messages() == ([], 0)  # the page says why rather than wait
        history.close()  # a restart of esmail meanwhile: the rows stay in the journal
        assert sum(1 for path in (tmp_path / "spool" / FOLDER).iterdir() for _ in path.open()) == 40
        history = open_history(config)
        await history.record(finished(41))
        assert history.backlog() == 41
    finally:
        postgres_server.start()
    await settled(history, timeout=30)
    assert history.problem() is None
    history.close()
    rows = postgres_server.sql("SELECT subject FROM messages ORDER BY seq", database=history_url.rsplit("/", 1)[1])
    assert [r[0] for r in rows] == [f"readings {n}" for n in range(42)]
    assert list((tmp_path / "spool" / FOLDER).iterdir()) == []


async def test_two_hosts_starting_together_on_an_empty_database_both_come_up(tmp_path, history_url):
    """Both make (or find) the schema: the advisory lock has them take turns; both write."""
    configs = [with_history(Config(spool=SpoolConfig(path=tmp_path / name, min_free=0)), history_url) for name in ("a", "b")]
    histories = []
    barrier = threading.Barrier(2)

    def start(config):
        barrier.wait()
        histories.append(open_history(config))

    threads = [threading.Thread(target=start, args=(c,)) for c in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        for n, history in enumerate(histories):
            await history.record(finished(n))
        for history in histories:
            await settled(history)
        assert [h.problem() for h in histories] == [None, None]
        assert len(histories[0].messages()[0]) == 2
    finally:
        for history in histories:
            history.close()


def test_a_password_in_the_url_is_a_config_error_that_does_not_echo_it(tmp_path):
    """[history] url with a password (in the authority or as a parameter): refused, naming the key and the fix, never the password."""
    from esmail.config import load
    from esmail.errors import ConfigError

    for url in ("postgresql://esmail:hunter22@db.example.org/esmail", "postgresql://db.example.org/esmail?password=hunter22"):
        path = tmp_path / "esmail.toml"
        path.write_text(f'[history]\nurl = "{url}"\n')
        with pytest.raises(ConfigError) as error:
            load(path, environ={})
        assert "[history] url holds a password" in str(error.value) and "password_env" in str(error.value)
        assert "hunter22" not in str(error.value)


async def test_history_copy_moves_a_hosts_sqlite_history_into_postgresql_and_is_safe_to_run_twice(tmp_path, postgres_server, history_url):
    """`esmail history copy --to URL`: every message with its prefixes, files and outcomes, read back from PostgreSQL
    as SQLite had them, each with this host's name; run again, nothing is doubled. Without a password, it says where one goes."""
    import os
    import subprocess
    import sys

    import postgres
    from conftest import HISTORY_PASSWORD_ENV
    from esmail.history import SqliteHistory

    spool = tmp_path / "spool"
    sqlite = SqliteHistory(spool, host="")  # rows written before messages carried a host
    for n in range(3):
        await sqlite.record(finished(n, received=f"2026-12-01T10:00:0{n}+00:00"))
    await sqlite.record(finished(9, outcome="failed", prefix="leeds"))
    await sqlite.record(finished(9, prefix="leeds"))
    sqlite.close()
    toml = tmp_path / "esmail.toml"
    toml.write_text(f'[smtp]\nhostname = "mx-old.example"\n[spool]\npath = "{spool}"\n[history]\npassword_env = "{HISTORY_PASSWORD_ENV}"\n')
    toml.write_text(toml.read_text().replace('[history]\n', f'[history]\nurl = "{history_url}"\n'))
    env = {**os.environ, HISTORY_PASSWORD_ENV: postgres.PASSWORD}
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "esmail", "--config", str(toml), "history", "copy", "--to", history_url],
                              capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"copied 4 messages from {spool / 'history.sqlite'} to {history_url}"
    shared = open_history(with_history(Config(spool=SpoolConfig(path=tmp_path / "other", min_free=0)), history_url))
    try:
        rows, _ = shared.messages()
        assert [(r["subject"], r["host"]) for r in rows] == [(f"readings {n}", "mx-old.example") for n in (2, 1, 9, 0)]
        _, prefixes, files, outcomes, _, _ = shared.message(finished(9).id)
        assert [o["outcome"] for o in outcomes] == ["failed", "retried"]
        assert [(p["prefix"], p["state"]) for p in prefixes] == [("leeds", "stored")] and [f["name"] for f in files] == ["export-9.csv"]
        assert shared.prefixes()["sheffield"]["last_csv"] == "2026-12-01T10:00:02+00:00"
    finally:
        shared.close()
    database = history_url.rsplit("/", 1)[1]  # the planner's statistics made by the copy, not left to autovacuum
    assert postgres_server.sql("SELECT count(*) FROM pg_stat_user_tables WHERE relname IN ('messages', 'message_prefixes', 'files') "
                               "AND last_analyze IS NOT NULL", database=database) == [(3,)]
    done = subprocess.run([sys.executable, "-m", "esmail", "--config", str(toml), "history", "copy", "--to",
                           history_url.replace("esmail@", "esmail:hunter22@")], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "holds a password" in done.stderr and "hunter22" not in done.stderr
    toml.write_text(f'[spool]\npath = "{spool}"\n')  # the one host, before its config names the database: no password anywhere
    bare = {name: value for name, value in env.items() if name != "PGPASSWORD"} | {"PGPASSFILE": str(tmp_path / "no-pgpass")}
    done = subprocess.run([sys.executable, "-m", "esmail", "--config", str(toml), "history", "copy", "--to", history_url],
                          capture_output=True, text=True, env=bare, timeout=60)
    assert done.returncode == 1 and "no password supplied (the password: in the variable [history] password_env names, or " \
                                   "PGPASSWORD, or ~/.pgpass)" in done.stderr


async def test_both_backends_keep_each_csvs_check_and_give_it_back_at_start(backend):
    """A CSV's report (DESIGN §16) is kept beside its file row; at start the worker's memory (learned shapes, the feeds
    already reported) comes back from it, the same from SQLite and PostgreSQL."""
    import json

    from esmail.importer import Report
    from esmail.shapes import Shapes, seed

    history = open_history(backend)
    try:
        now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        learned = Shapes(86400).check("sheffield", "a.csv", b"Meter,Date,kWh\n1,2026-11-01,1\n")
        changed = Report("export.csv", "header changed")
        await history.record(replace(finished(1, received=now), prefixes={"sheffield": "stored", "edf": "stored"}, files=[
            FileRow("sheffield", "amr_data", "a.csv", "csv", "csv", "t-amr", "sheffield/x/a.csv", 30, check=learned.to_json()),
            FileRow("edf", "amr_data", "export.csv", "csv", "csv", "t-amr", "edf/x/export.csv", 30, check=changed.to_json())]))
        await settled(history)
        files = history.message(finished(1).id).files
        assert [json.loads(f["check_report"])["verdict"] for f in files] == ["ok", "header changed"]
        shapes, alerted = Shapes(86400), set()
        seed(history, shapes, alerted)
        assert alerted == {"edf"}
        assert shapes.check("sheffield", "b.csv", b"Meter,Date,kWh\n2,2026-11-02,1\n").verdict == "ok"
        assert shapes.check("sheffield", "c.csv", b"MPAN,Date,kWh\n2,2026-11-02,1\n").verdict == "new shape"
    finally:
        history.close()


LEGACY_ID = "20261201-100000-0000000a"


def legacy_rows(run) -> None:
    """A failed message as an esmail before this version wrote it: its objects without their outcome's event."""
    run("INSERT INTO messages (id, host, received, origin, state, reason, attempts, seconds, finished, subject) "
        "VALUES (?, 'mx1.example', '2026-12-01T10:00:00+00:00', 'smtp', 'failed', 'gave up', 3, 0.1, '2026-12-01T10:01:00+00:00', 'old')",
        (LEGACY_ID,))
    run("INSERT INTO message_prefixes (id, prefix, received, state, csvs, unprocessable) "
        "VALUES (?, 'sheffield', '2026-12-01T10:00:00+00:00', 'failed', 0, 1)", (LEGACY_ID,))
    run("INSERT INTO outcomes (id, at, outcome, reason, attempts, seconds, event) VALUES (?, '2026-12-01T10:01:00+00:00', 'failed', "
        "'gave up', 3, 0.1, 'old-event')", (LEGACY_ID,))
    for bucket in ("t-inbox", "t-unprocessable"):
        run("INSERT INTO files (id, prefix, role, name, kind, rule, bucket, key, bytes, reason) "
            "VALUES (?, 'sheffield', ?, 'x.eml', 'message', '', ?, 'sheffield/x/x.eml', 100, '')",
            (LEGACY_ID, bucket.removeprefix("t-"), bucket))


async def read_back_after_a_retry(history) -> None:
    """The legacy message retried by this esmail: its objects now, what the failure left behind, who retried it."""
    await history.record(Finished(LEGACY_ID, "2026-12-01T10:00:00+00:00", "smtp", "stored", {"sheffield": "stored"}, subject="old",
                                  by="data-team", files=[FileRow("sheffield", "inbox", "x.eml", "message", "", "t-inbox", "sheffield/x/x.eml", 100),
                                                         FileRow("sheffield", "amr_data", "a.csv", "csv", "csv", "t-amr", "sheffield/x/a.csv", 9)]))
    await settled(history)
    record = history.message(LEGACY_ID)
    assert [(o["outcome"], o["by"]) for o in record.outcomes] == [("failed", ""), ("retried", "data-team")]
    assert sorted(f["bucket"] for f in record.files) == ["t-amr", "t-inbox"]
    assert [(f["bucket"], f["left_by"]) for f in record.left_behind] == [("t-unprocessable", "an earlier outcome")]  # no event: whose is not known
    assert [m["state"] for m in history.messages(Filters(state="stored"))[0]] == ["stored"]


async def test_a_sqlite_history_of_the_version_before_is_brought_up_to_date_in_place(tmp_path):
    """{spool}/history.sqlite at schema 2 (objects without their outcome): opened by this esmail it is migrated to 4, its
    rows are read as before, and a retry written after reads back with what the failure left behind."""
    import sqlite3

    from esmail.history import SqliteHistory
    from esmail.history.sqlite import _MIGRATIONS, _TABLES

    (tmp_path / "spool").mkdir()
    conn = sqlite3.connect(tmp_path / "spool" / "history.sqlite", isolation_level=None)
    conn.executescript(_TABLES + _MIGRATIONS[2] + "INSERT INTO schema VALUES (2);")
    legacy_rows(conn.execute)
    conn.close()
    history = SqliteHistory(tmp_path / "spool", host="mx1.example")
    try:
        await read_back_after_a_retry(history)
    finally:
        history.close()
    with sqlite3.connect(tmp_path / "spool" / "history.sqlite") as conn:
        assert conn.execute("SELECT version FROM schema").fetchone()[0] == 4


async def test_a_postgresql_history_of_the_version_before_is_brought_up_to_date_in_place(tmp_path, postgres_server, history_url):
    """A shared database at schema 1: the first host of this esmail to write migrates it to 3, and reads it as SQLite does."""
    import psycopg

    import postgres
    from esmail.history.postgres import _MIGRATIONS, _Db

    with psycopg.connect(history_url, password=postgres.PASSWORD, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema (version INTEGER NOT NULL)")
        conn.execute(_MIGRATIONS[1])
        conn.execute("INSERT INTO schema VALUES (1)")
        legacy_rows(_Db(conn).run)
    history = open_history(with_history(Config(spool=SpoolConfig(path=tmp_path / "spool", min_free=0)), history_url))
    try:
        await read_back_after_a_retry(history)
    finally:
        history.close()
    assert postgres_server.sql("SELECT version FROM schema", database=history_url.rsplit("/", 1)[1]) == [(3,)]
