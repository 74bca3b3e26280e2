"""What needs a human, at a glance (issue 24): problem counts and filters, a message's state under every feed, each
count on `/` equal to the rows its link opens, a failed message's attachments and attempts, who retried or released,
and search by an attachment's name as sent. Over HTTP against the running daemon, as the data team's browser asks."""

from __future__ import annotations

import html
import io
import re
import zipfile
from dataclasses import replace
from email.message import EmailMessage

import pytest

from conftest import RunningDaemon, eventually
from esmail.config import FeedConfig, WorkerConfig
from test_web import CSV, DOMAIN, PASSWORD, Browser, Table, csrf_of, finished, message, send, with_page

local = pytest.mark.parametrize("config", ["local"], indirect=True)


def every_count_opens_its_rows(browser: Browser) -> dict[str, int]:
    """Each count on `/` that links to a list: the list's total, its JSON's and the rows on its page equal the count.
    Returns link → count, for the test to look at."""
    links = re.findall(r'<a class="count[^"]*" data-count="(\d+)" href="([^"]+)">', browser.get("/"))
    assert links
    for count, href in links:
        href = html.unescape(href)
        listed = browser.json("/api" + href)
        assert listed["total"] == int(count) and len(listed["messages"]) == min(int(count), 50), (href, count, listed["total"])
        rows = Table(browser.get(href), "messages").body()
        assert len(rows) == int(count) or (int(count) == 0 and rows == [["No messages match these filters."]]), (href, rows)
    return {html.unescape(href): int(count) for count, href in links}


def without_attachments(subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "meters@supplier.example", f"sheffield@{DOMAIN}", subject
    msg.set_content("The readings follow tomorrow.")
    return msg.as_bytes().replace(b"\n", b"\r\n")


def listed(browser: Browser, query: str = "") -> dict[str, dict]:
    """The first page of /api/messages?query: subject → item."""
    return {m["subject"]: m for m in browser.json(f"/api/messages?{query}")["messages"]}


@local
async def test_a_good_a_corrupt_and_an_empty_message_each_say_what_came_of_them(config):
    """Each row says `1 CSV`, `1 unprocessable` or `no files` (the API: csv_count, unprocessable_count); ?files=unprocessable
    and ?files=none list those; the feed counts its unprocessable files over 7 days although its last message had none."""
    with RunningDaemon(with_page(config)) as server:
        send(server, message(("export.csv", CSV), subject="good"))
        send(server, message(("meters.xlsx", b"PK\x03\x04 not really a workbook"), subject="corrupt"))
        send(server, message(("invoice.pdf", b"%PDF-1.4 not data"), subject="a pdf"))
        send(server, without_attachments("empty"))
        assert await finished(server)
        browser = Browser(server)
        rows = {row[3]: row[5] for row in Table(browser.get("/messages"), "messages").body()}
        assert rows == {"good": "1 CSV", "corrupt": "1 unprocessable", "a pdf": "1 unprocessable", "empty": "no files"}
        items = listed(browser)
        assert {s: (m["csv_count"], m["unprocessable_count"]) for s, m in items.items()} == {
            "good": (1, 0), "corrupt": (0, 1), "a pdf": (0, 1), "empty": (0, 0)}
        assert set(listed(browser, "files=unprocessable")) == {"corrupt", "a pdf"}
        assert set(listed(browser, "files=none")) == {"empty"}
        assert browser.request("/messages?files=nonsense")[0] == 400
        [feed] = browser.json("/api/feeds")["feeds"]
        assert feed["status"] == "unprocessable files" and feed["unprocessable_7d"]["files"] == 2
        [row] = Table(browser.get("/"), "feeds").body()
        assert row[2] == "2 unprocessable files in 2 messages, 7 days"
        assert every_count_opens_its_rows(browser)["/messages?prefix=sheffield&files=unprocessable&days=7"] == 2


@local
async def test_a_message_quarantined_for_one_feed_and_stored_for_another_is_listed_under_both(config, tmp_path):
    """The list and the API show both states (the API's `state` is the one that needs a human); ?state=quarantined and
    ?state=stored both list it; each feed shows what waits for it (failed, quarantined) as links first in the table;
    every count on `/` equals the rows its link opens."""
    (tmp_path / "data" / config.buckets.amr_data).mkdir(parents=True)
    (tmp_path / "data" / config.buckets.amr_data / "bristol").write_text("a file where a folder should be: storing for bristol fails")
    feeds = (FeedConfig("sheffield", senders=("*@sheffield.gov.uk",), authenticated=False), FeedConfig("leeds"), FeedConfig("bristol"),
             FeedConfig("npower"))
    config = replace(with_page(config), feeds=feeds, worker=WorkerConfig(processes=1, max_attempts=1))
    with RunningDaemon(config) as server:
        both = send(server, message(subject="shared export", sender="exports@leeds.gov.uk"), f"sheffield@{DOMAIN}", f"leeds@{DOMAIN}")
        send(server, message(subject="stranger", sender="someone@elsewhere.example"))
        send(server, message(subject="council", sender="meters@sheffield.gov.uk"))
        send(server, message(subject="bristol", to=f"bristol@{DOMAIN}"), f"bristol@{DOMAIN}")
        assert await eventually(lambda: len(server.spool.quarantined_ids()) == 2 and len(server.spool.failed_ids()) == 1)
        assert await finished(server)
        browser = Browser(server)
        item = listed(browser)["shared export"]
        assert item["state"] == "quarantined" and item["prefix_states"] == {"sheffield": "quarantined", "leeds": "stored"}
        row = {row[3]: row for row in Table(browser.get("/messages"), "messages").body()}["shared export"]
        assert row[4].startswith("quarantined sheffield stored leeds sheffield: From exports@leeds.gov.uk is not among the senders")
        assert set(listed(browser, "state=quarantined")) == {"shared export", "stranger"}
        assert set(listed(browser, "state=stored")) == {"shared export", "council"}
        assert set(listed(browser, "state=failed")) == {"bristol"}
        assert browser.json(f"/api/messages/{both}")["state"] == "quarantined"
        feeds_table = Table(browser.get("/"), "feeds").body()
        assert [(row[0], row[1], row[2]) for row in feeds_table] == [
            ("bristol", "failed", "1 failed"), ("sheffield", "quarantined", "2 quarantined"), ("leeds", "ok", "nothing"),
            ("npower", "ok", "nothing")]
        counts = every_count_opens_its_rows(browser)
        assert counts["/messages?state=quarantined"] == 2 and counts["/messages?state=failed"] == 1
        assert counts["/messages?prefix=sheffield&state=quarantined"] == 2 and counts["/messages?prefix=bristol&state=failed"] == 1
        assert counts["/messages?state=stored&days=1"] == 2 and counts["/messages?prefix=leeds&days=7"] == 1
        status, headers, _ = browser.request(f"/messages/{both}/release", {"csrftoken": csrf_of(browser.get(f"/messages/{both}"))})
        assert status == 303
        assert await eventually(lambda: listed(browser)["shared export"]["state"] == "stored")
        assert await finished(server)
        assert every_count_opens_its_rows(browser)["/messages?state=quarantined"] == 1


def zipped(*names: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name in names:
            archive.writestr(name, CSV.decode())
    return out.getvalue()


@local
async def test_a_failed_message_shows_its_attachments_and_each_attempt_and_after_its_retry_only_the_final_objects(config, tmp_path):
    """The CSVs' folder refuses: the failed message's page lists its attachments as sent (a zip, its size), each attempt
    with when, the step (storing which file), the error and what it had stored (the inbox copy: one object, with its
    Authentication-Results); Retry by the Basic user `data-team` stores it: the page lists the final objects, says the
    failure's copy in unprocessable was left behind, and the outcome says who retried it."""
    amr = tmp_path / "data" / config.buckets.amr_data
    amr.parent.mkdir(parents=True)
    amr.write_text("a file where the amr-data folder should be")
    feeds = (FeedConfig("sheffield", senders=("*@supplier.example",), authenticated=False),)
    config = replace(with_page(config, PASSWORD), feeds=feeds, worker=WorkerConfig(processes=1, max_attempts=2))
    archive = zipped("site-a.csv", "site-b.csv")
    with RunningDaemon(config) as server:
        entry_id = send(server, message(("readings.zip", archive), subject="March readings"))
        assert await eventually(lambda: server.spool.failed_ids() == [entry_id], timeout=30)
        browser = Browser(server, PASSWORD)
        page = browser.get(f"/messages/{entry_id}")
        assert Table(page, "attachments").body() == [["readings.zip", f"{len(archive)} B"]]
        [outcome] = Table(page, "outcomes").body()
        assert outcome[1:4] == ["failed", "", "2"]
        assert "attempt 1 failed, storing site-a.csv" in outcome[4] and "attempt 2 failed, storing" in outcome[4]
        assert "the same error" in outcome[4]
        tries = browser.json(f"/api/messages/{entry_id}")["outcomes"][0]["tries"]
        assert [t["step"] for t in tries] == [f"storing site-a.csv in {config.buckets.amr_data}"] * 2
        assert all(t["error"].startswith(f"cannot write {amr}/") and t["at"] for t in tries)
        assert [[s["bucket"] for s in t["stored"]] for t in tries] == [[config.buckets.inbox]] * 2
        [copy] = (tmp_path / "data" / config.buckets.inbox).rglob("*.eml")
        assert copy.read_bytes().startswith(b"Authentication-Results:")
        amr.unlink()
        status, headers, _ = browser.request(f"/messages/{entry_id}/retry", {"csrftoken": csrf_of(page)})
        assert status == 303
        assert await eventually(lambda: browser.json(f"/api/messages/{entry_id}")["state"] == "stored", timeout=30)
        detail = browser.json(f"/api/messages/{entry_id}")
    assert [(o["outcome"], o["by"]) for o in detail["outcomes"]] == [("failed", ""), ("retried", "data-team")]
    assert sorted((f["role"], f["name"]) for f in detail["files"]) == [
        ("amr_data", "site-a.csv"), ("amr_data", "site-b.csv"), ("inbox", f"{entry_id}.eml")]
    assert [(f["bucket"], f["left_by"]) for f in detail["left_behind"]] == [(config.buckets.unprocessable, "the failed outcome")]
    assert [copy] == list((tmp_path / "data" / config.buckets.inbox).rglob("*.eml"))
    assert Table(page, "attachments").body() == [["readings.zip", f"{len(archive)} B"]]


@local
async def test_release_records_who_released_it(config):
    """Release pressed by the Basic user `data-team`: the outcome says `released` by `data-team`, on the page and in the API."""
    config = replace(with_page(config, PASSWORD), feeds=(FeedConfig("sheffield", senders=("*@sheffield.gov.uk",), authenticated=False),))
    with RunningDaemon(config) as server:
        held = send(server, message(sender="someone@else.example"))
        assert await eventually(lambda: server.spool.quarantined_ids() == [held])
        browser = Browser(server, PASSWORD)
        status, _, _ = browser.request(f"/messages/{held}/release", {"csrftoken": csrf_of(browser.get(f"/messages/{held}"))})
        assert status == 303
        assert await eventually(lambda: browser.json(f"/api/messages/{held}")["state"] == "stored")
        assert [(o["outcome"], o["by"]) for o in browser.json(f"/api/messages/{held}")["outcomes"]] == [
            ("quarantined", ""), ("released", "data-team")]
        assert Table(browser.get(f"/messages/{held}"), "outcomes").body()[1][1:3] == ["released", "data-team"]


@local
async def test_search_finds_an_attachment_by_its_name_as_sent_and_the_list_counts_and_keeps_arrival_order(config):
    """?q=readings.zip finds the message whose zip became two CSVs (their names find it too); the list says how many
    messages match; messages of one second are listed newest first in the order they arrived."""
    with RunningDaemon(with_page(config)) as server:
        send(server, message(("readings.zip", zipped("site-a.csv", "site-b.csv")), subject="zipped"))
        burst = [send(server, message(subject=f"burst {n}")) for n in range(6)]
        assert await finished(server)
        browser = Browser(server)
        assert set(listed(browser, "q=readings.zip")) == {"zipped"}
        assert set(listed(browser, "q=site-b")) == {"zipped"}
        page = browser.get("/messages?q=burst")
        assert "<strong>6 messages</strong>" in page and browser.json("/api/messages?q=burst")["total"] == 6
        assert [m["id"] for m in browser.json("/api/messages?q=burst")["messages"]] == burst[::-1]


@local
async def test_a_quarantined_entry_dropped_after_quarantine_days_no_longer_counts_as_waiting(config):
    """An entry quarantined 31 days ago is dropped at start: its outcome says `dropped`, it leaves the quarantined list
    and count (a younger one stays), and ?state=dropped lists it."""
    import os
    import time

    from esmail.history import Finished, SqliteHistory
    from esmail.spool import Spool

    spool = Spool(config.spool.path)
    history = SqliteHistory(config.spool.path)
    old, young = (spool.accept(message(subject=subject), ["sheffield"]) for subject in ("old", "young"))
    for envelope, subject in ((old, "old"), (young, "young")):
        entry = spool.entry(envelope.id)
        spool.quarantine(entry, spool.message(entry), {"sheffield": "From x is not among the senders"}, "Authentication-Results: x; none")
        spool.done(envelope.id)
        await history.record(Finished(envelope.id, envelope.received, "smtp", "quarantined", {"sheffield": "quarantined"}, subject=subject))
    history.close()
    long_ago = time.time() - 31 * 86400
    os.utime(spool.quarantine_dir / f"{old.id}.msg", (long_ago, long_ago))
    feeds = (FeedConfig("sheffield", senders=("*@sheffield.gov.uk",), authenticated=False),)
    with RunningDaemon(replace(with_page(config), feeds=feeds)) as server:
        browser = Browser(server)
        assert await eventually(lambda: browser.json(f"/api/messages/{old.id}")["state"] == "dropped")
        assert [o["outcome"] for o in browser.json(f"/api/messages/{old.id}")["outcomes"]] == ["quarantined", "dropped"]
        assert set(listed(browser, "state=quarantined")) == {"young"} and set(listed(browser, "state=dropped")) == {"old"}
        assert every_count_opens_its_rows(browser)["/messages?state=quarantined"] == 1
