"""The data team's page and its JSON API (DESIGN §13), over HTTP against a running daemon, and the history behind it."""

from __future__ import annotations

import base64
import http.cookiejar
import json
import re
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from email.message import EmailMessage
from html.parser import HTMLParser

import pytest

from conftest import RunningDaemon, eventually
from esmail.config import Address, Config, FeedConfig, HttpConfig, SpoolConfig, StorageConfig, WorkerConfig

DOMAIN = "datafeeds.example.org"
CSV = b"MPAN,00:30\r\n2200013680374,1.5\r\n"
PASSWORD = "correct horse battery staple"
local = pytest.mark.parametrize("config", ["local"], indirect=True)


def with_page(config: Config, password: str | None = None, **smtp) -> Config:
    http = HttpConfig(listen=Address("127.0.0.1", 0), password_env="PAGE_PASSWORD" if password else None)
    secrets = {**config.secrets, **({"PAGE_PASSWORD": password} if password else {})}
    return replace(config, http=http, secrets=secrets, smtp=replace(config.smtp, domains=(DOMAIN,), **smtp))


def message(*files: tuple[str, bytes], subject: str = "readings", sender: str = "meters@supplier.example", to: str = f"sheffield@{DOMAIN}") -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg.set_content("attached")
    for name, data in files or (("export.csv", CSV),):
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return msg.as_bytes().replace(b"\n", b"\r\n")


def send(server: RunningDaemon, raw: bytes, *rcpts: str) -> str:
    with server.smtp() as client:
        client.ehlo("supplier.example")
        client.mail("meters@supplier.example")
        for rcpt in rcpts or (f"sheffield@{DOMAIN}",):
            assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(raw)
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


class Browser:
    """urllib with a cookie jar and, when given, HTTP Basic: what a person's browser does, without JavaScript."""

    def __init__(self, server: RunningDaemon | str, password: str | None = None):
        """`server`: a daemon in this process, or the page's base URL (another process's)."""
        self.base = server if isinstance(server, str) else f"http://127.0.0.1:{server.daemon.monitor.port}"
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect)
        self.password = password

    def request(self, path: str, form: dict | None = None) -> tuple[int, dict, bytes]:
        body = urllib.parse.urlencode(form).encode() if form is not None else None
        request = urllib.request.Request(self.base + path, data=body)
        if self.password is not None:
            request.add_header("Authorization", "Basic " + base64.b64encode(f"data-team:{self.password}".encode()).decode())
        try:
            with self.opener.open(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def get(self, path: str) -> str:
        status, _, body = self.request(path)
        assert status == 200, (path, status, body[:300])
        return body.decode()

    def json(self, path: str):
        return json.loads(self.get(path))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None


class Table(HTMLParser):
    """The text of each cell of each body row of the tables on a page: what a reader of the page sees."""

    def __init__(self, html: str, css_class: str):
        super().__init__()
        self.css_class, self.depth, self.rows, self.row, self.cell = css_class, 0, [], None, None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and self.css_class in (attrs.get("class") or "").split():
            self.depth = 1
        elif self.depth and tag == "tr":
            self.row = []
        elif self.depth and tag in ("td", "th") and self.row is not None:
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self.depth = 0
        elif self.depth and tag in ("td", "th") and self.cell is not None:
            self.row.append(" ".join(self.cell.split()))
            self.cell = None
        elif self.depth and tag == "tr" and self.row is not None:
            self.rows.append(self.row)
            self.row = None

    def handle_data(self, text):
        if self.cell is not None:
            self.cell += text

    def body(self) -> list[list[str]]:
        return self.rows[1:]  # the header row first


def csrf_of(page: str) -> str:
    return re.search(r'name="csrftoken" value="([^"]+)"', page).group(1)


async def finished(server: RunningDaemon) -> bool:
    return await eventually(lambda: not server.spool.pending())


@local
def test_the_page_needs_its_password_but_healthz_does_not(config):
    """With [http] password_env: 401 without it or with a wrong one (metrics too), 200 with it; /healthz stays open."""
    with RunningDaemon(with_page(config, PASSWORD)) as server:
        for path in ("/", "/messages", "/api/feeds", "/metrics"):
            assert Browser(server).request(path)[0] == 401, path
            assert Browser(server, "wrong").request(path)[0] == 401, path
            assert Browser(server, PASSWORD).request(path)[0] == 200, path
        status, headers, _ = Browser(server).request("/")
        assert headers["WWW-Authenticate"].startswith("Basic")
        assert Browser(server).request("/healthz")[0] == 200


def test_a_page_open_to_other_hosts_needs_a_password(tmp_path):
    """[http] listen off loopback without password_env, or password_env naming an unset variable: exit 2 naming the key."""
    toml = tmp_path / "c.toml"
    for text, expected in [('[http]\nlisten = "0.0.0.0:9025"\n', '[http] listen = "0.0.0.0:9025" is reachable from other hosts'),
                           ('[http]\nlisten = ":9025"\n', "set [http] password_env"),
                           ('[http]\nlisten = "127.0.0.1:9025"\npassword_env = "NO_SUCH_PASSWORD"\n', "[http] password_env = 'NO_SUCH_PASSWORD'")]:
        toml.write_text(text)
        result = subprocess.run([sys.executable, "-m", "esmail", "--config", str(toml), "check-config"], capture_output=True, text=True)
        assert result.returncode == 2 and expected in result.stderr, (text, result.stderr)


@local
async def test_the_feeds_overview_after_a_good_and_a_bad_file(config):
    """sheffield got a CSV (ok), leeds only a PNG (unprocessable files), npower is declared and silent (ok, never); the chart counts today."""
    feeds = (FeedConfig("sheffield", "Sheffield City Council"), FeedConfig("leeds", "Leeds"), FeedConfig("npower"))
    with RunningDaemon(replace(with_page(config), feeds=feeds)) as server:
        send(server, message())
        send(server, message(("logo.png", b"\x89PNG\r\n\x1a\nnot really")), f"leeds@{DOMAIN}")
        assert await finished(server)
        page = Browser(server).get("/")
        api = Browser(server).json("/api/feeds")
    rows = {row[0].split()[0]: row for row in Table(page, "feeds").body()}
    assert rows["sheffield"][1:3] == ["Sheffield City Council", "ok"] and rows["sheffield"][5] == "1"
    assert rows["leeds"][2] == "unprocessable files" and rows["leeds"][4] == "never"
    assert rows["npower"][2:4] == ["ok", "never"]
    assert "Last 24 hours: 2 stored, 0 quarantined, 0 failed" in " ".join(re.sub(r"<[^>]+>", "", page).split())
    assert '<svg xmlns="http://www.w3.org/2000/svg" class="chart"' in page
    today = api["days"][-1]
    assert today["stored"] == 2 and re.search(rf'data-day="{today["day"]}"><title>{today["day"]}: 2 stored</title>', page)
    assert [feed["prefix"] for feed in api["feeds"]] == ["sheffield", "leeds", "npower"]


@local
async def test_a_feed_goes_late_and_recovers(config, caplog):
    """expected_every = 3 s: after 4.5 s of nothing the page, /metrics and one warning say late; a message makes it ok, with an info line."""
    with caplog.at_level("INFO", logger="esmail.daemon"), \
            RunningDaemon(replace(with_page(config), feeds=(FeedConfig("leeds", expected_every=3.0),))) as server:
        browser = Browser(server)
        assert await eventually(lambda: "late" in Table(browser.get("/"), "feeds").body()[0][2], timeout=10)
        assert await eventually(lambda: 'esmail_feed_late{prefix="leeds"} 1.0' in browser.get("/metrics"), timeout=10)
        send(server, message(to=f"leeds@{DOMAIN}"), f"leeds@{DOMAIN}")
        assert await eventually(lambda: Table(browser.get("/"), "feeds").body()[0][2] == "ok", timeout=10)
        assert await eventually(lambda: 'esmail_feed_late{prefix="leeds"} 0.0' in browser.get("/metrics"), timeout=10)
        assert 'esmail_feed_last_message_timestamp_seconds{prefix="leeds"}' in browser.get("/metrics")
    warnings = [r.getMessage() for r in caplog.records if "is late" in r.getMessage()]
    assert warnings[0] == "feed leeds is late: nothing yet, and it expects mail every 3s"
    assert any("feed leeds is on time again" in r.getMessage() for r in caplog.records)


@local
async def test_the_detail_page_lists_every_key_and_the_download_is_the_stored_object(config):
    """Each object the message stored is on its page with its key; the link serves those very bytes, as a download."""
    with RunningDaemon(with_page(config)) as server:
        entry_id = send(server, message(("export.csv", CSV), ("logo.png", b"\x89PNG\r\n\x1a\nlogo")))
        assert await finished(server)
        browser = Browser(server)
        page = browser.get(f"/messages/{entry_id}")
        files = Table(page, "files").body()
        links = re.findall(r'<a href="(/objects/[^"]+)">', page)
        stored = {str(p.relative_to(config.storage.path)): p.read_bytes() for p in config.storage.path.rglob("*") if p.is_file()}
        assert sorted(row[5] for row in files) == sorted(key.split("/", 1)[1] for key in stored)
        assert [row[1] for row in files] == [f"{entry_id}.eml", "export.csv", "logo.png"]
        assert files[2][7].startswith("no conversion for .png")
        for link in links:
            status, headers, body = browser.request(link)
            bucket, key = urllib.parse.unquote(link).split("/", 3)[2:]
            assert status == 200 and body == stored[f"{bucket}/{key}"]
            assert headers["Content-Disposition"].startswith(f'attachment; filename="{key.rsplit("/", 1)[1]}"')
        csv = [link for link in links if link.endswith(".csv")][0]
        assert browser.request(csv)[1]["Content-Type"] == "text/csv; charset=utf-8"
        detail = browser.json(f"/api/messages/{entry_id}")
        assert detail["state"] == "stored" and [f["key"] for f in detail["files"]] == [row[5] for row in files]


@local
async def test_objects_come_only_from_the_three_buckets_and_never_from_elsewhere(config, tmp_path):
    (tmp_path / "secret.txt").write_text("not for the page")
    with RunningDaemon(with_page(config)) as server:
        send(server, message())
        assert await finished(server)
        browser = Browser(server)
        amr = config.buckets.amr_data
        for path in (f"/objects/{amr}/../../secret.txt", f"/objects/{amr}/%2e%2e/%2e%2e/secret.txt", f"/objects/{amr}//sheffield",
                     f"/objects/{amr}/sheffield%5c..%5c..%5csecret.txt", "/objects/some-other-bucket/secret.txt",
                     f"/objects/{amr}/sheffield/nothing-here.csv"):
            status, _, body = browser.request(path)
            assert status == 404 and b"not for the page" not in body, path


@local
async def test_retry_and_release_need_the_csrf_token_then_queue_at_once(config, tmp_path):
    """Without the form's token (or with another's) POST gets 403 and nothing moves; with it, 303 back to the message,
    which says so, and the entry is processed at once; acting on the wrong state is 409."""
    blocked = tmp_path / "data"
    blocked.write_text("a file where the buckets' folder should be: every store fails")
    config = replace(with_page(config), worker=WorkerConfig(processes=1, max_attempts=1),
                     feeds=(FeedConfig("sheffield", senders=("*@sheffield.gov.uk",), authenticated=False),))
    with RunningDaemon(config) as server:
        failed_id = send(server, message(sender="reports@sheffield.gov.uk"))
        assert await eventually(lambda: server.spool.failed_ids() == [failed_id])
        blocked.unlink()
        held_id = send(server, message(sender="someone@else.example"))
        assert await eventually(lambda: server.spool.quarantined_ids() == [held_id])
        browser = Browser(server)
        page = browser.get(f"/messages/{failed_id}")
        assert "Retry" in page and "Release" not in page
        assert browser.request(f"/messages/{failed_id}/retry", {})[0] == 403
        assert browser.request(f"/messages/{failed_id}/retry", {"csrftoken": "x" * 43})[0] == 403
        assert Browser(server).request(f"/messages/{failed_id}/retry", {"csrftoken": csrf_of(page)})[0] == 403  # no cookie
        assert server.spool.failed_ids() == [failed_id]
        status, headers, _ = browser.request(f"/messages/{failed_id}/retry", {"csrftoken": csrf_of(page)})
        assert status == 303 and headers["Location"] == f"/messages/{failed_id}?done=retry"
        assert "Queued again" in browser.get(headers["Location"])
        assert await eventually(lambda: list((config.storage.path / config.buckets.amr_data).rglob("export.csv")))
        assert browser.request(f"/messages/{failed_id}/retry", {"csrftoken": csrf_of(page)})[0] == 409
        page = browser.get(f"/messages/{held_id}")
        assert "Release" in page and "From someone@else.example is not among the senders" in page
        assert browser.request(f"/messages/{held_id}/release", {})[0] == 403 and server.spool.quarantined_ids() == [held_id]
        status, headers, _ = browser.request(f"/messages/{held_id}/release", {"csrftoken": csrf_of(page)})
        assert status == 303 and "Released" in browser.get(headers["Location"])
        assert await eventually(lambda: len(list((config.storage.path / config.buckets.amr_data).rglob("export.csv"))) == 2)
        assert await finished(server)
        outcomes = [row[1] for row in Table(browser.get(f"/messages/{failed_id}"), "outcomes").body()]
        assert outcomes == ["failed", "retried"]
        assert [row[1] for row in Table(browser.get(f"/messages/{held_id}"), "outcomes").body()] == ["quarantined", "released"]


@local
async def test_markup_in_a_subject_and_a_file_name_shows_as_text(config):
    evil = '<script>alert("x")</script>'
    with RunningDaemon(with_page(config)) as server:
        entry_id = send(server, message(('<img src=x onerror="alert(1)">.csv', CSV), subject=evil))
        assert await finished(server)
        browser = Browser(server)
        for page in (browser.get("/messages"), browser.get(f"/messages/{entry_id}")):
            assert "<script>" not in page and "<img src=x" not in page
            assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
        assert Table(browser.get("/messages"), "messages").body()[0][3] == evil
        assert Table(browser.get(f"/messages/{entry_id}"), "files").body()[1][1] == '<img src=x onerror="alert(1)">.csv'
        _, headers, _ = browser.request("/")
        assert "default-src 'none'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
        assert headers["Cache-Control"] == "no-store"


@local
async def test_messages_are_paged_and_filtered_by_feed_state_and_text(config):
    """55 messages: 50 on the first page, newest first, 5 on the second; ?prefix=, ?state=, ?q= (From, Subject, file name)."""
    with RunningDaemon(with_page(config)) as server:
        ids = [send(server, message(subject="readings 0"))]
        time.sleep(1.1)  # newest first is by the second received; within one second the order is the ids'
        ids += [send(server, message(subject=f"readings {n}")) for n in range(1, 53)]
        time.sleep(1.1)
        send(server, message(("march-leeds.csv", CSV), subject="leeds", to=f"leeds@{DOMAIN}"), f"leeds@{DOMAIN}")
        time.sleep(1.1)
        send(server, message(subject="from npower", sender="exports@npower.example"))
        assert await finished(server)
        browser = Browser(server)
        first = Table(browser.get("/messages"), "messages").body()
        second = Table(browser.get("/messages?page=2"), "messages").body()
        assert len(first) == 50 and len(second) == 5
        assert first[0][3] == "from npower" and second[-1][3] == "readings 0"
        assert [row[1] for row in Table(browser.get("/messages?prefix=leeds"), "messages").body()] == ["leeds"]
        assert [row[3] for row in Table(browser.get("/messages?q=npower"), "messages").body()] == ["from npower"]
        assert [row[3] for row in Table(browser.get("/messages?q=march-leeds"), "messages").body()] == ["leeds"]
        assert len(Table(browser.get("/messages?state=stored&page=2"), "messages").body()) == 5
        assert Table(browser.get("/messages?state=failed"), "messages").body() == [["No messages match these filters."]]
        assert browser.request("/messages?state=nonsense")[0] == 400
        api = browser.json("/api/messages?prefix=sheffield")
        rest = browser.json("/api/messages?prefix=sheffield&page=2")
        assert len(api["messages"]) == 50 and api["next_page"] == 2 and rest["next_page"] is None
        listed = [m["id"] for m in api["messages"] + rest["messages"]]
        assert len(listed) == 54 and set(ids) < set(listed)  # and the message from npower


def test_the_history_survives_a_restart_and_a_damaged_one_is_set_aside(tmp_path, caplog):
    """Messages recorded before a restart are on the page after it; a file that is not a database is moved aside,
    logged, and the daemon takes mail and records it in a new history."""
    config = with_page(Config(storage=StorageConfig(path=tmp_path / "data"), spool=SpoolConfig(path=tmp_path / "spool", min_free=0),
                              worker=WorkerConfig(processes=1)))

    async def run(subject: str) -> list[str]:
        with RunningDaemon(config) as server:
            send(server, message(("export.csv", CSV + subject.encode() + b"\r\n"), subject=subject))
            assert await finished(server)
            return [row[3] for row in Table(Browser(server).get("/messages"), "messages").body()]

    import asyncio

    assert asyncio.run(run("before")) == ["before"]
    assert asyncio.run(run("after")) == ["after", "before"]
    (tmp_path / "spool" / "history.sqlite").write_bytes(b"this is not a database " * 100)
    for leftover in (tmp_path / "spool").glob("history.sqlite-*"):
        leftover.unlink()
    with caplog.at_level("ERROR", logger="esmail.history"):
        assert asyncio.run(run("damaged")) == ["damaged"]
    assert any("cannot be used" in r.getMessage() and "moved aside" in r.getMessage() for r in caplog.records)
    [aside] = (tmp_path / "spool").glob("history.sqlite.damaged-*")
    assert aside.read_bytes().startswith(b"this is not a database")
    assert len(list((tmp_path / "data").rglob("export*.csv"))) == 3


@local
async def test_the_history_forgets_what_is_older_than_keep_days(config):
    """Rows of a message received before keep_days are pruned (daily; at start too); newer ones stay."""
    from esmail.history import Finished, SqliteHistory

    history = SqliteHistory(config.spool.path)
    old = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 10 * 86400))
    await history.record(Finished("old-1", old, "smtp", "stored", {"sheffield": "stored"}))
    history.close()
    with RunningDaemon(replace(with_page(config), history=replace(config.history, keep_days=5))) as server:
        entry_id = send(server, message())
        assert await finished(server)
        assert await eventually(lambda: [m["id"] for m in Browser(server).json("/api/messages")["messages"]] == [entry_id])
    with sqlite3.connect(config.spool.path / "history.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM outcomes WHERE id = 'old-1'").fetchone()[0] == 0
