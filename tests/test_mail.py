"""DESIGN §2 header prefixes and attachment discovery."""

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from esmail import mail


def message(**headers) -> EmailMessage:
    msg = EmailMessage()
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("body")
    return msg


def parsed(msg: EmailMessage):
    return mail.parse(bytes(msg))


def test_configured_domain_wins_in_header_order():
    msg = message(To="boss@other.org, Feed@datafeeds.example.org", X_Original_To="orig@datafeeds.example.org")
    assert mail.header_prefix(parsed(msg), ("datafeeds.example.org",)) == "orig"


def test_without_a_configured_domain_the_old_rule_applies():
    msg = message(To="first@a.org, second@b.org", X_Forwarded_To="fwd@c.org")
    assert mail.header_prefix(parsed(msg), ("datafeeds.example.org",)) == "fwd"
    assert mail.header_prefix(parsed(message(To="first@a.org, second@b.org")), ()) == "first"


def test_no_usable_recipient():
    assert mail.header_prefix(parsed(message(To="bad..name@a.org")), ()) is None
    assert mail.header_prefix(parsed(message(Subject="none")), ()) is None


def test_attachment_names_rfc2231_and_encoded_words():
    msg = message(To="x@y")
    msg.add_attachment(b"1", maintype="text", subtype="csv", filename=("utf-8", "", "caf\u00e9 £.csv"))
    msg.add_attachment(b"2", maintype="application", subtype="octet-stream", filename="plain.csv")
    raw = bytes(msg).replace(b'filename="plain.csv"', b'filename="=?UTF-8?B?w6lsw6ltZW50LmNzdg==?="')
    names = [a.name for a in mail.attachments(mail.parse(raw))]
    assert names == ["caf\u00e9 £.csv", "\u00e9l\u00e9ment.csv"]


def test_name_from_content_type_and_unsafe_names():
    msg = message(To="x@y")
    msg.add_attachment(b"data", maintype="application", subtype="zip", params={"name": "../../up.zip"})
    msg.add_attachment(b"raw", maintype="application", subtype="zip", disposition="attachment")
    assert [(a.name, a.data) for a in mail.attachments(parsed(msg))] == [("up.zip", b"data"), ("attachment.zip", b"raw")]


def test_forwarded_as_attachment():
    """Attachments of an attached message/rfc822 are the outer message's too."""
    inner = message(To="a@b", Subject="original")
    inner.add_attachment(b"a,b\n", maintype="text", subtype="csv", filename="inner.csv")
    outer = message(To="sheffield@datafeeds.example.org")
    outer.add_attachment(b"x\n", maintype="text", subtype="csv", filename="outer.csv")
    outer.add_attachment(inner)
    assert [(a.name, a.data) for a in mail.attachments(parsed(outer))] == [("outer.csv", b"x\n"), ("inner.csv", b"a,b\n")]


def test_body_is_not_an_attachment():
    msg = message(To="x@y")
    msg.add_alternative("<p>html</p>", subtype="html")
    assert mail.attachments(parsed(msg)) == []


@pytest.mark.parametrize("body, expected", [
    (b"QUJD\r\nREVG\r\n", b"ABCDEF"),  # line ends skipped
    (b"QUJD\r\nRA\r\n", b"ABCD"),  # padding missing: repaired as the email package does
    (b"QU JD\r\n!REVG\r\n", b"ABCDEF"),  # stray characters skipped
    (b"QUJD\r\nR\r\n", b"QUJDR"),  # cannot be base64: the email package gives the encoded bytes
    (b"QUJD\xe9\r\n", b"ABC"),  # an 8-bit byte: the email package's decoding
])
def test_base64_attachments_decode_as_the_email_package_decodes(body, expected):
    """esmail decodes base64 itself (the email package needs ~5× the part in memory), with the same result."""
    raw = (b"To: x@y\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Disposition: attachment; filename=a.bin\r\nContent-Transfer-Encoding: base64\r\n\r\n" + body)
    reference = BytesParser(policy=policy.default).parsebytes(raw).get_payload(decode=True)
    [attachment] = mail.attachments(mail.parse(raw))
    assert attachment.data == reference == expected


def test_a_message_is_parsed_the_same_fed_in_slices():
    """mail.parse feeds a megabyte at a time: a CRLF or a boundary line split between slices changes nothing."""
    data = bytes(range(256)) * 3200  # ~1.1 MB of base64: the slice edge falls inside the attachment
    for shift in range(78):  # moves the edge across a whole 76-character line and its CRLF
        msg = message(To="x@y")
        msg.set_content("x" * shift)
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename="a.bin")
        msg.add_attachment(b"after", maintype="application", subtype="octet-stream", filename="b.bin")
        raw = bytes(msg).replace(b"\n", b"\r\n")
        assert [a.data for a in mail.attachments(mail.parse(raw))] == [data, b"after"]


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_headers_alone_are_the_headers_of_the_whole_message(eol):
    msg = message(To="sheffield@datafeeds.example.org", X_Forwarded_To="a@b", Subject="a long subject " * 10)
    msg.add_attachment(b"x" * 100_000, maintype="application", subtype="octet-stream", filename="a.bin")
    raw = bytes(msg).replace(b"\n", eol)
    assert mail.parse_headers(raw).items() == mail.parse(raw).items()
    assert mail.parse_headers(b"To: x@y" + eol).items() == [("To", "x@y")]


def test_the_summary_reads_from_and_date_as_the_email_package_does():
    """mail.summary reads the usual From and Date itself (the email package's parser is slow) and must give the history
    what policy `default` gives: plain and named addresses, quotes, comments, encoded words, dates good and broken."""
    import random

    rng = random.Random(7)

    def some(chars: str, most: int) -> str:
        return "".join(rng.choice(chars) for _ in range(rng.randint(0, most)))

    senders = ["<a@b.c>", "a@b.c", "Jo Smith <jo@x.org>", "Jo  Smith<jo@x.org>", '"Smith, Jo" <jo@x>', "jo@x (Jo)", "=?utf-8?q?J=C3=B6?= <j@x>",
               "<a..b@c>", "<.a@b>", "a@b, c@d", "Jo <>", "", "Jö <j@x>", "undisclosed-recipients:;", "<a@b> junk"]
    senders += [some("aZ09 ", 6) + some(" <", 2) + some("aZ09._+-", 6) + "@" + some("aZ0.-", 6) + some(">  ", 2)
                for _ in range(3000)]
    dates = ["Sun,  6 Dec 2026 05:05:25 +0000 (UTC)", "6 Dec 2026 05:05 -0500", "Mon, 32 Dec 2026 05:05:25 +0000", "yesterday", "",
             "Sun, 06 Dec 2026 05:05:25 GMT", "Sun, 6 Dec 26 05:05:25 +0000", "Thu, 1 Jan 1970 00:00:00 -0000", "Sün, 6 Dec 2026"]
    dates += [some("MonTueDec0123456789:+- ,", 30) for _ in range(2000)]
    for n in range(max(len(senders), len(dates))):
        headers = {"From": senders[n % len(senders)], "Date": dates[n % len(dates)]}
        raw = "".join(f"{name}: {value}\r\n" for name, value in headers.items() if value).encode() + b"Subject: s\r\n\r\nbody\r\n"
        msg = mail.parse(raw)
        slow = {"header_from": mail.header_text(msg, "From"), "subject": mail.header_text(msg, "Subject"), "date": mail.header_text(msg, "Date")}
        assert mail.summary(msg) == slow, headers


def test_a_message_of_one_part_is_parsed_as_the_email_package_parses_it():
    """mail.parse parses only the headers of a message that is not multipart (a text body, as links come) and must
    make what the parser makes of it: headers, payload, defects, for plain, broken and mutated messages."""
    import random

    from email.parser import BytesFeedParser

    rng = random.Random(11)
    bases = [b"From: a@b\r\nTo: x@y\r\nSubject: s\r\n\r\nbody line\r\n.\r\nmore\r\n", b"To: x@y\nSubject: s\n\nlf body\n",
             b"Subject: s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nh=C3=A9\r\n",
             b"To: x@y\r\nContent-Type: text/html\r\n\r\n<a href='https://x/y'>x</a>", b"To: x@y\r\n\r\n", b"\r\nno headers\r\n",
             b"To: x@y\r\nnot a header\r\n\r\nbody\r\n", b"To: x@y\r\n folded\r\n\tagain\r\n\r\nbody\r\n", b"To: x@y\rSubject: s\r\r\rbody\r",
             b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n", b"Content-Type: message/rfc822\r\n\r\nTo: a@b\r\n\r\nx",
             b"From x\r\nTo: y@z\r\n\r\nbody\r\n", b"To: \xff\xfe@y\r\nSubject: \xe9\r\n\r\n\xe9 8-bit body\r\n", b"To: x@y\r\n\r\n\r\n\r\n",
             b"To: x@y\n\r\nbody", b"To: x@y\r\n\nbody"]
    messages = list(bases)
    for _ in range(3000):
        raw = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(raw) + 1)
            raw[at:at + rng.randint(0, 3)] = bytes(rng.choice(b"\r\n:; \t-aZ=\xff") for _ in range(rng.randint(0, 3)))
        messages.append(bytes(raw))
    def seen(msg):
        try:
            flat = msg.as_bytes()
        except Exception as exc:  # headers too broken to write out: then for both
            flat = type(exc)
        return (list(msg.raw_items()), msg.is_multipart() or msg.get_payload(), [type(d) for d in msg.defects], msg.is_multipart(),
                flat)

    for raw in messages:
        parser = BytesFeedParser(policy=policy.default)
        parser.feed(raw)
        assert seen(mail.parse(raw)) == seen(parser.close()), raw
