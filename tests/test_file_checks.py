"""The checks of DESIGN §16 where they show: the daemon over SMTP (history, /metrics, the log, Rollbar, the hold and
its release), the message page, /api and the feeds, learned shapes, the history's new column, and `esmail check` on a
supplier's files.

Mail goes over real sockets to a running daemon; Rollbar is a local HTTP server
that records what it is sent; DNS (the hold needs a [[feed]], so authentication
runs) is the suite's loopback server.
"""

from __future__ import annotations

import html
import io
import json
import re
import smtplib
import sqlite3
import subprocess
import sys
import time
import urllib.request
import zipfile
from dataclasses import replace
from datetime import date
from email.message import EmailMessage

import pytest
from openpyxl.utils import get_column_letter

from conftest import RunningDaemon, Server, config_toml, eventually, free_port
from dnsserver import DnsServer
from esmail import formats, metrics
from esmail.config import Address, Buckets, Config, FeedConfig, HttpConfig, SpoolConfig, StorageConfig, load
from esmail.history import SqliteHistory
from esmail.history import sqlite as sqlite_history
from esmail.importer import Report
from esmail.shapes import Shapes, seed
from sheets import xlsx
from test_operations import Recorder
from test_page_problems import every_count_opens_its_rows
from test_web import Browser, Table, csrf_of, finished, send

local = pytest.mark.parametrize("config", ["local"], indirect=True)

TIMES = [f"{h:02d}:{m:02d}" for h in range(24) for m in (0, 30)]
VALUES = ",".join(f"{i / 10:g}" for i in range(1, 49))
HEADER = "MPAN,Site,Date," + ",".join(TIMES)
MOVED = "MPAN,Site,Region,Date," + ",".join(TIMES)  # a column inserted before the date: every read column but MPAN moves
EXPORT = [{"id": 7, "identifier": "edf", "description": "EDF Energy", "number_of_header_rows": 1, "header_example": HEADER,
           "date_format": "%d/%m/%Y", "mpan_mprn_field": "MPAN", "reading_date_field": "Date", "reading_fields": TIMES,
           "msn_field": None, "row_per_reading": False, "process_type": "s3_folder", "enabled": True, "convert_to_kwh": "no",
           "created_at": "2019-03-01T10:11:12.000Z", "updated_at": "2025-09-30T08:00:00.000Z"}]
FORMAT = formats.parse({key: value for key, value in EXPORT[0].items() if key in formats.ATTRIBUTES})


def good(day: int = 1) -> bytes:
    return f"{HEADER}\r\n2200013680374,Ecclesall,{day:02d}/11/2026,{VALUES}\r\n2200013680375,Totley,{day:02d}/11/2026,{VALUES}\r\n".encode()


def moved(day: int = 1) -> bytes:
    return f"{MOVED}\r\n2200013680374,Ecclesall,North,{day:02d}/11/2026,{VALUES}\r\n".encode()


def inserted() -> bytes:
    """EDF's file with a column inserted after the date: every row imports, each reading read a half hour off."""
    header = "MPAN,Site,Date,Region," + ",".join(TIMES)
    return (f"{header}\r\n2200013680374,Ecclesall,04/11/2026,North,{VALUES}\r\n2200013680375,Totley,04/11/2026,South,{VALUES}\r\n"
            f"2200013680375,Totley,05/11/2026,South,{VALUES}\r\n").encode()


def warned() -> bytes:
    """EDF's file with a blank half hour in one row and Excel's MPAN in another: 3 of its 5 rows import."""
    return (f"{HEADER}\r\n2200013680374,Ecclesall,01/11/2026,{VALUES}\r\n2200013680375,Totley,02/11/2026,{VALUES}\r\n"
            f"2200013680376,Dore,02/11/2026,{VALUES.rsplit(',', 1)[0]},\r\n1.23405E+12,Beighton,03/11/2026,{VALUES}\r\n"
            f"2200013680374,Ecclesall,03/11/2026,{VALUES}\r\n").encode()


def message(to: str, data: bytes, name: str = "export.csv") -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "meters@supplier.example", to, "readings"
    msg.set_content("attached")
    msg.add_attachment(data, maintype="text", subtype="csv", filename=name)
    return msg.as_bytes().replace(b"\n", b"\r\n")


def csvs(config: Config, prefix: str = "") -> dict[str, bytes]:
    root = config.storage.path / config.buckets.amr_data
    found = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.csv")} if root.exists() else {}
    return {key: data for key, data in found.items() if key.startswith(prefix)}


def checks_in_history(spool) -> list[tuple[str, str, dict]]:
    """(prefix, key, report) of every CSV the history holds, oldest first."""
    with sqlite3.connect(spool / "history.sqlite") as conn:
        rows = conn.execute("SELECT f.prefix, f.key, f.check_report FROM files f JOIN messages m ON m.id = f.id "
                            "WHERE f.role = 'amr_data' ORDER BY m.received, f.rowid").fetchall()
    return [(prefix, key, json.loads(text)) for prefix, key, text in rows]


def test_the_daemon_checks_every_csv_and_reports_a_turn_to_header_changed_once(tmp_path):
    """`esmail serve` with the importer's export: each CSV's report is in the history beside its object, counted on
    /metrics, logged when not ok; Rollbar hears of edf's header change once per turn (ok → changed → changed → ok →
    changed: two reports); a prefix without a format learns its shape and says `new shape` when it changes."""
    recorder = Recorder()
    export = tmp_path / "feed-formats.json"
    export.write_text(json.dumps(EXPORT))
    http = Address("127.0.0.1", free_port())
    config = Config(storage=StorageConfig(path=tmp_path / "data"), spool=SpoolConfig(path=tmp_path / "spool"),
                    buckets=Buckets("checks-inbox", "checks-amr-data", "checks-unprocessable"))
    server = Server(config, tmp_path, tables=f'[rollbar]\nendpoint = "{recorder.url}/api/1/"\n[http]\nlisten = "{http}"\n'
                                             f'[formats]\npath = "{export}"\n')
    server.start(ROLLBAR_ACCESS_TOKEN="7e57700007e57700007e57700007e577")
    sent = [("edf", good(1)), ("edf", moved(2)), ("edf", moved(3)), ("edf", good(4)), ("edf", moved(5)),
            ("sheffield", b"MPAN,Date,kWh\r\n1,2026-11-01,1\r\n"), ("sheffield", b"Meter,Date,kWh\r\n1,2026-11-02,1\r\n")]
    try:
        for n, (prefix, data) in enumerate(sent, 1):
            with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
                client.sendmail("meters@supplier.example", [f"{prefix}@datafeeds.example.org"], message(f"{prefix}@x", data))
            deadline = time.monotonic() + 60
            while len(csvs(config)) < n:  # one at a time: the turns are in the order sent
                assert time.monotonic() < deadline, server.log.read_text()
                time.sleep(0.05)
        deadline = time.monotonic() + 30
        while 'verdict="new shape"' not in (scraped := urllib.request.urlopen(f"http://{http}/metrics", timeout=10).read().decode()):
            assert time.monotonic() < deadline, scraped  # the last message is stored; its check is counted a moment later
            time.sleep(0.05)
        while len(recorder.items) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # a third report would have come by now
    finally:
        assert server.terminate() == 0
    assert 'esmail_file_checks_total{prefix="edf",verdict="ok"} 2.0' in scraped
    assert 'esmail_file_checks_total{prefix="edf",verdict="header changed"} 3.0' in scraped
    assert 'esmail_file_checks_total{prefix="sheffield",verdict="ok"} 1.0' in scraped
    assert 'esmail_file_checks_total{prefix="sheffield",verdict="new shape"} 1.0' in scraped
    assert len(recorder.items) == 2
    for item, day in zip(recorder.items, (2, 5)):
        body = item["json"]["data"]["body"]["message"]
        assert body["body"] == "a feed's CSV changed its header: the importer would not read it as configured"
        assert (body["prefix"], body["verdict"]) == ("edf", "header changed") and body["key"].endswith("/export.csv")
        assert body["reason"].startswith("Date moved from column 3 to 4; 00:00 moved from column 4 to 5; 00:30 moved from column 5 to 6; "
                                         "46 more read columns moved; 0 of 1 rows import")
    history = checks_in_history(tmp_path / "spool")
    assert [(prefix, report["verdict"]) for prefix, _, report in history] == [
        ("edf", "ok"), ("edf", "header changed"), ("edf", "header changed"), ("edf", "ok"), ("edf", "header changed"),
        ("sheffield", "ok"), ("sheffield", "new shape")]
    assert sorted(key for _, key, _ in history) == sorted(csvs(config))
    first = history[0][2]
    assert (first["name"], first["rows"], first["valid_rows"], first["days"], first["meters"]) == ("export.csv", 2, 2, 2, 2)
    assert (first["first_date"], first["last_date"], first["warnings"], first["header"]["row"]) == ("2026-11-01", "2026-11-01", {}, 1)
    assert history[1][2]["header"]["moved"][0] == {"name": "Date", "expected": 3, "found": 4}
    assert history[6][2]["header"] == {"row": 1, "expected": ["MPAN", "Date", "kWh"], "found": ["Meter", "Date", "kWh"],
                                       "moved": [], "missing": ["MPAN"]}
    log = server.log.read_text()
    assert log.count("/export.csv: header changed: Date moved from column 3 to 4") == 3
    assert log.count(": new shape: header 'Meter,Date,kWh', usually 'MPAN,Date,kWh'") == 1
    assert ": ok:" not in log


@pytest.fixture
def dns():
    server = DnsServer().start()
    yield server
    server.stop()


def declared_in_toml(config: Config, dns: DnsServer, tmp_path) -> Config:
    """`config` with the page on and three `[[feed]]`s, loaded from TOML as `esmail serve` loads it: edf and npower each
    with a `[feed.format]` (the importer's configuration of EDF's files), leeds expecting mail every second (late soon)."""
    fmt = (f'[feed.format]\nnumber_of_header_rows = 1\nheader_example = "{HEADER}"\ndate_format = "%d/%m/%Y"\n'
           f'mpan_mprn_field = "MPAN"\nreading_date_field = "Date"\nreading_fields = {json.dumps(TIMES)}\n')
    toml = tmp_path / "feeds.toml"
    toml.write_text(config_toml(config) + 'min_free = 0\n[worker]\nprocesses = 1\n[smtp]\ndomains = ["datafeeds.example.org"]\n'
                    f'[http]\nlisten = "127.0.0.1:{free_port()}"\n[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
                    f'[[feed]]\nprefix = "edf"\nname = "EDF Energy, half-hourly electricity"\n{fmt}'
                    f'[[feed]]\nprefix = "leeds"\nexpected_every = "1s"\n[[feed]]\nprefix = "npower"\n{fmt}')
    return load(toml, environ={})


async def send_checked(server: RunningDaemon) -> tuple[str, str]:
    """npower gets a file with warnings; edf one with warnings, then one whose header changed (its last). Their ids."""
    send(server, message("npower@x", warned()), "npower@datafeeds.example.org")
    with_warnings = send(server, message("edf@x", warned()), "edf@datafeeds.example.org")
    header_changed = send(server, message("edf@x", inserted()), "edf@datafeeds.example.org")
    assert await finished(server)
    return with_warnings, header_changed


def text(page: str) -> str:
    """A page's text as a reader sees it, in one line."""
    return html.unescape(" ".join(re.sub(r"<[^>]+>", " ", page).split()))


@local
async def test_the_page_and_the_api_say_what_the_importer_will_make_of_each_csv(config, dns, tmp_path):
    """Over SMTP to feeds declared in TOML with a [feed.format]: the message page and /api/messages/{id} give each CSV's
    verdict, counts, meters, dates, warnings with their first rows, and the columns that moved; /api/feeds and `/` give each
    feed's last verdict as its status (header changed before late, warnings after it) and its last file's readings."""
    with RunningDaemon(declared_in_toml(config, dns, tmp_path)) as server:
        with_warnings, header_changed = await send_checked(server)
        browser = Browser(server)
        assert await eventually(lambda: [(f["prefix"], f["status"]) for f in browser.json("/api/feeds")["feeds"]] == [
            ("edf", "header changed"), ("leeds", "late"), ("npower", "warnings")], timeout=10)
        api = browser.json("/api/feeds")
        feeds_page = browser.get("/")
        changed_page, changed_api = browser.get(f"/messages/{header_changed}"), browser.json(f"/api/messages/{header_changed}")
        warned_page, warned_api = browser.get(f"/messages/{with_warnings}"), browser.json(f"/api/messages/{with_warnings}")
        counts = every_count_opens_its_rows(browser)

    [raw, csv] = changed_api["files"]
    assert (raw["role"], raw["check"], csv["role"], csv["name"]) == ("inbox", None, "amr_data", "export.csv")
    report = csv["check"]
    assert {k: report[k] for k in ("verdict", "reason", "rows", "filtered", "valid_rows", "days", "meters", "first_date", "last_date",
                                   "warnings", "notes", "examples")} == {
        "verdict": "header changed", "reason": "", "rows": 3, "filtered": 0, "valid_rows": 3, "days": 3, "meters": 2,
        "first_date": "2026-11-04", "last_date": "2026-11-05", "warnings": {}, "notes": {"columns_added": 1}, "examples": []}
    assert report["header"]["row"] == 1 and report["header"]["found"][3] == "Region" and report["header"]["missing"] == []
    assert report["header"]["moved"][:2] == [{"name": "00:00", "expected": 4, "found": 5}, {"name": "00:30", "expected": 5, "found": 6}]
    assert len(report["header"]["moved"]) == 48
    seen = text(changed_page)
    assert "What the importer will make of its CSV: header changed" in seen
    assert ("header changed export.csv The importer reads each column at its place in header_example . These moved, so it would "
            "import 3 rows from the wrong columns, without an error: 00:00 moved from column 4 to 5 00:30 moved from column 5 to 6") in seen
    assert "23:30 moved from column 51 to 52" in seen and "42 more columns moved" in seen
    assert "Rows 3 Rows that import 3 Meter-days 3 Meters 2 Dates 2026-11-04 to 2026-11-05" in seen
    assert "Note: columns_added 1 (more columns than header_example has)" in seen and "with warnings" not in seen

    [_, csv] = warned_api["files"]
    report = csv["check"]
    assert {k: report[k] for k in ("verdict", "rows", "valid_rows", "days", "meters", "first_date", "last_date", "warnings")} == {
        "verdict": "warnings", "rows": 5, "valid_rows": 3, "days": 3, "meters": 2, "first_date": "2026-11-01", "last_date": "2026-11-03",
        "warnings": {"missing_readings": 1, "invalid_non_numeric_mpan_mprn": 1}}
    assert [(e["line"], e["warnings"], e["text"][:32]) for e in report["examples"]] == [
        (4, ["missing_readings"], "2200013680376,Dore,02/11/2026,0."), (5, ["invalid_non_numeric_mpan_mprn"], "1.23405E+12,Beighton,03/11/2026,")]
    seen = text(warned_page)
    assert "What the importer will make of its CSV: warnings" in seen
    assert "Rows 5 Rows that import 3 Meter-days 3 Meters 2 Dates 2026-11-01 to 2026-11-03" in seen and "moved" not in seen
    assert Table(warned_page, "warnings").body() == [
        ["missing_readings rows with too few half hours (blank or -): they do not import", "1"],
        ["invalid_non_numeric_mpan_mprn MPANs that are not all digits (Excel's 1.23405E+12)", "1"]]
    assert "The first 2 rows with warnings: line 4 missing_readings 2200013680376,Dore,02/11/2026,0.1,0.2," in seen
    assert "line 5 invalid_non_numeric_mpan_mprn 1.23405E+12,Beighton,03/11/2026,0.1,0.2," in seen

    edf = api["feeds"][0]
    assert edf["last_check"] == {
        "id": header_changed, "received": changed_api["received"], "href": f"/messages/{header_changed}", "verdict": "header changed",
        "files": [{"name": "export.csv", "key": csv_key(changed_api), "href": csv_href(changed_api), "verdict": "header changed", "reason": "",
                   "rows": 3, "filtered": 0, "valid_rows": 3, "days": 3, "meters": 2, "first_date": "2026-11-04", "last_date": "2026-11-05",
                   "warnings": {}}]}
    npower = api["feeds"][2]["last_check"]["files"][0]
    assert (npower["verdict"], npower["rows"], npower["valid_rows"], npower["meters"], npower["first_date"], npower["last_date"]) == (
        "warnings", 5, 3, 2, "2026-11-01", "2026-11-03")
    assert api["feeds"][1]["last_check"] is None
    rows = Table(feeds_page, "feeds").body()
    assert [row[:3] + [row[4].split(" UTC ")[-1]] for row in rows] == [
        ["edf EDF Energy, half-hourly electricity", "header changed", "last CSV: header changed",
         "export.csv 3 of 3 rows import · 2 meters · 2026-11-04 to 2026-11-05"],
        ["leeds", rows[1][1], "nothing", "never"],
        ["npower", "warnings", "last CSV: warnings", "export.csv 3 of 5 rows import · 2 meters · 2026-11-01 to 2026-11-03"]]
    assert rows[1][1].startswith("late mail was expected by ")
    assert "Needs a human: 0 failed , 0 quarantined , edf's last CSV: header changed ." in text(feeds_page)
    assert f'href="/messages/{header_changed}#checks">edf\'s last CSV: header changed</a>' in feeds_page
    assert counts["/messages?prefix=edf&days=7"] == 2


def csv_key(message: dict) -> str:
    return next(f["key"] for f in message["files"] if f["role"] == "amr_data")


def csv_href(message: dict) -> str:
    return next(f["href"] for f in message["files"] if f["role"] == "amr_data")


def esmail(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "esmail", *args], capture_output=True, text=True, timeout=120, **kwargs)


@local
async def test_a_feed_that_holds_keeps_a_changed_header_in_quarantine_until_released(config, dns, tmp_path):
    """on_header_change = "hold": a message with a `header changed` CSV stores nothing in amr-data and waits in
    quarantine with the reason; released (the command, then the page's button) it is stored as it is. A good CSV
    of the same feed is stored at once."""
    feed = FeedConfig("edf", on_header_change="hold", format=FORMAT)
    config = replace(config, feeds=(feed,), dns=dns.config, feed_formats={"edf": FORMAT}, http=HttpConfig(listen=Address("127.0.0.1", 0)))
    toml = tmp_path / "c.toml"
    toml.write_text(config_toml(config))
    quarantined = metrics.REGISTRY.get_sample_value("esmail_quarantined_total", {"prefix": "edf", "reason": "header_changed"}) or 0
    with RunningDaemon(config) as server:
        client = server.smtp()
        client.sendmail("meters@supplier.example", ["edf@datafeeds.example.org"], message("edf@x", good(1)))
        assert await eventually(lambda: len(csvs(config)) == 1)
        first_held = _send(server, message("edf@x", moved(2)))
        second_held = _send(server, message("edf@x", moved(3), name="other.csv"))
        assert await eventually(lambda: sorted(server.spool.quarantined_ids()) == sorted([first_held, second_held]))
        client.quit()
        reason = server.spool.held(first_held)["edf"]
        assert reason.startswith("header changed: export.csv: Date moved from column 3 to 4; 00:00 moved from column 4 to 5")
        assert len(csvs(config)) == 1 and len(list((config.storage.path / config.buckets.inbox).rglob("*.eml"))) == 3
        assert metrics.REGISTRY.get_sample_value("esmail_quarantined_total", {"prefix": "edf", "reason": "header_changed"}) == quarantined + 2
        listed = esmail("--config", str(toml), "spool", "list")
        assert "quarantined" in listed.stdout and "header changed: export.csv: Date moved from column 3 to 4" in listed.stdout
        released = esmail("--config", str(toml), "spool", "release", first_held)
        assert released.returncode == 0 and f"released {first_held} for edf (was: header changed: export.csv" in released.stdout
        server.loop.call_soon_threadsafe(server.daemon.scheduler.submit, first_held)  # what the minute's rescan would do
        assert await eventually(lambda: len(csvs(config)) == 2)
        browser = Browser(server)
        page = browser.get(f"/messages/{second_held}")
        assert "header changed: other.csv" in page
        status, _, _ = browser.request(f"/messages/{second_held}/release", {"csrftoken": csrf_of(page)})
        assert status == 303
        assert await eventually(lambda: len(csvs(config)) == 3 and not server.spool.pending())
    stored = csvs(config, "edf/")
    assert sorted(data for key, data in stored.items()) == sorted([good(1).replace(b"\r\n", b"\n"), moved(2).replace(b"\r\n", b"\n"),
                                                                   moved(3).replace(b"\r\n", b"\n")])
    assert server.spool.quarantined_ids() == []
    history = sorted((key.rsplit("/", 1)[1], report["verdict"]) for _, key, report in checks_in_history(config.spool.path))
    assert history == [("export.csv", "header changed"), ("export.csv", "ok"), ("other.csv", "header changed")]


def _send(server: RunningDaemon, raw: bytes) -> str:
    with server.smtp() as client:
        client.ehlo("supplier.example")
        client.mail("meters@supplier.example")
        assert client.rcpt("edf@datafeeds.example.org")[0] == 250
        code, text = client.data(raw)
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


def test_learned_shapes_note_a_new_header_and_are_seeded_from_the_history(tmp_path):
    """The first CSV of a prefix sets its shape; another header is `new shape`, shown beside the usual one; a
    `sep=,` line counts with the row after it; after a restart the shapes come back from the history."""
    shapes = Shapes(keep_seconds=86400)
    first = shapes.check("sheffield", "a.csv", b"MPAN,Date,kWh\n1,2026-11-01,1\n")
    assert (first.verdict, first.rows, first.header.found) == ("ok", 1, ["MPAN", "Date", "kWh"])
    shapes.remember("sheffield", first.header.found)
    assert shapes.check("sheffield", "b.csv", b"MPAN,Date,kWh\n2,2026-11-02,1\n").verdict == "ok"
    changed = shapes.check("sheffield", "c.csv", b"sep=,\nDate,MPAN,kWh\n2026-11-02,2,1\n")
    assert changed.verdict == "new shape" and changed.header.found == ["sep=", "", "Date", "MPAN", "kWh"]
    assert changed.header.expected == ["MPAN", "Date", "kWh"]
    assert shapes.check("leeds", "d.csv", b"X,Y\n").verdict == "ok"  # another prefix: its first file


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_the_history_keeps_each_report_and_an_old_history_gains_the_column(config, tmp_path):
    """A history written before the checks (schema 1) opens with the new column, its rows kept; then a report written
    beside its file row seeds learned shapes and the feeds already reported at the next start."""
    from esmail.history import FileRow, Finished

    path = config.spool.path / "history.sqlite"
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as conn:
        conn.executescript("CREATE TABLE schema (version INTEGER NOT NULL); INSERT INTO schema VALUES (1);"
                           "CREATE TABLE messages (id TEXT PRIMARY KEY, received TEXT NOT NULL, origin TEXT NOT NULL, client TEXT, "
                           "helo TEXT, mail_from TEXT, header_from TEXT, subject TEXT, date TEXT, size INTEGER, authentication TEXT, "
                           "state TEXT NOT NULL, reason TEXT, attempts INTEGER, seconds REAL, finished TEXT NOT NULL);"
                           "CREATE TABLE message_prefixes (id TEXT NOT NULL, prefix TEXT NOT NULL, received TEXT NOT NULL, "
                           "state TEXT NOT NULL, csvs INTEGER NOT NULL, unprocessable INTEGER NOT NULL, PRIMARY KEY (id, prefix));"
                           "CREATE TABLE outcomes (id TEXT NOT NULL, at TEXT NOT NULL, outcome TEXT NOT NULL, reason TEXT, "
                           "attempts INTEGER, seconds REAL);"
                           "CREATE TABLE files (id TEXT NOT NULL, prefix TEXT NOT NULL, role TEXT NOT NULL, name TEXT NOT NULL, kind TEXT, "
                           "rule TEXT, bucket TEXT NOT NULL, key TEXT NOT NULL, bytes INTEGER, reason TEXT);"
                           "CREATE TABLE prefixes (prefix TEXT PRIMARY KEY, first_declared TEXT, last_message TEXT, last_csv TEXT, "
                           "last_unprocessable INTEGER NOT NULL DEFAULT 0);"
                           "INSERT INTO files VALUES ('old', 'sheffield', 'amr_data', 'a.csv', 'text', '', 'b', 'sheffield/1/a.csv', 5, '');")
    history = SqliteHistory(config.spool.path, "mx1")
    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    learned = Shapes(86400).check("sheffield", "b.csv", b"Meter,Date,kWh\n1,2026-11-01,1\n")
    rejected = Report("export.csv", "rejected", reason="No valid readings in file")
    await history.record(Finished("new", now, "smtp", "stored", {"sheffield": "stored", "edf": "stored"}, files=[
        FileRow("sheffield", "amr_data", "b.csv", "text", "", "b", "sheffield/2/b.csv", 30, check=learned.to_json()),
        FileRow("edf", "amr_data", "export.csv", "text", "", "b", "edf/2/export.csv", 30, check=rejected.to_json())]))
    shapes, alerted = Shapes(86400), set()
    seed(history, shapes, alerted)
    history.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema").fetchone() == (sqlite_history.VERSION,)
        rows = conn.execute("SELECT id, key, check_report FROM files ORDER BY rowid").fetchall()
    assert rows[0] == ("old", "sheffield/1/a.csv", None)
    assert [(i, k, json.loads(c)["verdict"]) for i, k, c in rows[1:]] == [("new", "sheffield/2/b.csv", "ok"), ("new", "edf/2/export.csv", "rejected")]
    assert alerted == {"edf"}
    assert shapes.check("sheffield", "c.csv", b"Meter,Date,kWh\n2,2026-11-02,1\n").verdict == "ok"
    assert shapes.check("sheffield", "d.csv", b"MPAN,Date,kWh\n2,2026-11-02,1\n").verdict == "new shape"


# --- esmail check -----------------------------------------------------------------------------------------------------

@pytest.fixture
def feed_toml(tmp_path):
    export = tmp_path / "feed-formats.json"
    export.write_text(json.dumps(EXPORT))
    toml = tmp_path / "esmail.toml"
    toml.write_text(f'[formats]\npath = "{export}"\n[spool]\npath = "{tmp_path / "spool"}"\n')
    return toml


def test_check_a_csv_prints_what_the_importer_makes_of_it(feed_toml, tmp_path):
    """A supplier's sample CSV with one blank half hour: exit 0 (the file imports), the counts, the warning and its row."""
    sample = tmp_path / "sample.csv"
    sample.write_bytes(good(1) + f"2200013680376,Dore,01/11/2026,{VALUES.rsplit(',', 1)[0]},\r\n".encode())
    result = esmail("--config", str(feed_toml), "check", "--feed", "edf", str(sample))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == [
        "sample.csv: warnings",
        "  2 of 3 rows import (2 meter-days, 2 meters, 2026-11-01 to 2026-11-01); warnings: missing_readings 1",
        "  line 4 (missing_readings): 2200013680376,Dore,01/11/2026,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1,1.1,1.2,1.3,1.4,1.5,1.6,1.7,1.8,…"]


def test_check_an_xlsx_and_a_zip_with_their_exit_codes(feed_toml, tmp_path):
    """An xlsx with date cells imports (a note; exit 0); a zip holding a good CSV and one whose header changed exits 1,
    and --json prints both reports; a raw .eml is taken apart as the daemon would; a feed without a format or a
    missing file is a usage error (exit 2)."""
    cells = {"A1": "MPAN", "B1": "Site", "C1": "Date", "A2": 2200013680374, "B2": "Ecclesall", "C2": date(2026, 11, 1)}
    for i, name in enumerate(TIMES):
        column = get_column_letter(4 + i)
        cells[f"{column}1"], cells[f"{column}2"] = name, (i + 1) / 10
    book = tmp_path / "readings.xlsx"
    book.write_bytes(xlsx(cells, formats={"C2": "dd/mm/yyyy"}))
    result = esmail("--config", str(feed_toml), "check", "--feed", "edf", str(book))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == ["readings.xlsx.csv: ok", "  1 of 1 rows import (1 meter-days, 1 meters, 2026-11-01 to 2026-11-01)",
                                              "  notes: date_format_differs 1"]
    archive = tmp_path / "november.zip"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("week1/good.csv", good(1))
        zipped.writestr("week2/changed.csv", moved(8))
    archive.write_bytes(buffer.getvalue())
    result = esmail("--config", str(feed_toml), "check", "--feed", "EDF", "--json", str(archive))
    assert result.returncode == 1, result.stderr
    reports = json.loads(result.stdout)["files"]
    assert [(r["name"], r["verdict"], r["valid_rows"]) for r in reports] == [("week1/good.csv", "ok", 2), ("week2/changed.csv", "header changed", 0)]
    assert reports[1]["header"]["moved"][0] == {"name": "Date", "expected": 3, "found": 4}
    mail = tmp_path / "forwarded.eml"
    mail.write_bytes(message("edf@datafeeds.example.org", good(2)))
    result = esmail("--config", str(feed_toml), "check", "--feed", "edf", "--json", str(mail))
    assert result.returncode == 0 and [(r["name"], r["verdict"], r["first_date"]) for r in json.loads(result.stdout)["files"]] == [
        ("export.csv", "ok", "2026-11-02")]
    unknown = esmail("--config", str(feed_toml), "check", "--feed", "sheffield", str(archive))
    assert unknown.returncode == 2 and "--feed 'sheffield' has no format" in unknown.stderr
    missing = esmail("--config", str(feed_toml), "check", "--feed", "edf", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and "nope.csv: No such file or directory" in missing.stderr
    assert esmail("--config", str(feed_toml), "check", str(archive)).returncode == 2  # --feed is required



def test_the_guides_new_supplier_example_says_what_the_guide_shows(tmp_path):
    """docs/feeds.md's walk-through: examples/brightside.toml on examples/new-supplier.csv gives the warnings shown
    there; with the two fixes it describes, only the supplier's own faults are left."""
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    first = esmail("--config", str(examples / "brightside.toml"), "check", "--feed", "brightside", "--json", str(examples / "new-supplier.csv"))
    [report] = json.loads(first.stdout)["files"]
    assert first.returncode == 0 and (report["verdict"], report["rows"], report["valid_rows"], report["header"]["row"]) == ("warnings", 7, 3, 2)
    assert report["warnings"] == {"missing_readings": 1, "invalid_non_numeric_mpan_mprn": 3, "missing_reading_date": 1,
                                  "invalid_reading_date": 1, "header_row_moved": 1}
    fixed = tmp_path / "brightside.toml"
    fixed.write_text((examples / "brightside.toml").read_text().replace("number_of_header_rows = 1", "number_of_header_rows = 2")
                     + 'column_row_filters = { MPAN = "^Total$" }\n')
    second = esmail("--config", str(fixed), "check", "--feed", "brightside", str(examples / "new-supplier.csv"))
    assert second.returncode == 0 and second.stdout.splitlines()[:2] == [
        "new-supplier.csv: warnings",
        "  3 of 5 rows import (3 meter-days, 2 meters, 2026-11-01 to 2026-11-02), 1 more filtered out; "
        "warnings: missing_readings 1, invalid_non_numeric_mpan_mprn 1"]
