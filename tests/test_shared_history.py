"""One view across hosts (DESIGN §17): two `esmail serve` daemons on one S3 (moto) and one PostgreSQL history.

Each host is its own process, with its own spool, page and /metrics, as on two machines.
"""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

import postgres
from conftest import FAKE_AWS, HISTORY_PASSWORD_ENV, Server, free_port
from esmail.config import SpoolConfig
from test_operations import Recorder
from test_page_problems import every_count_opens_its_rows
from test_web import CSV, DOMAIN, Browser, Table, csrf_of, message

pytestmark = pytest.mark.parametrize("config", ["s3"], indirect=True)
TOKEN = "7e57700007e57700007e57700007e577"


class Host:
    """One host: `esmail serve` with the shared history, its page on a port of its own, named by [smtp] hostname."""

    def __init__(self, name: str, config, tmp_path, history_url: str, tables: str = "", worker: str = ""):
        """`tables`: more tables after [http]; `worker`: more [worker] keys."""
        self.name = name
        self.page = f"http://127.0.0.1:{free_port()}"
        folder = tmp_path / name
        folder.mkdir()
        self.server = Server(replace(config, spool=SpoolConfig(path=folder / "spool", min_free=0)), folder,
                             smtp=f'hostname = "{name}"\ndomains = ["{DOMAIN}"]',
                             tables=f'{worker}\n[history]\nurl = "{history_url}"\npassword_env = "{HISTORY_PASSWORD_ENV}"\n'
                                    f'[http]\nlisten = "{self.page.removeprefix("http://")}"\n{tables}')

    def start(self, **env) -> "Host":
        self.server.start(int(self.page.rsplit(":", 1)[1]), **{HISTORY_PASSWORD_ENV: postgres.PASSWORD, **env})
        return self

    def send(self, raw: bytes, sender: str = "meters@supplier.example", *prefixes: str) -> str:
        with smtplib.SMTP("127.0.0.1", self.server.port, timeout=30) as client:
            client.ehlo("supplier.example")
            client.mail(sender)
            for prefix in prefixes or ("sheffield",):
                assert client.rcpt(f"{prefix}@{DOMAIN}")[0] == 250
            code, text = client.data(raw)
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[1]

    def api(self, path: str):
        return Browser(self.page).json(path)

    def metric(self, name: str, **labels) -> float | None:
        for family in text_string_to_metric_families(Browser(self.page).get("/metrics")):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return None

    def log(self) -> str:
        return self.server.log.read_text()


def wait_for(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def test_both_pages_list_both_hosts_messages(config, tmp_path, history_url):
    """Mail taken by host A and by host B: each host's page and API list both, each with its host; ?host= narrows; the feed's
    last CSV is one of them; `/` names the host whose queue it counts."""
    a, b = (Host(name, config, tmp_path, history_url).start() for name in ("mx-a.example", "mx-b.example"))
    try:
        via_a = a.send(message(subject="via a"))
        via_b = b.send(message(subject="via b"))
        for host in (a, b):
            assert wait_for(lambda host=host: len(host.api("/api/messages")["messages"]) == 2)
            listed = {m["id"]: m["host"] for m in host.api("/api/messages")["messages"]}
            assert listed == {via_a: "mx-a.example", via_b: "mx-b.example"}
            assert [m["id"] for m in host.api("/api/messages?host=mx-b.example")["messages"]] == [via_b]
            rows = Table(Browser(host.page).get("/messages"), "messages").body()
            assert sorted(row[2] for row in rows) == ["mx-a.example", "mx-b.example"]  # the Host column
            assert host.api(f"/api/messages/{via_b}")["host"] == "mx-b.example"
            [feed] = host.api("/api/feeds")["feeds"]  # the last CSV's report, whichever host took it, from PostgreSQL
            assert feed["last_check"]["id"] in (via_a, via_b) and [(f["name"], f["verdict"], f["rows"]) for f in feed["last_check"]["files"]] == [
                ("export.csv", "ok", 1)]
            assert f"<strong>Queued on {host.name}:</strong>" in Browser(host.page).get("/")  # which host's queue
    finally:
        for host in (a, b):
            assert host.server.terminate() == 0


def test_a_feed_mailed_only_through_b_is_not_late_on_a_and_when_it_goes_quiet_one_warning(config, tmp_path, history_url):
    """A feed expected every 8 s gets its mail only through host B: host A's page and /metrics say it is on time.
    When the mail stops, both hosts' /metrics say late, and one warning and one Rollbar report go out across both.
    (8 s, not less: on a loaded machine B's worker can file a message seconds after it arrived, and the feed then
    really looks late for a moment, to both hosts.)"""
    recorder = Recorder()
    feed = f'[rollbar]\nendpoint = "{recorder.url}/api/1/"\n[[feed]]\nprefix = "sheffield"\nexpected_every = "8s"\n'
    a, b = (Host(name, config, tmp_path, history_url, feed) for name in ("mx-a.example", "mx-b.example"))
    b.start(ROLLBAR_ACCESS_TOKEN=TOKEN)
    b.send(message())  # the feed has mail before A looks (however long A takes to start on a busy machine)
    assert wait_for(lambda: b.api("/api/messages")["messages"])
    a.start(ROLLBAR_ACCESS_TOKEN=TOKEN)
    try:
        for _ in range(8):  # 8 s of mail through B alone, one message a second
            b.send(message())
            time.sleep(1)
            assert a.metric("esmail_feed_late", prefix="sheffield") in (None, 0.0)
        assert [f["status"] for f in a.api("/api/feeds")["feeds"] if f["prefix"] == "sheffield"] == ["ok"]
        for host in (a, b):
            assert wait_for(lambda host=host: host.metric("esmail_feed_late", prefix="sheffield") == 1.0, timeout=30)
        time.sleep(2)  # each host looked again: still one warning
        warnings = [line for host in (a, b) for line in host.log().splitlines() if "feed sheffield is late" in line]
        assert len(warnings) == 1, warnings
        reports = [item for item in recorder.items if item["json"]["data"]["body"]["message"]["body"] == "a feed is late"]
        assert len(reports) == 1
    finally:
        for host in (a, b):
            assert host.server.terminate() == 0


def test_release_on_a_of_a_message_quarantined_on_b(config, tmp_path, history_url):
    """A message from a sender the feed does not list is quarantined on host B; the data team presses Release on host
    A's page: A records the request, B releases it within seconds, its CSV is stored, and A's page shows the outcome."""
    feed = '[[feed]]\nprefix = "sheffield"\nsenders = ["*@supplier.example"]\nauthenticated = false\n'
    a, b = (Host(name, config, tmp_path, history_url, feed).start() for name in ("mx-a.example", "mx-b.example"))
    try:
        held = b.send(message(("held.csv", CSV), sender="someone@elsewhere.example"), sender="someone@elsewhere.example")
        assert wait_for(lambda: any(m["id"] == held and m["state"] == "quarantined" for m in a.api("/api/messages")["messages"]))
        browser = Browser(a.page)
        page = browser.get(f"/messages/{held}")
        assert "asks mx-b.example, whose spool holds it" in page
        status, headers, _ = browser.request(f"/messages/{held}/release", {"csrftoken": csrf_of(page)})
        assert status == 303 and headers["Location"] == f"/messages/{held}?done=requested"
        asked = time.monotonic()
        assert wait_for(lambda: a.api(f"/api/messages/{held}")["state"] == "stored", timeout=20)
        assert time.monotonic() - asked < 6  # LISTEN/NOTIFY: well within the 5 s poll
        [request] = a.api(f"/api/messages/{held}")["requests"]
        assert request["host"] == "mx-b.example" and request["action"] == "release" and request["by"] == "local"
        assert [(o["outcome"], o["by"]) for o in a.api(f"/api/messages/{held}")["outcomes"]] == [("quarantined", ""), ("released", "local")]
        assert request["outcome"].startswith("released") and request["done"]
        assert [f["name"] for f in a.api(f"/api/messages/{held}")["files"] if f["role"] == "amr_data"] == ["held.csv"]
        assert "released by local, on the page on mx-a.example" not in a.log()  # B acted, not A
        assert "released by local on mx-a.example" in b.log()
    finally:
        for host in (a, b):
            assert host.server.terminate() == 0


def test_every_count_on_each_hosts_page_equals_the_rows_its_link_opens(config, tmp_path, history_url):
    """Host B holds a failed message (its amr-data bucket is missing) and a quarantined one, host A a quarantined one and
    one quarantined for one feed and stored for another: on both pages what needs a human counts every host's, and each
    count on `/` is the number of rows its link opens."""
    feeds = ('[[feed]]\nprefix = "sheffield"\nsenders = ["*@supplier.example"]\nauthenticated = false\n'
             '[[feed]]\nprefix = "leeds"\n')
    a = Host("mx-a.example", config, tmp_path, history_url, feeds).start()
    b = Host("mx-b.example", replace(config, buckets=replace(config.buckets, amr_data="no-such-bucket")), tmp_path, history_url, feeds,
             worker="max_attempts = 1").start()
    try:
        failed = b.send(message(subject="fails on b"))
        b.send(message(subject="held on b", sender="x@elsewhere.example"), "x@elsewhere.example")
        a.send(message(subject="held on a", sender="x@elsewhere.example"), "x@elsewhere.example")
        a.send(message(subject="both on a", sender="x@elsewhere.example"), "x@elsewhere.example", "sheffield", "leeds")
        a.send(message(subject="stored on a"))
        for host in (a, b):
            assert wait_for(lambda host=host: len(host.api("/api/messages")["messages"]) == 5)
            counts = every_count_opens_its_rows(Browser(host.page))
            assert counts["/messages?state=failed"] == 1 and counts["/messages?state=quarantined"] == 3
            assert counts["/messages?prefix=sheffield&state=quarantined"] == 3 and counts["/messages?prefix=sheffield&state=failed"] == 1
            assert counts["/messages?state=stored&days=1"] == 2
            assert [(m["id"], m["host"]) for m in host.api("/api/messages?state=failed")["messages"]] == [(failed, "mx-b.example")]
        assert a.api("/api/feeds")["feeds"][0]["status"] == "failed"  # B's failure shows on A's page
    finally:
        for host in (a, b):
            assert host.server.terminate() == 0


def test_the_database_stopped_while_mail_flows_and_esmail_restarted_meanwhile(config, tmp_path, postgres_server, history_url):
    """With the database stopped, mail is taken and stored as ever; /healthz stays 200 and says the history is
    unreachable with the rows waiting, /metrics has the backlog, the page says what it shows (with its Host column). esmail restarted during the
    outage comes up; once the database is back, the history has every message."""
    host = Host("mx-a.example", config, tmp_path, history_url).start()
    sent = [host.send(message(subject="before"))]
    assert wait_for(lambda: len(host.api("/api/messages")["messages"]) == 1)
    postgres_server.stop()
    try:
        sent += [host.send(message(subject=f"during {n}")) for n in range(10)]
        assert wait_for(lambda: not list((tmp_path / "mx-a.example" / "spool" / "queue").glob("*.msg")))
        health = host.api("/healthz")
        assert health["status"] == "ok" and health["notes"][0].startswith("history: unreachable (10 rows waiting)")
        assert host.metric("esmail_history_backlog") == 10.0
        assert "This page shows what it had when it last answered" in Browser(host.page).get("/")
        assert "<th>Host</th>" in Browser(host.page).get("/messages")  # the list keeps its Host column, never asked before
        assert host.server.terminate() == 0
        host.start()  # the database still away
        sent += [host.send(message(subject="after the restart"))]
        assert wait_for(lambda: host.metric("esmail_history_backlog") == 11.0)
    finally:
        postgres_server.start()
    try:
        assert wait_for(lambda: len(host.api("/api/messages")["messages"]) == 12, timeout=30)
        assert sorted(m["id"] for m in host.api("/api/messages")["messages"]) == sorted(sent)
        assert "notes" not in host.api("/healthz") and host.metric("esmail_history_backlog") == 0.0
    finally:
        assert host.server.terminate() == 0


def check_config(host: Host, **env) -> subprocess.CompletedProcess:
    """`esmail check-config` with the host's config and the database password in its variable (unless `env` says otherwise)."""
    env = {**os.environ, **FAKE_AWS, HISTORY_PASSWORD_ENV: postgres.PASSWORD, **env}
    return subprocess.run([sys.executable, "-m", "esmail", "--config", str(host.server.toml), "check-config"],
                          capture_output=True, text=True, env=env, timeout=60)


def test_check_config_connects_to_the_history(config, tmp_path, history_url):
    """check-config says `ok history …` for a live database and `FAILED history …` (exit 1) for a dead port."""
    host = Host("mx-a.example", config, tmp_path, history_url)
    done = check_config(host)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ok      history {history_url}: PostgreSQL" in done.stdout
    dead = history_url.replace(history_url.split(":")[2].split("/")[0], str(free_port()))
    host.server.toml.write_text(host.server.toml.read_text().replace(history_url, dead))
    done = check_config(host)
    assert done.returncode == 1 and f"FAILED  history {dead}" in done.stdout and "refused" in done.stdout


def test_the_first_host_on_an_empty_database_makes_the_schema_before_anything_reads_it(config, tmp_path, history_url):
    """A host started on a new, empty database: its page answers and nothing logs "cannot read the history" (its first
    reads, at start, came before the schema was made)."""
    host = Host("mx-a.example", config, tmp_path, history_url).start()
    try:
        assert "No messages." in Browser(host.page).get("/messages")
        sent = host.send(message())
        assert wait_for(lambda: [m["id"] for m in host.api("/api/messages")["messages"]] == [sent])
        assert "cannot read the history" not in host.log()
    finally:
        assert host.server.terminate() == 0


def test_a_role_that_may_not_make_the_tables_is_told_the_grant_and_no_history_is_lost(config, tmp_path, postgres_server):
    """In a database where the role may not create tables: check-config fails naming the GRANT; `esmail serve` stores the
    mail, /healthz names the missing privilege with the rows waiting; once granted, the history has the message."""
    name = f"ungranted_{os.getpid()}"
    url = postgres_server.new_database(name, owned=False)
    host = Host("mx-a.example", config, tmp_path, url)
    done = check_config(host)
    assert done.returncode == 1
    assert (f"FAILED  history {url}: no esmail schema yet, and the role {postgres.ROLE} may not make it in the schema public: "
            f"make {postgres.ROLE} the database's owner, or GRANT USAGE, CREATE ON SCHEMA public TO {postgres.ROLE}") in done.stdout
    host.start()
    try:
        host.send(message())
        assert wait_for(lambda: host.metric("esmail_history_backlog") == 1.0)
        notes = host.api("/healthz")["notes"]
        assert re.match(r"history: unreachable \(1 row waiting\) since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC: ", notes[0]), notes
        assert "permission denied for schema public" in notes[0] and f"CREATE ON SCHEMA public TO {postgres.ROLE}" in notes[0]
        assert "refused by the database" not in host.log()  # the row waits; it is not dropped as a bad one
        postgres_server.sql(f"GRANT USAGE, CREATE ON SCHEMA public TO {postgres.ROLE}", name)
        assert wait_for(lambda: len(host.api("/api/messages")["messages"]) == 1, timeout=30)
        assert "notes" not in host.api("/healthz")
    finally:
        assert host.server.terminate() == 0
