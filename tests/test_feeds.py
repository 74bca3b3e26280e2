"""Feeds and who may write to them (DESIGN §12): SPF, DKIM and DMARC against a real DNS server, quarantine and release.

Mail goes over real sockets to a running daemon; every answer the checks
need comes from the DNS server the suite starts on loopback.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
import sys
from dataclasses import replace
from email.message import EmailMessage

import dkim
import pytest

from conftest import RunningDaemon, config_toml, eventually
from dnsserver import DnsServer, dkim_key
from esmail.config import Address, FeedConfig, HttpConfig
from esmail.spool import Spool, read_entry
from test_imap import append, with_mailbox

local = pytest.mark.parametrize("config", ["local"], indirect=True)

DOMAIN = "datafeeds.example.org"
HOST = "mx.test"
CSV = b"MPAN,00:30\r\n2200013680374,1.5\r\n"
STORED_CSV = b"MPAN,00:30\n2200013680374,1.5\n"
SHEFFIELD = FeedConfig("sheffield", "Sheffield City Council", senders=("*@sheffield.gov.uk",), authenticated=True)


@pytest.fixture(scope="module")
def dns():
    """Test zones: sheffield.gov.uk (SPF for loopback, DKIM, p=reject), npower.example (DKIM, p=none, SPF elsewhere),
    strict.example (adkim=s), leeds.gov.uk (SPF elsewhere: mail forwarded to us fails it), attacker.example (SPF for loopback)."""
    server = DnsServer()
    server.txt("sheffield.gov.uk", "v=spf1 ip4:127.0.0.1 -all")
    server.txt("_dmarc.sheffield.gov.uk", "v=DMARC1; p=reject")
    server.txt("npower.example", "v=spf1 ip4:192.0.2.1 -all")
    server.txt("_dmarc.npower.example", "v=DMARC1; p=none")
    server.txt("_dmarc.strict.example", "v=DMARC1; p=reject; adkim=s; aspf=s")
    server.txt("leeds.gov.uk", "v=spf1 ip4:192.0.2.1 -all")
    server.txt("attacker.example", "v=spf1 ip4:127.0.0.1 -all")
    server.keys = {domain: dkim_key(server, domain) for domain in
                   ("sheffield.gov.uk", "mail.sheffield.gov.uk", "npower.example", "mail.strict.example")}
    server.start()
    yield server
    server.stop()


def feeds(config, dns, *declared: FeedConfig, **smtp):
    return replace(config, feeds=declared or (SHEFFIELD,), dns=dns.config,
                   smtp=replace(config.smtp, domains=(DOMAIN,), hostname=HOST, **smtp))


def message(sender: str = "reports@sheffield.gov.uk", to: str = f"sheffield@{DOMAIN}", subject: str = "readings",
            headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    msg = EmailMessage()
    for name, value in headers:
        msg[name] = value
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg.set_content("attached")
    msg.add_attachment(CSV, maintype="text", subtype="csv", filename="export.csv")
    return msg.as_bytes().replace(b"\n", b"\r\n")


def signed(raw: bytes, dns: DnsServer, domain: str) -> bytes:
    return dkim.sign(raw, b"sel", domain.encode(), dns.keys[domain], include_headers=[b"from", b"to", b"subject"]) + raw


def send(server: RunningDaemon, raw: bytes, mail_from: str, *rcpts: str, helo: str = "mail.example") -> str:
    """Send over SMTP; the queued entry's id."""
    with server.smtp() as client:
        client.ehlo(helo)
        client.mail(mail_from)
        for rcpt in rcpts or (f"sheffield@{DOMAIN}",):
            code, text = client.rcpt(rcpt)
            assert code == 250, text
        code, text = client.data(raw)
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


def objects(config, logical: str, prefix: str = "") -> dict[str, bytes]:
    root = config.storage.path / config.buckets.named(logical)
    found = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.exists() else {}
    return {key: data for key, data in found.items() if key.startswith(prefix)}


async def processed(server: RunningDaemon) -> bool:
    return await eventually(lambda: not server.spool.pending())


def inbox_copy(config, entry_id: str, prefix: str = "sheffield") -> bytes:
    [copy] = [data for key, data in objects(config, "inbox", prefix + "/").items() if key.endswith(f"/{entry_id}.eml")]
    return copy


@local
async def test_an_allowed_and_authenticated_sender_lands_with_its_results_on_the_inbox_copy(config, dns):
    """SPF passes for the From domain: CSV stored; the inbox copy starts with Authentication-Results, the spool kept the original."""
    raw = message()
    with RunningDaemon(feeds(config, dns)) as server:
        entry_id = send(server, raw, "reports@sheffield.gov.uk", helo="mail.sheffield.gov.uk")
        assert await processed(server)
    assert list(objects(config, "amr_data").values()) == [STORED_CSV]
    copy = inbox_copy(config, entry_id)
    head, _, rest = copy.partition(b"\r\n\t")
    assert head == b"Authentication-Results: mx.test;"
    assert copy.endswith(raw) and copy.count(b"Authentication-Results") == 1
    results = copy[: len(copy) - len(raw)].decode()
    assert "spf=pass smtp.mailfrom=reports@sheffield.gov.uk" in results and "dkim=none" in results
    assert "dmarc=pass header.from=sheffield.gov.uk" in results


@local
async def test_a_sender_not_listed_is_quarantined_and_listed_and_released(config, dns, tmp_path):
    """From outside the feed's senders: inbox copy only, a quarantine entry that spool list shows; released, its CSV lands."""
    raw = message(sender="someone@npower.example")
    config = replace(config, http=HttpConfig(listen=Address("127.0.0.1", 0)))
    with RunningDaemon(feeds(config, dns)) as server:
        entry_id = send(server, signed(raw, dns, "npower.example"), "someone@npower.example")
        assert await processed(server)
        assert server.spool.quarantined_ids() == [entry_id]
        assert objects(config, "amr_data") == {} and objects(config, "unprocessable") == {}
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{server.daemon.monitor.port}/metrics", timeout=10).read().decode()
        assert 'esmail_quarantined_total{prefix="sheffield",reason="sender"}' in scraped and "esmail_spool_quarantined 1.0" in scraped
        assert inbox_copy(config, entry_id).endswith(raw)
        toml = tmp_path / "c.toml"
        toml.write_text(config_toml(config))
        listed = esmail(toml, "spool", "list")
        [row] = [line for line in listed.stdout.splitlines() if line.startswith(entry_id)]
        assert "quarantined" in row and "sheffield" in row and "From someone@npower.example is not among the senders" in row
        released = esmail(toml, "spool", "release", entry_id)
        assert released.returncode == 0 and f"released {entry_id} for sheffield" in released.stdout
        server.loop.call_soon_threadsafe(server.daemon.scheduler.submit, entry_id)  # what the minute's rescan would do
        assert await eventually(lambda: objects(config, "amr_data"))
        assert await processed(server)
        api = f"http://127.0.0.1:{server.daemon.monitor.port}/api/messages/{entry_id}"
        outcomes = json.loads(urllib.request.urlopen(api, timeout=10).read())["outcomes"]
    assert [(o["outcome"], o["reason"]) for o in outcomes] == [
        ("quarantined", "sheffield: From someone@npower.example is not among the senders of the feed sheffield"),
        ("released", "sheffield: released by an operator, overriding: From someone@npower.example is not among the senders "
                     "of the feed sheffield")]
    assert list(objects(config, "amr_data").values()) == [STORED_CSV]
    assert server.spool.quarantined_ids() == [] and len(objects(config, "inbox")) == 1  # the same copy, not a second one
    assert esmail(toml, "spool", "release", entry_id).returncode == 1


@local
async def test_a_spoofed_from_with_an_unaligned_spf_pass_is_quarantined(config, dns):
    """SPF passes for attacker.example, whose MAIL FROM it is; the From says sheffield.gov.uk: not aligned, quarantined."""
    with RunningDaemon(feeds(config, dns)) as server:
        entry_id = send(server, message(), "bounce@attacker.example")
        assert await processed(server)
        assert server.spool.held(entry_id) == {"sheffield": "From reports@sheffield.gov.uk is not authenticated "
                                                            "(no passing SPF or DKIM aligned with its domain)"}
    assert objects(config, "amr_data") == {}
    results = inbox_copy(config, entry_id).decode()
    assert "spf=pass smtp.mailfrom=bounce@attacker.example" in results and "dmarc=fail header.from=sheffield.gov.uk" in results


@local
async def test_a_tampered_dkim_body_is_quarantined(config, dns):
    """Signed by sheffield.gov.uk, then the attachment changed: dkim=fail, quarantined."""
    tampered = signed(message(), dns, "sheffield.gov.uk").replace(b"attached", b"Attached")
    with RunningDaemon(feeds(config, dns)) as server:
        entry_id = send(server, tampered, "bounce@attacker.example")
        assert await processed(server)
        assert list(server.spool.held(entry_id)) == ["sheffield"]
    assert objects(config, "amr_data") == {}
    assert "dkim=fail header.d=sheffield.gov.uk" in inbox_copy(config, entry_id).decode()


@local
async def test_aligned_dkim_authenticates_a_p_none_domain_whose_spf_fails(config, dns):
    """npower.example publishes p=none and its SPF does not cover us; its aligned DKIM signature still authenticates it."""
    npower = FeedConfig("npower", senders=("*@npower.example",), authenticated=True)
    raw = signed(message(sender="exports@npower.example", to=f"npower@{DOMAIN}"), dns, "npower.example")
    with RunningDaemon(feeds(config, dns, npower)) as server:
        entry_id = send(server, raw, "exports@npower.example", f"npower@{DOMAIN}")
        assert await processed(server)
    assert list(objects(config, "amr_data", "npower/").values()) == [STORED_CSV]
    results = inbox_copy(config, entry_id, "npower").decode()
    assert "spf=fail" in results and "dkim=pass header.d=npower.example" in results and "dmarc=pass" in results


@local
async def test_a_subdomain_signature_aligns_relaxed_but_not_strict(config, dns):
    """d=mail.sheffield.gov.uk aligns with From sheffield.gov.uk (same organisational domain, per the public suffix
    list: gov.uk is a suffix); d=mail.strict.example does not align with strict.example, whose record says adkim=s."""
    strict = FeedConfig("strict", senders=("*@strict.example",), authenticated=True)
    relaxed_raw = signed(message(), dns, "mail.sheffield.gov.uk")
    strict_raw = signed(message(sender="x@strict.example", to=f"strict@{DOMAIN}"), dns, "mail.strict.example")
    with RunningDaemon(feeds(config, dns, SHEFFIELD, strict)) as server:
        send(server, relaxed_raw, "bounce@attacker.example")
        strict_id = send(server, strict_raw, "bounce@attacker.example", f"strict@{DOMAIN}")
        assert await processed(server)
        assert server.spool.quarantined_ids() == [strict_id]
    assert list(objects(config, "amr_data").keys())[0].startswith("sheffield/") and len(objects(config, "amr_data")) == 1


@local
async def test_forwarded_mail_lands_for_a_feed_that_relies_on_senders_alone(config, dns):
    """Forwarding breaks SPF (leeds.gov.uk's record does not name the forwarder); authenticated = false trusts the From alone."""
    leeds = FeedConfig("leeds", senders=("*@leeds.gov.uk",), authenticated=False)
    with RunningDaemon(feeds(config, dns, leeds)) as server:
        entry_id = send(server, message(sender="meters@leeds.gov.uk", to=f"leeds@{DOMAIN}"), "meters@leeds.gov.uk", f"leeds@{DOMAIN}")
        assert await processed(server)
    assert list(objects(config, "amr_data").values()) == [STORED_CSV]
    assert "spf=fail" in inbox_copy(config, entry_id, "leeds").decode()


@local
async def test_one_message_to_a_trusting_feed_and_a_wary_one(config, dns):
    """Sent to sheffield (senders *@sheffield.gov.uk) and to leeds (senders *@leeds.gov.uk): sheffield gets its CSV, leeds a quarantine entry."""
    leeds = FeedConfig("leeds", senders=("*@leeds.gov.uk",))
    with RunningDaemon(feeds(config, dns, SHEFFIELD, leeds)) as server:
        entry_id = send(server, message(), "reports@sheffield.gov.uk", f"sheffield@{DOMAIN}", f"leeds@{DOMAIN}")
        assert await processed(server)
        assert list(server.spool.held(entry_id)) == ["leeds"]
    assert [key.split("/")[0] for key in objects(config, "amr_data")] == ["sheffield"]
    assert sorted(key.split("/")[0] for key in objects(config, "inbox")) == ["leeds", "sheffield"]


@local
async def test_a_forged_authentication_results_header_is_not_believed(config, dns):
    """The sender wrote our own authserv-id's dmarc=pass into the message; esmail computes its own and quarantines."""
    forged = message(sender="reports@sheffield.gov.uk", headers=(
        ("Authentication-Results", f"{HOST}; spf=pass smtp.mailfrom=sheffield.gov.uk; dmarc=pass header.from=sheffield.gov.uk"),))
    with RunningDaemon(feeds(config, dns)) as server:
        entry_id = send(server, forged, "bounce@attacker.example")
        assert await processed(server)
        assert list(server.spool.held(entry_id)) == ["sheffield"]
    copy = inbox_copy(config, entry_id).decode()
    assert copy.index("dmarc=fail") < copy.index("dmarc=pass")  # ours on top


@local
async def test_an_unknown_feed_is_refused_at_rcpt_and_counted(config, dns):
    """unknown_feeds = "reject": RCPT for a prefix with no [[feed]] gets 550 5.1.1; a declared one is taken."""
    with RunningDaemon(feeds(config, dns, unknown_feeds="reject")) as server, server.smtp() as client:
        client.ehlo("mail.example")
        client.mail("a@sheffield.gov.uk")
        code, text = client.rcpt(f"spammed-prefix@{DOMAIN}")
        assert (code, text.decode()[:5]) == (550, "5.1.1") and b"no such data feed" in text
        assert client.rcpt(f"sheffield@{DOMAIN}")[0] == 250
    from esmail import metrics
    assert metrics.REGISTRY.get_sample_value("esmail_smtp_replies_total", {"command": "RCPT", "code": "550"}) >= 1
    assert list(server.spool.queue.iterdir()) == []


@local
async def test_dns_down_keeps_the_message_queued_until_it_answers(config, dns):
    """With the resolver gone the results are temperror: the entry waits (no quarantine, no CSV), and lands once DNS is back."""
    outage = DnsServer()
    for (name, rtype), records in dns.zones.records.items():
        outage.zones.records[(name, rtype)] = records
    outage.start()
    outage.stop()
    with RunningDaemon(feeds(config, outage)) as server:
        entry_id = send(server, signed(message(), dns, "sheffield.gov.uk"), "reports@sheffield.gov.uk")
        assert await eventually(lambda: server.spool.read_state(entry_id).attempts >= 1, timeout=20)
        assert server.spool.pending() == [entry_id] and server.spool.quarantined_ids() == []
        assert objects(config, "inbox") == {} and objects(config, "amr_data") == {}
        assert "cannot authenticate the sender reports@sheffield.gov.uk now" in server.spool.read_state(entry_id).last_error
        outage.start()
        assert await eventually(lambda: objects(config, "amr_data"), timeout=40)
        assert await processed(server)
    outage.stop()
    results = inbox_copy(config, entry_id).decode()
    assert "dkim=pass header.d=sheffield.gov.uk" in results and "temperror" not in results


@local
async def test_given_up_during_dns_trouble_then_retried_keeps_one_inbox_copy(config, dns):
    """Out of attempts while DNS is down, then `spool retry` once it answers: the CSV lands, and inbox holds only the copy the
    give-up stored (no `-2` copy differing in its Authentication-Results)."""
    outage = DnsServer()
    outage.zones.records.update(dns.zones.records)
    outage.start()
    outage.stop()
    declared = feeds(config, outage)
    with RunningDaemon(replace(declared, worker=replace(declared.worker, max_attempts=1))) as server:
        entry_id = send(server, signed(message(), dns, "sheffield.gov.uk"), "reports@sheffield.gov.uk")
        assert await eventually(lambda: server.spool.failed_ids() == [entry_id], timeout=30)
        given_up = objects(config, "inbox")
        assert [key.rsplit("/", 1)[1] for key in given_up] == [f"{entry_id}.eml"]
        outage.start()
        server.spool.retry([entry_id])
        server.loop.call_soon_threadsafe(server.daemon.scheduler.submit, entry_id)  # what the minute's rescan would do
        assert await eventually(lambda: objects(config, "amr_data"), timeout=40)
        assert await processed(server)
    outage.stop()
    assert objects(config, "inbox") == given_up


@local
async def test_servfail_for_a_dkim_key_is_temperror_not_fail(config, dns):
    """dkimpy's own DNS function reads SERVFAIL as "no key" (dkim=fail); esmail's says temperror. An open feed takes
    the message with that result; a feed that needs authentication keeps it queued."""
    broken = DnsServer()
    broken.zones.servfail = True
    broken.start()
    anyone = FeedConfig("open")
    try:
        with RunningDaemon(feeds(config, broken, SHEFFIELD, anyone)) as server:
            open_id = send(server, signed(message(to=f"open@{DOMAIN}"), dns, "sheffield.gov.uk"), "reports@sheffield.gov.uk", f"open@{DOMAIN}")
            held_id = send(server, signed(message(), dns, "sheffield.gov.uk"), "reports@sheffield.gov.uk")
            assert await eventually(lambda: server.spool.pending() == [held_id] and server.spool.read_state(held_id).attempts)
            assert server.spool.quarantined_ids() == []
    finally:
        broken.stop()
    assert list(objects(config, "amr_data").keys())[0].startswith("open/")
    results = inbox_copy(config, open_id, "open").decode()
    assert "dkim=temperror header.d=sheffield.gov.uk" in results and "dkim=fail" not in results


@local
async def test_dns_down_holds_up_no_open_feed_and_the_page_says_since_when(config, dns):
    """With the resolver gone ([dns] timeout 10 s), once the daemon has found it silent: /, every page and /healthz say
    `DNS: no answer from 127.0.0.1:PORT since HH:MM UTC`; six messages to a feed without senders are stored well within
    one timeout (their Authentication-Results say temperror), although one to a feed that needs an authenticated sender
    came first and waits in the queue, retried; when DNS answers again the banner goes and that one lands."""
    from test_web import Browser

    outage = DnsServer()
    for (name, rtype), records in dns.zones.records.items():
        outage.zones.records[(name, rtype)] = records
    outage.start()
    outage.stop()
    anyone = FeedConfig("open")
    config = replace(feeds(config, outage, SHEFFIELD, anyone), dns=replace(outage.config, timeout=10.0),
                     http=HttpConfig(listen=Address("127.0.0.1", 0)))
    with RunningDaemon(config) as server:
        browser = Browser(server)
        banner = rf"DNS: no answer from 127\.0\.0\.1:{outage.port} since \d\d:\d\d UTC"
        assert await eventually(lambda: re.search(banner, browser.get("/")), timeout=30)
        assert re.search(banner, browser.get("/messages")) and re.fullmatch(banner, browser.json("/healthz")["notes"][0])
        assert browser.json("/healthz")["status"] == "ok"
        held = send(server, signed(message(), dns, "sheffield.gov.uk"), "reports@sheffield.gov.uk")
        opened = [send(server, message(to=f"open@{DOMAIN}", subject=f"open {n}"), "reports@sheffield.gov.uk", f"open@{DOMAIN}")
                  for n in range(6)]
        assert await eventually(lambda: len(objects(config, "amr_data", "open/")) == 6, timeout=8)  # less than one [dns] timeout
        assert "temperror" in inbox_copy(config, opened[0], "open").decode()
        assert await eventually(lambda: server.spool.read_state(held).attempts >= 1)
        assert server.spool.pending() == [held] and server.spool.quarantined_ids() == []
        assert "cannot authenticate the sender reports@sheffield.gov.uk now" in server.spool.read_state(held).last_error
        outage.start()
        try:
            assert await eventually(lambda: "DNS:" not in browser.get("/"), timeout=30)
            assert "notes" not in browser.json("/healthz")
            assert await eventually(lambda: objects(config, "amr_data", "sheffield/"), timeout=60)
        finally:
            outage.stop()


def esmail(toml, *args):
    return subprocess.run([sys.executable, "-m", "esmail", "--config", str(toml), *args], capture_output=True, text=True, timeout=120)


@local
def test_ingest_of_a_quarantined_message_says_so_and_exits_0(config, dns, tmp_path):
    """`esmail ingest` has no client IP: DKIM alone can authenticate; an unsigned message to a wary feed is quarantined."""
    toml = tmp_path / "c.toml"
    toml.write_text(config_toml(config) + f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
                    '[[feed]]\nprefix = "sheffield"\nsenders = ["*@sheffield.gov.uk"]\n')
    unsigned, good = tmp_path / "unsigned.eml", tmp_path / "signed.eml"
    unsigned.write_bytes(message())
    good.write_bytes(signed(message(), dns, "sheffield.gov.uk"))
    held = esmail(toml, "ingest", "--recipient", f"sheffield@{DOMAIN}", unsigned)
    assert held.returncode == 0, held.stderr
    assert "quarantined: sheffield: From reports@sheffield.gov.uk is not authenticated" in held.stdout
    landed = esmail(toml, "ingest", "--recipient", f"sheffield@{DOMAIN}", good)
    assert landed.returncode == 0 and "amr-data\tsheffield/" in landed.stdout and "quarantined" not in landed.stdout


@local
async def test_quarantined_entries_past_quarantine_days_are_dropped_at_start(config, dns, tmp_path, caplog):
    """An entry quarantined longer than [spool] quarantine_days is deleted with a log line; a younger one stays."""
    import os
    import time

    spool = Spool(config.spool.path)
    old, young = (spool.accept(message(), ["sheffield"]) for _ in range(2))
    for envelope in (old, young):
        entry = spool.entry(envelope.id)
        spool.quarantine(entry, spool.message(entry), {"sheffield": "From x is not among the senders"}, "Authentication-Results: x; none")
        spool.done(envelope.id)
    long_ago = time.time() - 31 * 86400
    os.utime(spool.quarantine_dir / f"{old.id}.msg", (long_ago, long_ago))
    with caplog.at_level("INFO", logger="esmail.daemon"), RunningDaemon(feeds(config, dns)) as server:
        assert await eventually(lambda: any(f"{old.id}: dropped from quarantine after 30 days" in r.getMessage() for r in caplog.records))
        assert server.spool.quarantined_ids() == [young.id]


def test_feed_config_errors_name_the_key(tmp_path):
    """Duplicate prefix, bad glob, a prefix outside §2's alphabet, reject with no feeds: exit 2 naming the key and the fix."""
    cases = [
        ('[[feed]]\nprefix = "a"\n[[feed]]\nprefix = "a"\n', "[[feed]] #2 prefix = 'a' is declared twice"),
        ('[[feed]]\nprefix = "a"\nsenders = ["no-at-sign"]\n', "[[feed]] #1 senders must be a list of header From address globs"),
        ('[[feed]]\nprefix = "a"\nsenders = ["*@[x.org"]\n', "[[feed]] #1 senders must be"),
        ('[[feed]]\nprefix = "Sheffield Council"\n', "[[feed]] #1 prefix must be the recipient's local part"),
        ('[[feed]]\nname = "x"\n', "[[feed]] #1 needs prefix"),
        ('[smtp]\nunknown_feeds = "reject"\n', '[smtp] unknown_feeds = "reject" refuses every recipient when no [[feed]] is declared'),
        ('[smtp]\nunknown_feeds = "drop"\n', '[smtp] unknown_feeds must be "accept"'),
        ('[dns]\nnameservers = ["dns.google"]\n', "[dns] nameservers must be a list of resolver IP addresses"),
        ('[[feed]]\nprefix = "a"\nexpected_every = "daily"\n', "[[feed]] #1 expected_every must be a duration"),
    ]
    for text, expected in cases:
        toml = tmp_path / "c.toml"
        toml.write_text(text)
        result = esmail(toml, "check-config")
        assert result.returncode == 2 and expected in result.stderr and str(toml) in result.stderr, (text, result.stderr)


@local
def test_check_config_prints_the_feeds_and_asks_the_resolver(config, dns, tmp_path):
    """The feeds as declared, and one lookup through [dns] nameservers: ok with the server up, FAILED (exit 1) with it gone."""
    toml = tmp_path / "c.toml"
    feed = '[[feed]]\nprefix = "sheffield"\nname = "Sheffield City Council"\nsenders = ["*@sheffield.gov.uk"]\nexpected_every = "1d"\n'
    toml.write_text(config_toml(config) + f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = 1\n' + feed)
    result = esmail(toml, "check-config")
    assert result.returncode == 0, result.stdout + result.stderr
    assert '[[feed]]\nprefix = "sheffield"\nname = "Sheffield City Council"\nsenders = ["*@sheffield.gov.uk"]\nauthenticated = true' in result.stdout
    assert f"ok      dns: 127.0.0.1:{dns.port} answered for sheffield.gov.uk" in result.stdout
    silent = DnsServer()
    toml.write_text(config_toml(config) + f'[dns]\nnameservers = ["127.0.0.1:{silent.port}"]\ntimeout = 1\n' + feed)
    result = esmail(toml, "check-config")
    assert result.returncode == 1 and "FAILED  dns: sheffield.gov.uk TXT" in result.stdout


@local
async def test_imap_believes_only_the_topmost_header_of_its_trusted_provider(config, dns, dovecot):
    """[[imap]] trusted_authserv_id = "mx.google.com": its topmost Authentication-Results vouches for the first message;
    for the second it says fail, and a dmarc=pass further down (the sender's forgery) is not believed."""
    trusted = message(headers=(("Authentication-Results", "mx.google.com; spf=pass smtp.mailfrom=reports@sheffield.gov.uk; "
                                                           "dmarc=pass header.from=sheffield.gov.uk"),))
    forged = message(subject="forged", headers=(
        ("Authentication-Results", "mx.google.com; spf=pass smtp.mailfrom=bounce@attacker.example; dmarc=fail header.from=sheffield.gov.uk"),
        ("Authentication-Results", "mx.google.com; spf=pass smtp.mailfrom=reports@sheffield.gov.uk; dmarc=pass header.from=sheffield.gov.uk")))
    append(dovecot, trusted, forged)
    config = with_mailbox(feeds(config, dns), dovecot, trusted_authserv_id="mx.google.com")
    with RunningDaemon(config) as server:
        assert await eventually(lambda: len(objects(config, "inbox")) == 2 and not server.spool.pending())
        [held] = server.spool.quarantined_ids()
        assert read_entry(server.spool.quarantine_dir / f"{held}.msg")[1] == forged
    assert list(objects(config, "amr_data").values()) == [STORED_CSV]
    copies = sorted(objects(config, "inbox").values(), key=lambda copy: b"forged" in copy)
    assert "spf=pass smtp.mailfrom=reports@sheffield.gov.uk" in copies[0].decode().split("\r\n\r\n")[0]
    assert copies[1].decode().startswith(f"Authentication-Results: {HOST};\r\n\tspf=pass smtp.mailfrom=bounce@attacker.example")


def test_the_from_address_is_read_as_the_email_package_reads_it():
    """DMARC's From address: esmail reads the usual forms itself (the email package's parser is slow) and must agree
    with the parser on every From: plain, named, quoted, commented, encoded, several, broken."""
    import random

    from email import policy
    from email.parser import BytesParser
    from email.utils import getaddresses

    from esmail.authentication import _single_from

    def slow(headers) -> str:
        try:
            values = [str(v) for v in headers.get_all("From", [])]
        except Exception:
            return ""
        addresses = [address for _, address in getaddresses(values) if "@" in address]
        return addresses[0].lower() if len(values) == 1 and len(addresses) == 1 else ""

    rng = random.Random(3)
    senders = ["<A@B.c>", "a@b.c", "Jo Smith <Jo@X.org>", '"Smith, Jo" <jo@x>', "jo@x (Jo)", "=?utf-8?q?J=C3=B6?= <j@x>", "a@b, c@d",
               "Jo <>", "", "undisclosed-recipients:;", "<a@b> junk", "<a..b@c>"]
    senders += [rng.choice(["", "Jo ", "J o  "]) + rng.choice(["<", ""]) + "".join(rng.choice("aZ09._+-") for _ in range(5)) + "@"
                + "".join(rng.choice("aZ0.-") for _ in range(5)) + rng.choice([">", "", "> "]) for _ in range(2000)]
    for sender in senders:
        for count in (1, 2):
            raw = f"From: {sender}\r\n".encode() * count + b"Subject: s\r\n\r\nbody\r\n"
            headers = BytesParser(policy=policy.default).parsebytes(raw, headersonly=True)
            assert _single_from(headers) == slow(headers), (sender, count)


def test_an_spf_result_and_a_dmarc_record_are_remembered_until_their_answers_expire():
    """A second message from the same client and MAIL FROM gets the same results without asking DNS again, while the
    answers they came from live (TTL); once those expire, the results follow what DNS says now."""
    import time

    from esmail.authentication import Request, authenticate

    server = DnsServer()
    server.zones.ttl = 2
    server.txt("remembered.example", "v=spf1 ip4:127.0.0.1 -all")
    server.txt("_dmarc.remembered.example", "v=DMARC1; p=reject")
    server.start()
    try:
        raw = message(sender="meters@remembered.example")
        request = Request(server.config, HOST, client="127.0.0.1", helo="mail.example", mail_from="meters@remembered.example")
        first = authenticate(raw, request)
        asked = len(server.zones.queries)
        server.zones.records[("remembered.example", "TXT")] = []
        server.txt("remembered.example", "v=spf1 -all")
        server.zones.records[("_dmarc.remembered.example", "TXT")] = []
        server.txt("_dmarc.remembered.example", "v=DMARC1; p=none")
        assert authenticate(raw, request) == first and len(server.zones.queries) == asked
        assert "spf=pass" in first.header and "dmarc=pass header.from=remembered.example policy.dmarc=reject" in first.header
        time.sleep(2.2)
        later = authenticate(raw, request)
    finally:
        server.stop()
    assert len(server.zones.queries) > asked
    assert "spf=fail" in later.header and "dmarc=fail header.from=remembered.example policy.dmarc=none" in later.header
    assert not later.authenticated


def test_dns_trouble_is_not_remembered():
    """A temperror (DNS did not answer) is not kept: the next message asks again, and gets the final result once DNS answers."""
    from esmail.authentication import Request, authenticate

    server = DnsServer()
    server.txt("troubled.example", "v=spf1 ip4:127.0.0.1 -all")
    server.start()
    server.stop()
    request = Request(replace(server.config, timeout=0.5), HOST, client="127.0.0.1", helo="mail.example", mail_from="m@troubled.example")
    raw = message(sender="m@troubled.example")
    troubled = authenticate(raw, request)
    server.start()
    try:
        answered = authenticate(raw, request)
    finally:
        server.stop()
    assert "spf=temperror" in troubled.header and troubled.trouble
    assert "spf=pass" in answered.header and answered.authenticated and not answered.trouble


def test_dkim_reads_an_unsigned_message_as_dkimpy_reads_all_of_it(dns):
    """Without a signature only the header lines are read for DKIM: the result is the same as dkimpy's reading of the
    whole message (none, or permerror for headers it cannot read), for every mix of line ends, folds, blank lines,
    broken lines and signatures."""
    import random

    from esmail import mail
    from esmail.authentication import _dkim, _header_lines, _quiet
    from esmail.resolver import DnsTrouble, Lookups

    def whole(raw: bytes, lookups: Lookups) -> list[tuple[str, str, str]]:  # the reading before: dkimpy on all of it
        try:
            verifier = dkim.DKIM(raw, logger=_quiet)
        except Exception:
            return [("permerror", "", "")]
        count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
        if not count:
            return [("none", "", "")]
        found = []
        for index in range(count):
            verifier.domain = verifier.selector = None
            try:
                result = "pass" if verifier.verify(idx=index, dnsfunc=lookups.dkim_key) else "fail"
            except DnsTrouble:
                result = "temperror"
            except dkim.ValidationError:
                result = "fail"
            except Exception:
                result = "permerror"
            found.append((result, *(v.decode(errors="replace").lower() if v else "" for v in (verifier.domain, verifier.selector))))
        return found

    rng = random.Random(5)
    lines = [b"From: a@sheffield.gov.uk", b"Subject: readings", b" folded", b"\tfolded", b"From mbox line", b"no colon here", b"",
             b"DKIM-Signature: v=1; a=rsa-sha256; d=sheffield.gov.uk; s=sel; h=from; bh=AAAA; b=AAAA", b"dkim-signature: junk", b"x:"]
    samples = [signed(message(), dns, "sheffield.gov.uk"), message(), b"", b"\r\n\r\nbody", b"Subject: no body"]
    for _ in range(3000):
        ends = rng.choice([b"\r\n", b"\n"])
        samples.append(ends.join(rng.choice(lines) for _ in range(rng.randint(1, 8))) + ends * rng.randint(0, 2) + b"body line\r\n" * rng.randint(0, 2))
    for raw in samples:
        assert _dkim(raw, _header_lines(mail.head(raw)), Lookups(dns.config), []) == whole(raw, Lookups(dns.config)), raw


def test_the_final_results_stay_with_the_entry_through_failed_and_retry(tmp_path):
    """Recorded results come back with the entry (so that a replay stores the same inbox copy), after it went to failed/ and
    `spool retry` brought it back too; results too long for an extended attribute (over 64 KiB) go to its state file."""
    spool = Spool(tmp_path / "spool")
    for size in (100, 70_000):
        entry_id = spool.accept(b"From: a@b.example\r\n\r\nreadings\r\n", ["sheffield"]).id
        results = {"header": "Authentication-Results: mx.test;" + "x" * size, "from_address": "a@b.example", "authenticated": True,
                   "trouble": ""}
        spool.record_authentication(spool.entry(entry_id), results)
        assert spool.entry(entry_id).state.authentication == results
        if size > 65536:
            assert json.loads((spool.state / f"{entry_id}.json").read_text())["authentication"] == results
        spool.fail(spool.entry(entry_id), "gave up")
        spool.retry([entry_id])
        assert spool.entry(entry_id).state.authentication == results
        spool.done(entry_id)


@local
async def test_messages_authenticated_together_each_get_their_own_results(config, dns):
    """Small messages go to the conversion pool together (16 at a time), authenticated there: each keeps its own
    results and fate (a sheffield.gov.uk sender's lands, a spoofed one is quarantined), however they were grouped."""
    from concurrent.futures import ThreadPoolExecutor

    spoofed = {i: i % 3 == 0 for i in range(12)}
    with RunningDaemon(feeds(config, dns)) as server:
        with ThreadPoolExecutor(12) as senders:
            ids = list(senders.map(lambda i: send(server, message(subject=f"readings {i}"),
                                                  "bounce@attacker.example" if spoofed[i] else "reports@sheffield.gov.uk"), spoofed))
        assert await processed(server)
        assert sorted(server.spool.quarantined_ids()) == sorted(entry_id for i, entry_id in enumerate(ids) if spoofed[i])
    for i, entry_id in enumerate(ids):
        results = inbox_copy(config, entry_id).decode()
        assert f"Subject: readings {i}\r\n" in results
        mail_from = "bounce@attacker.example" if spoofed[i] else "reports@sheffield.gov.uk"
        assert f"spf=pass smtp.mailfrom={mail_from}" in results and ("dmarc=fail" in results) == spoofed[i]
    assert len(objects(config, "amr_data")) == 8


def test_the_usual_from_read_from_dkimpys_lines_is_the_email_packages():
    """The usual From is read from the header lines dkimpy reads for DKIM, without the email package's parser; wherever
    that reading gives an address it is the one the parser gives, for every mix of line ends, folds, bare CRs, mbox lines,
    broken lines, repeated and encoded Froms."""
    import random

    from esmail import mail
    from esmail.authentication import _header_lines, _single_from, _usual_from

    rng = random.Random(11)
    lines = [b"From: a@sheffield.gov.uk", b"from: Jo <Jo@Leeds.gov.uk>", b"FROM:<x@y.example>", b"From: =?utf-8?q?J=C3=B6?= <j@x.example>",
             b"From: a@b.example, c@d.example", b"From: \"Smith, Jo\" <jo@x.example>", b"Subject: readings", b" folded",
             b"\tfolded <z@z.example>", b"From mbox line", b"From : spaced@x.example", b"no colon here", b"x:", b":empty name",
             b"To: feed@datafeeds.example.org", b"Subject: a\rb", b"From: caf\xc3\xa9@x.example"]
    taken = 0
    for _ in range(6000):
        ends = rng.choice([b"\r\n", b"\n"])
        head = ends.join(rng.choice(lines) for _ in range(rng.randint(1, 6))) + ends
        raw = head + ends + b"body\r\n"
        usual = _usual_from(mail.head(raw), _header_lines(mail.head(raw)))
        if usual is not None:
            taken += 1
            assert usual == _single_from(mail.parse_headers(raw)), raw
    assert taken > 100
    usual = message()  # the usual message is read this way
    assert _usual_from(mail.head(usual), _header_lines(mail.head(usual))) == "reports@sheffield.gov.uk"
