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
from datetime import datetime
from email.message import EmailMessage
from html.parser import HTMLParser

import pytest

from conftest import RunningDaemon, eventually, free_port
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

    def __init__(self, server: RunningDaemon | str, password: str | None = None, host: str = "127.0.0.1"):
        """`server`: a daemon in this process, or the page's base URL (another process's); `host`: the daemon's address to use."""
        self.base = server if isinstance(server, str) else f"http://{host}:{server.daemon.monitor.port}"
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect)
        self.password = password

    def request(self, path: str, form: dict | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
        body = urllib.parse.urlencode(form).encode() if form is not None else None
        request = urllib.request.Request(self.base + path, data=body, headers=headers or {})
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
    """The queue is empty and no attempt is still under way (its outcome is in the history)."""
    return await eventually(lambda: not server.spool.pending() and not server.daemon.scheduler._running)


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
    """sheffield got a CSV (ok), leeds only a PNG (unprocessable files, listed first), npower is declared and silent
    (ok, never); the chart counts today."""
    feeds = (FeedConfig("sheffield", "Sheffield City Council"), FeedConfig("leeds", "Leeds"), FeedConfig("npower"))
    with RunningDaemon(replace(with_page(config), feeds=feeds)) as server:
        send(server, message())
        send(server, message(("logo.png", b"\x89PNG\r\n\x1a\nnot really")), f"leeds@{DOMAIN}")
        assert await finished(server)
        page = Browser(server).get("/")
        api = Browser(server).json("/api/feeds")
    rows = {row[0].split()[0]: row for row in Table(page, "feeds").body()}
    assert rows["sheffield"][:3] == ["sheffield Sheffield City Council", "ok", "nothing"] and rows["sheffield"][5] == "1"
    assert rows["sheffield"][4].endswith(" UTC export.csv 1 row")
    assert rows["leeds"][1:3] == ["unprocessable files", "1 unprocessable file in 1 message, 7 days"] and rows["leeds"][4] == "never"
    assert rows["npower"][1:4] == ["ok", "nothing", "never"]
    assert "Last 24 hours: 2 stored, 0 quarantined, 0 failed" in " ".join(re.sub(r"<[^>]+>", "", page).split())
    assert '<svg xmlns="http://www.w3.org/2000/svg" class="chart"' in page
    today = api["days"][-1]
    assert today["stored"] == 2 and re.search(rf'data-day="{today["day"]}" opacity="0.6"><title>{today["day"]} \(today, so far\): 2 stored</title>', page)
    assert [feed["prefix"] for feed in api["feeds"]] == ["leeds", "sheffield", "npower"]


def test_a_day_with_one_failure_among_many_stored_shows_it_on_the_chart():
    """1 failed and 1 quarantined beside 1,000 stored: each still draws a bar the eye can find (a few units, not 0.14),
    the scale reads 0, 1000, 2000 (1,002 is over 1,000), and the day's total is written over its bar."""
    from esmail.web.chart import MIN_BAR, daily_bars

    svg = str(daily_bars([{"day": "2026-12-05", "stored": 1000, "quarantined": 1, "failed": 1},
                          {"day": "2026-12-06", "stored": 0, "quarantined": 0, "failed": 0}]))
    heights = {state: float(height) for state, height in re.findall(r'<rect class="(\w+)" [^>]*height="([\d.]+)"', svg)}
    assert heights["failed"] >= MIN_BAR and heights["quarantined"] >= MIN_BAR and heights["stored"] == 70.0
    assert [label for label in re.findall(r'text-anchor="end" fill="#555">(\d+)</text>', svg)][:3] == ["0", "1000", "2000"]
    assert ">1002</text>" in svg and "2026-12-05: 1000 stored, 1 quarantined, 1 failed" in svg


@local
async def test_a_feed_goes_late_and_recovers(config, caplog):
    """expected_every = 3 s: after 4.5 s of nothing the page (saying when mail was expected), /metrics and one warning
    say late; a message makes it ok, with an info line."""
    with caplog.at_level("INFO", logger="esmail.daemon"), \
            RunningDaemon(replace(with_page(config), feeds=(FeedConfig("leeds", expected_every=3.0),))) as server:
        browser = Browser(server)
        assert await eventually(lambda: Table(browser.get("/"), "feeds").body()[0][1].startswith("late"), timeout=10)
        [feed] = browser.json("/api/feeds")["feeds"]
        declared = browser.json("/api/feeds")["feeds"][0]["expected_by"]
        assert feed["status"] == "late" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", declared)
        expected = datetime.fromisoformat(declared).strftime("%Y-%m-%d %H:%M:%S UTC")
        assert Table(browser.get("/"), "feeds").body()[0][1] == f"late mail was expected by {expected}"
        assert await eventually(lambda: 'esmail_feed_late{prefix="leeds"} 1.0' in browser.get("/metrics"), timeout=10)
        send(server, message(to=f"leeds@{DOMAIN}"), f"leeds@{DOMAIN}")
        assert await eventually(lambda: Table(browser.get("/"), "feeds").body()[0][1] == "ok", timeout=10)
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
async def test_the_stylesheet_link_names_its_content_so_an_upgrade_is_never_shown_with_an_old_one(config):
    """The page links /static/esmail.css?v=<the first 12 hex digits of the served stylesheet's SHA-256>: a browser
    that cached the stylesheet of an earlier esmail fetches the new one with the new page."""
    import hashlib

    with RunningDaemon(with_page(config)) as server:
        browser = Browser(server)
        [link] = re.findall(r'<link rel="stylesheet" href="([^"]+)">', browser.get("/"))
        status, headers, css = browser.request(link)
    assert status == 200 and headers["Content-Type"].startswith("text/css") and b".chart" in css
    assert link == f"/static/esmail.css?v={hashlib.sha256(css).hexdigest()[:12]}"


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


def quarantining(config: Config) -> Config:
    """The page, and a feed that quarantines mail from anyone but the council."""
    return replace(with_page(config), feeds=(FeedConfig("sheffield", senders=("*@sheffield.gov.uk",), authenticated=False),))


@local
async def test_a_forged_token_another_origin_or_a_cross_site_post_is_refused_and_the_own_form_works(config):
    """A cookie and field of the attacker's choosing, the page's own token sent from another origin or cross-site: 403,
    the entry stays quarantined; the page's own form, as a browser sends it: 303 and released."""
    with RunningDaemon(quarantining(config)) as server:
        held_id = send(server, message(sender="someone@else.example"))
        assert await eventually(lambda: server.spool.quarantined_ids() == [held_id])
        browser = Browser(server)
        token = csrf_of(browser.get(f"/messages/{held_id}"))
        own = browser.base
        release = f"/messages/{held_id}/release"
        for forged in ("x", "x" * 43, token.split(".")[0] + "." + "0" * 64, token.split(".")[0]):
            status, _, body = Browser(server).request(release, {"csrftoken": forged}, {"Cookie": f"csrftoken={forged}"})
            assert status == 403 and b"CSRF token" in body, forged
        for headers in ({"Origin": "http://evil.example"}, {"Origin": f"http://127.0.0.1:{free_port()}"}, {"Origin": "null"},
                        {"Origin": own.replace("http:", "https:")}, {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                        {"Origin": own, "Sec-Fetch-Site": "cross-site"}):
            status, _, body = browser.request(release, {"csrftoken": token}, headers)
            assert status == 403 and b"403: this form was sent from another site" in body, headers
        assert server.spool.quarantined_ids() == [held_id]
        status, headers, _ = browser.request(release, {"csrftoken": token}, {"Origin": own, "Sec-Fetch-Site": "same-origin"})
        assert status == 303 and headers["Location"] == f"/messages/{held_id}?done=release"
        assert await eventually(lambda: not server.spool.quarantined_ids())


@local
async def test_the_signing_key_is_kept_in_the_spool_so_an_open_page_survives_a_restart(config):
    """{spool}/http-secret is made once (0600); a page's token from before a restart still releases after it."""
    config = quarantining(config)
    with RunningDaemon(config) as server:
        held_id = send(server, message(sender="someone@else.example"))
        assert await eventually(lambda: server.spool.quarantined_ids() == [held_id])
        browser = Browser(server)
        token = csrf_of(browser.get(f"/messages/{held_id}"))
    secret = config.spool.path / "http-secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_bytes()) == 32
    key = secret.read_bytes()
    with RunningDaemon(config) as server:
        browser.base = f"http://127.0.0.1:{server.daemon.monitor.port}"
        status, _, _ = browser.request(f"/messages/{held_id}/release", {"csrftoken": token})
        assert status == 303 and secret.read_bytes() == key


@local
def test_the_token_cookie_is_secure_when_a_local_proxy_says_the_browser_used_tls(config):
    """X-Forwarded-Proto: https from a proxy on this host: the cookie is Secure; plain HTTP: it is not (the browser would drop it)."""
    with RunningDaemon(with_page(config)) as server:
        _, headers, _ = Browser(server).request("/", headers={"X-Forwarded-Proto": "https"})
        assert "Secure" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        _, headers, _ = Browser(server).request("/")
        assert "Secure" not in headers["Set-Cookie"]


@local
async def test_links_planted_in_a_bucket_are_not_served_but_a_real_file_beside_them_is(config, tmp_path):
    """A file link and folder links (to / and to a folder outside) in the amr-data folder: 404, the target's bytes nowhere;
    the stored CSV beside them: 200 with its bytes."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for the page")
    with RunningDaemon(with_page(config)) as server:
        send(server, message())
        assert await finished(server)
        amr = config.storage.path / config.buckets.amr_data
        [stored] = amr.rglob("export.csv")
        (stored.parent / "planted.csv").symlink_to(outside / "secret.txt")
        (amr / "sheffield" / "root").symlink_to("/")
        (amr / "elsewhere").symlink_to(outside)
        browser = Browser(server)
        base = f"/objects/{config.buckets.amr_data}"
        key = stored.relative_to(amr).as_posix()
        hostname = open("/etc/hostname", "rb").read()
        for path in (f"{base}/{key.replace('export.csv', 'planted.csv')}", f"{base}/sheffield/root/etc/hostname",
                     f"{base}/elsewhere/secret.txt"):
            status, _, body = browser.request(path)
            assert status == 404 and b"not for the page" not in body and hostname not in body, path
        assert browser.request(f"{base}/{key}")[:3:2] == (200, stored.read_bytes())


@local
async def test_every_error_has_the_page_headers_no_banner_and_no_traceback(config, caplog):
    """A huge page number, a folder or an overlong name as key, an unknown path, a refused form, the wrong state, and a 500
    when the spool is broken: each 4xx (or 500) with the page's security headers and no `Server` banner; no traceback for the 4xx."""
    with caplog.at_level("INFO"), RunningDaemon(quarantining(config)) as server:
        stored_id = send(server, message(sender="reports@sheffield.gov.uk"))
        held_id = send(server, message(sender="someone@else.example"))
        assert await eventually(lambda: server.spool.quarantined_ids() == [held_id])
        browser = Browser(server)
        token = csrf_of(browser.get(f"/messages/{held_id}"))
        amr = config.buckets.amr_data
        answers = [(path, browser.request(path)) for path in (
            "/messages?page=99999999999999999999", "/api/messages?page=99999999999999999999", "/messages?page=0", "/messages?page=x",
            f"/objects/{amr}/sheffield", f"/objects/{amr}/sheffield/" + "a" * 300 + ".csv", "/no/such/page", "/messages/nobody")]
        answers.append(("release without a token", browser.request(f"/messages/{stored_id}/release", {})))
        answers.append(("release when stored", browser.request(f"/messages/{stored_id}/release", {"csrftoken": token})))
        assert [(path, status) for path, (status, _, _) in answers] == [
            ("/messages?page=99999999999999999999", 400), ("/api/messages?page=99999999999999999999", 400), ("/messages?page=0", 400),
            ("/messages?page=x", 400), (f"/objects/{amr}/sheffield", 404), (f"/objects/{amr}/sheffield/" + "a" * 300 + ".csv", 404),
            ("/no/such/page", 404), ("/messages/nobody", 404), ("release without a token", 403), ("release when stored", 409)]
        assert b"page must be a number from 1 to 1,000,000" in answers[0][1][2]
        assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]
        failed = config.spool.path / "failed"
        failed.rename(config.spool.path / "failed.aside")
        failed.write_text("a file where a folder should be")
        answers.append(("broken spool", browser.request("/")))
        failed.unlink()
        (config.spool.path / "failed.aside").rename(failed)
        assert answers[-1][1][0] == 500
        answers.append(("a page", browser.request("/")))
        for path, (status, headers, _) in answers:
            assert "default-src 'none'" in headers["Content-Security-Policy"], path
            assert (headers["X-Frame-Options"], headers["X-Content-Type-Options"], headers["Cache-Control"]) == ("DENY", "nosniff", "no-store"), path
            assert "Server" not in headers, (path, headers.get("Server"))


@local
async def test_twenty_wrong_passwords_in_a_minute_get_429_until_it_has_passed(config, caplog):
    """The 21st try from an address within a minute is 429, the right password too, until a minute after its first failure;
    others (another address behind the local proxy) still get in; one warning per minute; /metrics counts the wrong passwords."""
    now = [1000.0]
    guesser = {"X-Forwarded-For": "198.51.100.7"}

    def failures() -> float:
        return float(re.search(r"^esmail_http_login_failures_total (\S+)$", Browser(server, PASSWORD).get("/metrics"), re.M).group(1))

    with caplog.at_level("INFO", logger="esmail"), RunningDaemon(with_page(config, PASSWORD)) as server:
        server.daemon.monitor.logins.clock = lambda: now[0]
        before = failures()
        assert [Browser(server, f"guess {n}").request("/", headers=guesser)[0] for n in range(20)] == [401] * 20
        status, headers, body = Browser(server, "guess 21").request("/", headers=guesser)
        assert status == 429 and headers["Retry-After"] == "60" and b"too many wrong passwords from 198.51.100.7" in body
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        now[0] += 30
        assert Browser(server, PASSWORD).request("/", headers=guesser)[0] == 429
        assert Browser(server, PASSWORD).request("/", headers={"X-Forwarded-For": "203.0.113.9, 198.51.100.7"})[0] == 429  # the proxy's entry is last
        assert Browser(server, PASSWORD).request("/", headers={"X-Forwarded-For": "203.0.113.9"})[0] == 200
        assert Browser(server, PASSWORD).request("/")[0] == 200  # loopback itself, not throttled
        assert Browser(server, "guess 22").request("/healthz", headers=guesser)[0] == 200
        now[0] += 29.9
        assert Browser(server, PASSWORD).request("/", headers=guesser)[0] == 429
        assert failures() - before == 21  # the 20, and the wrong one answered 429
        now[0] += 0.1
        assert Browser(server, PASSWORD).request("/", headers=guesser)[0] == 200
        warnings = [r.getMessage() for r in caplog.records if "wrong passwords" in r.getMessage()]
        assert warnings == ["page: 20 wrong passwords from 198.51.100.7 within 60 s: it gets 429 for the next 60 s"]
        assert [Browser(server, "again").request("/", headers=guesser)[0] for n in range(21)] == [401] * 20 + [429]
        assert len([r for r in caplog.records if "wrong passwords" in r.getMessage()]) == 2


def non_loopback_address() -> str:
    """This host's address on its outgoing interface (no packet is sent), or skip."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            pytest.skip("this host has no non-loopback IPv4 address")
        return probe.getsockname()[0]


@local
def test_x_forwarded_for_counts_only_from_a_proxy_on_this_host(config):
    """From a peer that is not loopback, X-Forwarded-For is the client's own word: a guesser naming a new address each time
    is still throttled at 20, and X-Forwarded-Proto does not make the cookie Secure."""
    address = non_loopback_address()
    config = with_page(config, PASSWORD)
    with RunningDaemon(replace(config, http=replace(config.http, listen=Address("0.0.0.0", 0)))) as server:
        status, headers, _ = Browser(server, PASSWORD, host=address).request("/", headers={"X-Forwarded-Proto": "https"})
        assert status == 200 and "Secure" not in headers["Set-Cookie"]
        statuses = [Browser(server, "guess", host=address).request("/", headers={"X-Forwarded-For": f"198.51.100.{n}"})[0]
                    for n in range(21)]
        assert statuses == [401] * 20 + [429]
        assert Browser(server, PASSWORD, host=address).request("/")[0] == 429
        assert Browser(server, PASSWORD).request("/")[0] == 200  # loopback is another address


def test_the_login_throttle_remembers_a_bounded_number_of_addresses():
    """Past TRACKED_ADDRESSES the oldest address is forgotten first; the newest stays throttled."""
    from esmail.web.access import LOGIN_LIMIT, TRACKED_ADDRESSES, Logins

    now = [0.0]
    logins = Logins(clock=lambda: now[0])
    for n in range(TRACKED_ADDRESSES + 1):
        now[0] += 0.001
        logins.failed(f"10.0.{n // 256}.{n % 256}")
    assert len(logins.windows) == TRACKED_ADDRESSES and "10.0.0.0" not in logins.windows
    for _ in range(LOGIN_LIMIT):
        logins.failed("2001:db8::1")
    assert logins.throttled("2001:db8::1") == pytest.approx(60) and logins.throttled("10.0.0.1") == 0
