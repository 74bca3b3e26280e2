"""`esmail serve` over real sockets: the replies of DESIGN §7, the size limit, STARTTLS, timeouts, and what lands in the buckets."""

import smtplib
import socket
import ssl
import time
from dataclasses import replace
from email.message import EmailMessage

import pytest
from conftest import RunningDaemon, bucket_contents, eventually, self_signed

from esmail.config import SmtpConfig, SpoolConfig
from esmail.smtp import MAX_RECIPIENTS, Receiver
from esmail.group_commit import GroupCommit

CSV = b"MPAN,00:30\r\n2200013680374,1.5\r\n"
DOMAIN = "datafeeds.example.org"


def feed(to: str = f"sheffield@{DOMAIN}", csv: bytes = CSV, name: str = "export.csv") -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "meters@supplier.example", to, "readings"
    msg.set_content("attached")
    msg.add_attachment(csv, maintype="text", subtype="csv", filename=name)
    return msg.as_bytes().replace(b"\n", b"\r\n")


def with_domains(config):
    return replace(config, smtp=replace(config.smtp, domains=(DOMAIN,)))


def reply_to(client: smtplib.SMTP, command: str) -> tuple[int, str]:
    code, text = client.docmd(command)
    return code, text.decode()


async def test_two_feed_recipients_give_two_prefixes(config, store):
    """One message to two feed addresses is stored once under each prefix, and the raw message in inbox."""
    raw = feed()
    with RunningDaemon(with_domains(config)) as server, server.smtp() as client:
        client.ehlo("supplier.example")
        client.mail("meters@supplier.example")
        client.rcpt(f"sheffield@{DOMAIN}")
        client.rcpt(f"Leeds@{DOMAIN}")
        code, text = client.data(raw)
        assert code == 250 and text.decode().startswith("2.0.0 Ok: queued as ")
        entry_id = text.decode().rsplit(" ", 1)[1]
        assert await eventually(lambda: not server.spool.pending())
    amr = await bucket_contents(store, config.buckets.amr_data)
    assert sorted(key.split("/")[0] for key in amr) == ["leeds", "sheffield"]
    assert set(amr.values()) == {b"MPAN,00:30\n2200013680374,1.5\n"}
    inbox = await bucket_contents(store, config.buckets.inbox)
    assert sorted(key.split("/", 1)[0] for key in inbox) == ["leeds", "sheffield"]
    assert all(key.endswith(f"/{entry_id}.eml") and value == raw for key, value in inbox.items())


@pytest.mark.parametrize("config", ["local"], indirect=True)
def test_replies_at_mail_and_rcpt(config):
    """DESIGN §7 at RCPT: foreign domain 550 5.1.1, bad local part 550 5.1.3, past 100 recipients 452 4.5.3."""
    with RunningDaemon(with_domains(config)) as server, server.smtp() as client:
        client.ehlo("supplier.example")
        assert client.has_extn("size") and client.esmtp_features["size"] == str(config.smtp.max_message_size)
        assert "auth" not in client.esmtp_features
        assert reply_to(client, "MAIL FROM:<a@supplier.example>")[0] == 250
        for address, expected in [
            ("someone@elsewhere.example", "550 5.1.1"),
            (f"@{DOMAIN}:victim@elsewhere.example", "550 5.1.1"),  # a source route counts for nothing (RFC 5321 §3.6.1)
            ("victim%elsewhere.example@" + DOMAIN, "550 5.1.3"),
            (f'"quoted local"@{DOMAIN}', "550 5.1.3"),
            (f"..sheffield@{DOMAIN}", "550 5.1.3"),
        ]:
            code, text = reply_to(client, f"RCPT TO:<{address}>")
            assert f"{code} {text}".startswith(expected), (address, code, text)
        for n in range(MAX_RECIPIENTS):
            assert reply_to(client, f"RCPT TO:<feed{n}@{DOMAIN}>")[0] == 250
        code, text = reply_to(client, f"RCPT TO:<one-too-many@{DOMAIN}>")
        assert (code, text[:5]) == (452, "4.5.3")


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_size_limit_exactly_passes_one_byte_more_is_552(config, store):
    """A message of exactly max_message_size is queued; one byte more gets 552 5.3.4, declared (SIZE=) or not."""
    limit = 20_000
    config = replace(config, smtp=replace(config.smtp, max_message_size=limit))
    head = b"To: sheffield@x\r\nSubject: size\r\n\r\n"
    exact = head + b"y" * (limit - len(head) - 2) + b"\r\n"
    assert len(exact) == limit
    with RunningDaemon(config) as server, server.smtp() as client:
        client.ehlo("x")
        assert client.mail("a@b", [f"SIZE={limit + 1}"]) == (552, b"5.3.4 Message too big: 20,001 bytes, over the limit of 20,000 bytes")
        client.mail("a@b")
        client.rcpt("sheffield@x")
        assert client.data(exact)[0] == 250
        client.mail("a@b")
        client.rcpt("sheffield@x")
        code, text = client.data(b"y" + exact)
        assert (code, text) == (552, b"5.3.4 Message too big: 20,001 bytes, over the limit of 20,000 bytes")
        assert client.noop()[0] == 250  # the session goes on after the refusal
        assert await eventually(lambda: not server.spool.pending())
    assert list((await bucket_contents(store, config.buckets.inbox)).values()) == [exact]


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_junk_that_is_not_mime_is_accepted_and_kept(config, store):
    """250 for bytes that are not a MIME message: the inbox holds them unchanged, dot-stuffing undone."""
    junk = b"\x00\xff garbage without headers\r\n.leading dot line\r\n..two dots\r\n\xfe\r\n"
    with RunningDaemon(config) as server, server.smtp() as client:
        client.ehlo("x")
        client.mail("a@b")
        client.rcpt("junk@x")
        assert client.data(junk)[0] == 250  # smtplib stuffs the dots, esmail must unstuff them
        assert await eventually(lambda: not server.spool.pending())
    assert list((await bucket_contents(store, config.buckets.inbox)).values()) == [junk]


@pytest.mark.parametrize("config", ["local"], indirect=True)
@pytest.mark.parametrize("fake_end", [b"\n.\r\n", b"\r.\r\n", b"\n.\n", b"\r\n.\n", b"\r\n.\r"])
async def test_smtp_smuggling_a_fake_end_of_data_is_just_data(config, store, fake_end):
    """Only CRLF.CRLF ends DATA: a second message hidden behind a bare LF or CR stays inside the first."""
    with RunningDaemon(config) as server, socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        replies = sock.makefile("rb")
        replies.readline()
        sock.sendall(b"EHLO x\r\n")
        while replies.readline()[3:4] == b"-":
            pass
        sock.sendall(b"MAIL FROM:<a@b>\r\nRCPT TO:<first@x>\r\nDATA\r\n")
        assert [replies.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        body = b"Subject: one\r\n\r\nTesting" + fake_end + b"MAIL FROM:<evil@b>\r\nRCPT TO:<second@x>\r\nDATA\r\nNO SMUGGLING\r\n"
        sock.sendall(body + b".\r\nQUIT\r\n")
        assert replies.readline().startswith(b"250 2.0.0 Ok: queued as ")
        assert replies.readline().startswith(b"221")
        assert await eventually(lambda: not server.spool.pending())
    inbox = await bucket_contents(store, config.buckets.inbox)
    unstuffed = body.replace(b"\r\n.", b"\r\n")  # a line that starts with a dot loses it, as RFC 5321 §4.5.2 says
    assert [key.split("/")[0] for key in inbox] == ["first"] and list(inbox.values()) == [unstuffed]


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_data_split_in_awkward_places_and_lines_over_1000_octets(config, store):
    """The end marker and stuffed dots split across packets, and a 5,000-octet line: all taken as sent."""
    long_line = b"z" * 5000
    stuffed = b"Subject: split\r\n\r\n..dot\r\n" + long_line + b"\r\n..\r\nend\r\n.\r\n"
    with RunningDaemon(config) as server, socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        replies = sock.makefile("rb")
        replies.readline()
        sock.sendall(b"HELO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<split@x>\r\nDATA\r\n")
        assert [replies.readline()[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
        for i in range(0, len(stuffed), 3):  # three bytes a packet
            sock.sendall(stuffed[i:i + 3])
            if i < 60 or i > len(stuffed) - 20:
                time.sleep(0.002)
        assert replies.readline().startswith(b"250 2.0.0")
        assert await eventually(lambda: not server.spool.pending())
    [raw] = (await bucket_contents(store, config.buckets.inbox)).values()
    assert raw == b"Subject: split\r\n\r\n.dot\r\n" + long_line + b"\r\n.\r\nend\r\n"


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_starttls_with_a_self_signed_certificate(config, store, tmp_path):
    """With tls_cert/tls_key, STARTTLS is offered and works; with require_tls, MAIL before it gets 530."""
    cert, key = self_signed(tmp_path)
    client_context = ssl.create_default_context(cafile=cert)
    with RunningDaemon(config, tls_cert=cert, tls_key=key, require_tls=True) as server:
        with smtplib.SMTP("localhost", server.port, timeout=10) as plain:
            plain.ehlo("x")
            assert plain.has_extn("starttls")
            assert plain.mail("a@b")[0] == 530
        with smtplib.SMTP("localhost", server.port, timeout=10) as client:
            client.starttls(context=client_context)
            client.ehlo("x")
            assert not client.has_extn("starttls") and client.has_extn("size")
            client.sendmail("a@b", ["secure@x"], feed("secure@x"))
        assert await eventually(lambda: not server.spool.pending())
    assert [key.split("/")[0] for key in await bucket_contents(store, config.buckets.amr_data)] == ["secure"]


@pytest.mark.parametrize("config", ["local"], indirect=True)
def test_the_other_commands_answer_as_aiosmtpd_does(config):
    """HELP, AUTH, VRFY, EXPN, NOOP, RSET and unknown commands get aiosmtpd's replies (the session's command table is esmail's)."""
    with RunningDaemon(config) as server, server.smtp() as client:
        client.ehlo("supplier.example")
        assert sorted(client.esmtp_features) == ["8bitmime", "help", "size", "smtputf8"]
        commands = "250 Supported commands: AUTH EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY"
        for command, expected in [
            ("HELP", commands),
            ("HELP MAIL", "250 Syntax: MAIL FROM: <address> [SP <mail-parameters>]"),
            ("HELP BOGUS", "501" + commands[3:]),
            ("AUTH PLAIN AGFAAGI=", "538 5.7.11 Encryption required for requested authentication mechanism"),
            ("VRFY someone@supplier.example", "252 Cannot VRFY user, but will accept message and attempt delivery"),
            ("EXPN list", "502 EXPN not implemented"),
            ("NOOP", "250 OK"),
            ("RSET", "250 OK"),
            ("BOGUS", '500 Error: command "BOGUS" not recognized'),
        ]:
            assert "%d %s" % reply_to(client, command) == expected, command


@pytest.mark.parametrize("config", ["local"], indirect=True)
def test_a_slow_silent_client_is_disconnected(config):
    """Idle past command_timeout: the connection is closed; past session_timeout, even a chatty one gets 421."""
    with RunningDaemon(config, command_timeout=0.5, session_timeout=2.0) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
            assert silent.recv(1000).startswith(b"220")
            started = time.monotonic()
            assert silent.recv(1000) == b""  # closed by the server, not by our 10 s timeout
            assert time.monotonic() - started < 5
        chatty = server.smtp()
        started = time.monotonic()
        code = 250
        while code == 250 and time.monotonic() - started < 10:
            time.sleep(0.2)
            code, text = chatty.noop()
        assert (code, text[:5]) == (421, b"4.4.2") and 1.5 < time.monotonic() - started < 5
        with pytest.raises(smtplib.SMTPServerDisconnected):
            chatty.noop()


@pytest.mark.parametrize("config", ["local"], indirect=True)
def test_concurrent_sessions_are_capped(config):
    """Past max_sessions a new client gets 421 4.7.0 at once; when one leaves, the next is served."""
    with RunningDaemon(config, max_sessions=2) as server:
        first, second = server.smtp(), server.smtp()
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            server.smtp()
        assert refused.value.smtp_code == 421 and b"4.7.0" in refused.value.smtp_error
        first.quit()
        time.sleep(0.2)
        with server.smtp() as third:
            assert third.noop()[0] == 250
        second.quit()


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_messages_are_written_into_files_made_ahead_and_a_stop_removes_the_spare_ones(config, store):
    """The receiver writes messages into empty files made ahead in tmp/ (creating a file can cost 0.5 ms of CPU);
    each message lands whole, and a clean stop leaves tmp/ empty."""
    raws = [feed(csv=CSV + b"2200013680375,%d\r\n" % n) for n in range(5)]
    with RunningDaemon(config) as server:
        for raw in raws:
            with server.smtp() as client:
                assert client.sendmail("meters@supplier.example", [f"sheffield@{DOMAIN}"], raw) == {}
        assert await eventually(lambda: not server.spool.pending())
        ready = [path.name for path in server.spool.tmp.iterdir()]
        assert len(ready) >= GroupCommit.BLANKS // 2 and all(name.startswith("blank-") for name in ready), ready
    assert list(server.spool.tmp.iterdir()) == []
    assert sorted((await bucket_contents(store, config.buckets.inbox)).values()) == sorted(raws)


def test_mail_and_rcpt_paths_are_read_as_aiosmtpd_reads_them():
    """esmail reads a plain `<local@domain>` itself (aiosmtpd's parser is slow) and must agree with aiosmtpd on
    every path and its parameters: addresses, parameters, comments, quotes, literals, and junk."""
    import random

    from aiosmtpd.smtp import SMTP

    from esmail.smtp import Connection

    def parsed(getaddr, arg):
        try:
            return getaddr(arg)
        except Exception as exc:  # aiosmtpd's parser fails on some junk (IndexError): then so must ours
            return type(exc)

    connection = Connection.__new__(Connection)
    rng = random.Random(5)

    def some(chars: str, most: int) -> str:
        return "".join(rng.choice(chars) for _ in range(rng.randint(0, most)))

    paths = ["<a@b.c>", "<a@b.c> SIZE=100", "<a@b.c>  SIZE=1 BODY=8BITMIME", "<a@b.c> (comment) SIZE=1", "<a@b.c>\tSIZE=1",
             "<.a@b>", "<a..b@c>", "<a@-b>", "<a@b.>", "<a@b>>", "<>", '<"a b"@c>', "<a@[192.0.2.1]>", "<é@b>", "a@b", "<a@b>(c)"]
    paths += ["<" + some("aZ09!#$%&'*+/=?^_`{|}~-.\" (\\", 8) + "@" + some("aZ0-.[]é", 8) + ">" + some(" \t()SIZE=1<>", 8)
              for _ in range(20_000)]
    for arg in paths:
        assert parsed(connection._getaddr, arg) == parsed(lambda a: SMTP._getaddr(connection, a), arg), arg


@pytest.mark.parametrize("config", ["local"], indirect=True)
def test_spool_that_cannot_be_written_answers_451(config):
    """A spool write that fails (here tmp/ is not a folder) is 451 4.3.0 and leaves nothing in the queue."""
    with RunningDaemon(config) as server, server.smtp() as client:
        server.spool.tmp.rmdir()
        server.spool.tmp.write_text("not a folder")
        client.ehlo("x")
        client.mail("a@b")
        client.rcpt("sheffield@x")
        code, text = client.data(feed())
        assert (code, text[:5]) == (451, b"4.3.0")
        assert server.spool.pending() == []


@pytest.mark.parametrize("config", ["local"], indirect=True)
def test_spool_short_of_space_refuses_mail(config):
    """Under [spool] min_free, MAIL is answered 452 4.3.1 (DATA would be 451): the sender keeps the message."""
    config = replace(config, spool=SpoolConfig(path=config.spool.path, min_free=10**18))
    with RunningDaemon(config) as server, server.smtp() as client:
        client.ehlo("x")
        code, text = client.mail("a@b")
        assert (code, text[:5]) == (452, b"4.3.1")


async def test_an_internal_error_answers_451_never_500():
    """aiosmtpd answers a handler's exception with 500 (the sender gives up); esmail says 451 (try later)."""
    receiver = Receiver(SmtpConfig(), committer=None, on_spooled=print)
    reply = await receiver.handle_exception(RuntimeError("boom"))
    assert reply.startswith("451 4.3.0")


@pytest.mark.parametrize("seed", range(20))
async def test_read_data_agrees_with_line_by_line_unstuffing(seed):
    """Bulk DATA reading gives what aiosmtpd's line loop gives, however the bytes are split, with exact sizes."""
    import asyncio
    import random

    from esmail.smtp import read_data

    rng = random.Random(seed)
    lines = [rng.choice([b"", b".", b"..", b".x", b"a.", b"text", b"\r", b"\n.", b"x" * rng.randint(0, 3000)]) for _ in range(rng.randint(0, 60))]
    message = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\nNEXT COMMAND\r\n"
    reader = asyncio.StreamReader(limit=rng.choice([16, 64, 1024]))
    position = 0
    while position < len(stuffed):
        step = rng.randint(1, 200)
        reader.feed_data(stuffed[position:position + step])
        position += step
    assert await read_data(reader, len(message)) == (message, len(message))
    assert await reader.readline() == b"NEXT COMMAND\r\n"  # nothing past the end marker was consumed
    again = asyncio.StreamReader(limit=64)
    again.feed_data(stuffed)
    assert await read_data(again, len(message) - 1) == (None, len(message))  # one byte over: refused, read to the end, and said how big
    assert await again.readline() == b"NEXT COMMAND\r\n"


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_esmail_send_delivers_files_and_reports_refusals(config, store, tmp_path):
    """`esmail send` mails files as attachments and prints the queue id; a refused recipient exits 1 with the reply."""
    import subprocess
    import sys

    (tmp_path / "export.csv").write_bytes(CSV)
    with RunningDaemon(with_domains(config)) as server:
        def send(to):
            return subprocess.run([sys.executable, "-m", "esmail", "send", "--server", f"127.0.0.1:{server.port}", "--to", to,
                                   str(tmp_path / "export.csv")], capture_output=True, text=True, timeout=60)

        sent = send(f"sheffield@{DOMAIN}")
        assert sent.returncode == 0 and "250 2.0.0 Ok: queued as " in sent.stdout, sent.stderr
        refused = send("someone@elsewhere.example")
        assert refused.returncode == 1 and "RCPT TO refused: 550 5.1.1" in refused.stderr
        assert await eventually(lambda: not server.spool.pending())
    amr = await bucket_contents(store, config.buckets.amr_data)
    assert [key.split("/", 2)[::2] for key in amr] == [["sheffield", "export.csv"]] and list(amr.values()) == [b"MPAN,00:30\n2200013680374,1.5\n"]
