"""The page in a real browser: Debian's headless Chromium driven by selenium through the system chromedriver."""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from dataclasses import replace

import pytest

from conftest import RunningDaemon, eventually
from esmail.config import FeedConfig, WorkerConfig
from test_file_checks import declared_in_toml, dns, send_checked  # noqa: F401 - dns: the suite's DNS server, a fixture
from test_web import message, quarantining, send, with_page


@pytest.fixture
def chrome(tmp_path):
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        if os.environ.get("CI"):
            pytest.fail("Chromium is not installed, and CI is set: .ci/run must install the Debian packages chromium and chromium-driver")
        pytest.skip("Chromium is not installed: apt-get install chromium chromium-driver (the page is tested in a real browser)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_a_person_reads_the_feeds_opens_a_failed_message_and_retries_it(config, chrome, tmp_path):
    """The feeds table and the chart on /, the failed message from the list, Retry pressed: the page says it is queued
    again, and once the storage is back the message shows as stored with its CSV."""
    from selenium.webdriver.common.by import By

    blocked = tmp_path / "data"
    blocked.write_text("a file where the buckets' folder should be")
    with RunningDaemon(replace(with_page(config), worker=WorkerConfig(processes=1, max_attempts=1))) as server:
        failed_id = send(server, message(subject="March readings"))
        assert await eventually(lambda: server.spool.failed_ids() == [failed_id])
        blocked.unlink()
        base = f"http://127.0.0.1:{server.daemon.monitor.port}"

        chrome.get(base + "/")
        rows = chrome.find_elements(By.CSS_SELECTOR, "table.feeds tbody tr")
        assert [row.get_attribute("data-prefix") for row in rows] == ["sheffield"]
        assert rows[0].find_element(By.CSS_SELECTOR, ".badge").text == "failed"
        assert chrome.find_element(By.CSS_SELECTOR, "svg.chart").is_displayed()
        assert "0 stored" in chrome.find_element(By.CSS_SELECTOR, "section.totals").text

        chrome.find_element(By.LINK_TEXT, "Failed").click()
        chrome.find_element(By.CSS_SELECTOR, f'tr[data-id="{failed_id}"] a').click()
        assert chrome.find_element(By.TAG_NAME, "h1").text == "March readings"
        assert chrome.find_element(By.CSS_SELECTOR, "p.state .badge").text == "failed"

        chrome.find_element(By.XPATH, "//button[text()='Retry']").click()
        assert chrome.find_element(By.CSS_SELECTOR, "p.note").text == "Queued again: the worker takes it now."
        assert chrome.current_url == f"{base}/messages/{failed_id}?done=retry"

        def stored() -> bool:
            chrome.get(f"{base}/messages/{failed_id}")
            return chrome.find_element(By.CSS_SELECTOR, "p.state .badge").text == "stored"

        assert await eventually(stored, timeout=30, interval=0.5)
        keys = [cell.text for cell in chrome.find_elements(By.CSS_SELECTOR, "table.files tbody td:nth-child(6)")]
        assert any(key.startswith("sheffield/") and key.endswith("/export.csv") for key in keys)
        outcomes = [cell.text for cell in chrome.find_elements(By.CSS_SELECTOR, "table.outcomes tbody td:nth-child(2)")]
        assert outcomes == ["failed", "retried"]


class Attacker(http.server.ThreadingHTTPServer):
    """Another site's page on this host: it sets its own `csrftoken` cookie (cookies ignore ports, so the esmail page on
    127.0.0.1 gets it too) and at once submits a release form for the quarantined entry with the same value."""

    def __init__(self, host: str, action: str):
        page = (f'<!doctype html><title>cute cats</title><form method="post" action="{action}">'
                '<input type="hidden" name="csrftoken" value="forged"></form><script>document.forms[0].submit()</script>').encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Set-Cookie", "csrftoken=forged; Path=/")
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://{host}:{self.server_address[1]}/"
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_a_page_on_another_site_cannot_release_an_entry_but_the_page_itself_can(config, chrome):
    """A page on another port of 127.0.0.1 (same site: its cookie reaches esmail) and one on localhost (cross-site) each set
    a cookie and submit the release form: the browser shows 403 and the entry stays quarantined; then the person presses
    Release on the esmail page itself and it is released."""
    from selenium.webdriver.common.by import By

    with RunningDaemon(quarantining(config)) as server:
        held_id = send(server, message(sender="someone@else.example", subject="held"))
        assert await eventually(lambda: server.spool.quarantined_ids() == [held_id])
        base = f"http://127.0.0.1:{server.daemon.monitor.port}"
        for host in ("127.0.0.1", "localhost"):
            attacker = Attacker(host, f"{base}/messages/{held_id}/release")
            try:
                chrome.get(attacker.url)
                assert await eventually(lambda: chrome.current_url.startswith(base), timeout=10), chrome.current_url
                assert chrome.find_element(By.TAG_NAME, "body").text.startswith("403: this form was sent from another site")
            finally:
                attacker.shutdown()
                attacker.server_close()
            assert server.spool.quarantined_ids() == [held_id]
        assert {cookie["name"]: cookie["value"] for cookie in chrome.get_cookies()}["csrftoken"] == "forged"  # the attack was real

        chrome.get(f"{base}/messages/{held_id}")
        chrome.find_element(By.XPATH, "//button[text()='Release']").click()
        assert chrome.find_element(By.CSS_SELECTOR, "p.note").text.startswith("Released")
        assert await eventually(lambda: not server.spool.quarantined_ids())


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_the_feeds_times_stay_on_one_line_at_1280_px(config, chrome):
    """A laptop's 1280 px: "Last message" (time, UTC, how long ago) and "Last CSV stored" (its time, over its readings) do not
    wrap, even beside long names."""
    from selenium.webdriver.common.by import By

    from conftest import free_port
    from esmail.config import Address, DnsConfig, FeedConfig

    declared = (FeedConfig("sheffield", "Sheffield City Council, half-hourly electricity via npower", expected_every=86400.0),
                FeedConfig("leeds", "Leeds City Council, gas and electricity from three suppliers", expected_every=43200.0))
    quiet_dns = DnsConfig(nameservers=(Address("127.0.0.1", free_port()),), timeout=0.5)  # no answers: quick temperror, open feeds
    with RunningDaemon(replace(with_page(config), feeds=declared, dns=quiet_dns, worker=WorkerConfig(processes=1))) as server:
        send(server, message(subject="March readings"))
        assert await eventually(lambda: not server.spool.pending() and list(config.storage.path.rglob("export.csv")))
        chrome.set_window_size(1280, 800)
        chrome.get(f"http://127.0.0.1:{server.daemon.monitor.port}/")
        [row] = [row for row in chrome.find_elements(By.CSS_SELECTOR, "table.feeds tbody tr") if row.get_attribute("data-prefix") == "sheffield"]
        for cell in row.find_elements(By.CSS_SELECTOR, "td.when .time"):  # the CSV's readings are under its time
            tops = chrome.execute_script("const r = document.createRange(); r.selectNodeContents(arguments[0]); "
                                         "return [...r.getClientRects()].map(x => x.top)", cell)
            assert "UTC" in cell.text and max(tops) - min(tops) < 10, f"{cell.text!r} wraps at 1280 px"


async def phone(chrome) -> None:
    """A 390 px wide screen (headless Chromium keeps windows at least 500 px wide: the viewport is set through DevTools),
    in effect before the test's first page."""
    chrome.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    chrome.get("data:text/html,<meta name=viewport content='width=device-width'>")
    assert await eventually(lambda: chrome.execute_script("return window.innerWidth") == 390, timeout=10)


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_on_a_phone_no_page_is_wider_than_the_screen(config, chrome, tmp_path):
    """At 390 px, `/`, `/messages` and a failed message's page (long names, keys and errors, two feeds, a chart) are
    no wider than the screen, without hiding what overflows; the chart fits the width and its counts are in a table."""
    from selenium.webdriver.common.by import By

    blocked = tmp_path / "data" / config.buckets.amr_data
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the amr-data folder should be")
    feeds = (FeedConfig("sheffield", "Sheffield City Council", senders=("*@supplier.example",), authenticated=False),
             FeedConfig("leeds-city-council-half-hourly-electricity", "Leeds City Council, half-hourly electricity exports"))
    long_name = "Half-hourly electricity consumption export for all council buildings, March.csv"
    with RunningDaemon(replace(with_page(config), feeds=feeds, worker=WorkerConfig(processes=1, max_attempts=1))) as server:
        failed_id = send(server, message((long_name, b"MPAN,00:30\r\n1,2\r\n"), subject="Readings " + "for every site " * 8),
                         "sheffield@datafeeds.example.org", "leeds-city-council-half-hourly-electricity@datafeeds.example.org")
        send(server, message(sender="someone.with.a.very.long.address@a-supplier-with-a-long-domain.example", subject="held"))
        assert await eventually(lambda: server.spool.failed_ids() == [failed_id] and len(server.spool.quarantined_ids()) == 1)
        base = f"http://127.0.0.1:{server.daemon.monitor.port}"
        await phone(chrome)
        for path in ("/", "/messages", f"/messages/{failed_id}"):
            chrome.get(base + path)
            styled = "return getComputedStyle(document.querySelector('header')).display == 'flex'"  # esmail.css is in effect
            assert await eventually(lambda: chrome.execute_script(styled), timeout=10), path
            width, inner, overflow = chrome.execute_script(
                "return [document.documentElement.scrollWidth, window.innerWidth,"
                " [getComputedStyle(document.documentElement).overflowX, getComputedStyle(document.body).overflowX]]")
            assert inner == 390 and width <= inner, (path, width, inner)
            assert overflow == ["visible", "visible"], path
        chrome.get(base + "/")
        assert chrome.find_element(By.CSS_SELECTOR, "svg.chart").size["width"] <= 390 - 16
        chrome.find_element(By.CSS_SELECTOR, "details.per-day summary").click()
        [today] = chrome.find_elements(By.CSS_SELECTOR, "table.days tbody tr")
        assert today.text.split()[-3:] == ["0", "1", "1"]  # stored, quarantined, failed today


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_on_a_phone_the_importers_reports_fit_the_screen(config, chrome, dns, tmp_path):
    """At 390 px, `/` and the pages of a CSV whose header changed and of one with warnings are no wider than the screen,
    with every report's details open; a row of 48 readings scrolls inside its own box, and its verdict shows."""
    from selenium.webdriver.common.by import By

    with RunningDaemon(declared_in_toml(config, dns, tmp_path)) as server:
        with_warnings, header_changed = await send_checked(server)
        base = f"http://127.0.0.1:{server.daemon.monitor.port}"
        await phone(chrome)
        for path, verdict in (("/", "header changed"), (f"/messages/{header_changed}", "header changed"), (f"/messages/{with_warnings}", "warnings")):
            chrome.get(base + path)
            styled = "return getComputedStyle(document.querySelector('header')).display == 'flex'"
            assert await eventually(lambda: chrome.execute_script(styled), timeout=10), path
            for summary in chrome.find_elements(By.CSS_SELECTOR, "article.check details summary"):
                summary.click()
            assert chrome.find_element(By.CSS_SELECTOR, "td.status .badge, article.check h3 .badge").text == verdict
            width, inner = chrome.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
            assert inner == 390 and width <= inner, (path, width, inner)
            for row in chrome.find_elements(By.CSS_SELECTOR, "pre.row"):
                scroll, client, right = chrome.execute_script(
                    "const e = arguments[0]; return [e.scrollWidth, e.clientWidth, e.getBoundingClientRect().right]", row)
                assert scroll > client and right <= 390, (path, row.text[:40], scroll, client, right)
        assert len(chrome.find_elements(By.CSS_SELECTOR, "ul.examples pre.row")) == 2
