"""MIME (DESIGN §2): a raw message → its feed prefixes, its attached files and its body text.

The standard library's `email` package with policy `default` does the
parsing; this module decides what counts as an attachment, where its name
comes from, and which header gives the prefix when there is no envelope.
"""

from __future__ import annotations

import binascii
import html
import mimetypes
import re
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesFeedParser, BytesParser
from email.utils import format_datetime, getaddresses, parsedate_to_datetime

from esmail.keys import domain_of, prefix_of, safe_path

MAX_FORWARD_DEPTH = 3
PREFIX_HEADERS = ("X-Forwarded-To", "X-Original-To", "Delivered-To", "To", "Cc")


@dataclass(frozen=True)
class Attachment:
    name: str  # made safe per DESIGN §3
    data: bytes
    inline_image: bool = False  # a signature logo shown in the body (inline, image/*, Content-ID): not data


_FEED = 1 << 20


def parse(raw: bytes) -> EmailMessage:
    """The message, fed to the parser a megabyte at a time.

    Fed whole, the parser splits every line of a 30 MB message into a string
    at once and holds them twice over (~250 MB); fed in slices, it consumes
    the lines as they come. A message of one part (a text body, as links
    come) has only its headers parsed: the parser would split its body into
    lines only to join them again (60 ms for 1 MB).
    """
    single = _single_part(raw)
    if single is not None:
        return single
    parser = BytesFeedParser(policy=policy.default)
    view = memoryview(raw)
    for start in range(0, len(raw), _FEED):
        parser.feed(bytes(view[start:start + _FEED]))
    return parser.close()


def _single_part(raw: bytes) -> EmailMessage | None:
    """The message as `parse` makes it, when it is neither multipart nor message/*: its headers parsed and the
    rest as its payload. None when that is not sure to be what the parser would make (then it parses)."""
    end = _head_end(raw)
    if end is None or raw.startswith((b"\n", b"\r")) or raw.count(b"\r", 0, end) != raw.count(b"\r\n", 0, end):
        return None  # no headers, or a bare CR (which splits lines its own way)
    msg = BytesParser(policy=policy.default).parsebytes(raw[:end], headersonly=True)
    if msg.get_payload() or msg.defects or msg.get_content_maintype() in ("multipart", "message"):
        return None
    blank = 2 if raw.startswith(b"\r\n", end) else 1
    msg.set_payload(raw[end + blank:].decode("ascii", "surrogateescape"))
    return msg


def _head_end(raw: bytes) -> int | None:
    """Where the blank line after the headers starts (just past the last header's line end), or None."""
    crlf = raw.find(b"\n\r\n")
    lf = raw.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else len(raw))  # not past the CRLF one: no scan of a 40 MB body
    ends = [i for i in (lf, crlf) if i >= 0]
    return min(ends) + 1 if ends else None


def head(raw: bytes) -> bytes:
    """The message up to its blank line (every header line, with its line end), or all of it when it has none."""
    end = _head_end(raw)
    return raw[:end] if end is not None else raw


def parse_headers(raw: bytes) -> EmailMessage:
    """Only the headers: enough to find prefixes without decoding a 40 MB body.

    Only the bytes up to the blank line reach the parser: with `headersonly`
    it still splits the whole body into lines.
    """
    return BytesParser(policy=policy.default).parsebytes(head(raw), headersonly=True)


def header_text(msg: EmailMessage, name: str, limit: int = 500) -> str:
    """A header's decoded value for people (the page, the history): "" when absent or too broken to read."""
    try:
        value = msg.get(name)
    except Exception:  # a header the parser cannot make sense of
        return ""
    return " ".join(str(value).split())[:limit] if value is not None else ""


def summary(msg: EmailMessage) -> dict[str, str]:
    """What the history keeps of the headers (history.Finished's fields): header_text of From, Subject and Date.

    The usual From and Date are read here, as policy `default` would read
    them but without its RFC 5322 parser (0.6 and 0.4 ms a message, most of
    what converting a small one costs); anything else goes to the parser.
    """
    raw = {}
    for name, value in msg.raw_items():
        raw.setdefault(name.lower(), value)
    plain = plain_sender(str(raw.get("from", "")))
    if plain:
        sender = (f"{plain[0]} <{plain[1]}>" if plain[0] else plain[1])[:500]
    else:
        sender = header_text(msg, "From")
    date = " ".join(str(raw.get("date", "")).split())
    try:
        date = format_datetime(parsedate_to_datetime(date))[:500] if date.isascii() else header_text(msg, "Date")
    except (ValueError, TypeError):
        date = header_text(msg, "Date")
    return {"header_from": sender, "subject": header_text(msg, "Subject"), "date": date}


def plain_sender(value: str) -> tuple[str, str] | None:
    """(display name or "", address) of a From value in one of its usual forms (`a@b`, `<a@b>`, `Name <a@b>`,
    ASCII, no quotes, comments or encoded words), as the email package would read it; None for any other."""
    value = " ".join(value.split())
    plain = _PLAIN_FROM.fullmatch(value) if value.isascii() else None
    return (plain["name"] or "", plain["address"] or plain["bare"]) if plain else None


_ADDRESS = r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN_FROM = re.compile(rf"(?:(?P<name>[A-Za-z0-9]+(?: [A-Za-z0-9]+)*) ?)?<(?P<address>{_ADDRESS})>|(?P<bare>{_ADDRESS})")


def header_prefix(msg: EmailMessage, domains: tuple[str, ...]) -> str | None:
    """The prefix of a message that arrived without an envelope (IMAP, `esmail ingest`), or None."""
    address = header_recipient(msg, domains)
    return prefix_of(address) if address else None


def header_recipient(msg: EmailMessage, domains: tuple[str, ...]) -> str | None:
    """The address the prefix comes from (DESIGN §2): the first in X-Forwarded-To, X-Original-To, Delivered-To,
    To, Cc whose domain is configured; when none is, X-Forwarded-To, else the first To (the old pipeline's rule)."""
    found = {name: _addresses(msg, name) for name in PREFIX_HEADERS}
    if domains:
        for name in PREFIX_HEADERS:
            for address in found[name]:
                if domain_of(address) in domains:
                    return address
    fallback = found["X-Forwarded-To"] or found["To"]
    return fallback[0] if fallback else None


def _addresses(msg: EmailMessage, name: str) -> list[str]:
    try:
        values = [str(v) for v in msg.get_all(name, [])]
    except Exception:  # a header too broken for the parser counts as absent
        return []
    return [addr for _, addr in getaddresses(values) if "@" in addr]


def attachments(msg: EmailMessage) -> list[Attachment]:
    """Every attached file, also those inside attached messages (forward as attachment), in order."""
    found: list[Attachment] = []
    _collect(msg, found, depth=0)
    return found


def _collect(part: EmailMessage, found: list[Attachment], depth: int) -> None:
    if part.get_content_type() == "message/rfc822":
        inner = part.get_payload()
        if depth < MAX_FORWARD_DEPTH and isinstance(inner, list) and inner:
            _collect(inner[0], found, depth + 1)
        else:  # nested too deep: keep the attached message whole
            data = inner[0].as_bytes() if isinstance(inner, list) and inner else part.as_bytes()
            found.append(Attachment(safe_path(_filename(part) or "attachment.eml"), data))
        return
    if part.is_multipart():
        for sub in part.iter_parts():
            _collect(sub, found, depth)
        return
    name = _filename(part)
    inline_image = _is_inline_image(part)
    if name is None and not inline_image and not _is_file(part):
        return
    found.append(Attachment(safe_path(name or _default_name(part)), _content(part), inline_image))


def _content(part: EmailMessage) -> bytes:
    """The part's decoded bytes. Base64, the usual case, is decoded from the payload as it is:
    the `email` package first copies it, splits it into lines and joins them (~5× the part)."""
    payload = part.get_payload()
    if str(part.get("Content-Transfer-Encoding", "")).lower() == "base64" and isinstance(payload, str):
        try:
            return binascii.a2b_base64(payload)  # skips line ends, as the email package does
        except (binascii.Error, ValueError):
            pass  # bad padding or non-ASCII: the email package's repairs and defects
    return part.get_payload(decode=True) or b""


def _is_inline_image(part: EmailMessage) -> bool:
    return part.get_content_disposition() == "inline" and part.get_content_maintype() == "image" and "Content-ID" in part


def body_text(msg: EmailMessage) -> str:
    """The message's first text part (plain, or HTML with entities unescaped), decoded; "" when there is none."""
    for part in msg.walk():
        if part.get_content_maintype() == "text" and part.get_content_disposition() != "attachment":
            try:
                text = part.get_content()
            except Exception:  # an unknown charset or broken encoding: the raw payload is still worth a look
                text = (part.get_payload(decode=True) or b"").decode("latin-1")
            return html.unescape(text) if part.get_content_subtype() == "html" else text
    return ""


def _filename(part: EmailMessage) -> str | None:
    try:
        name = part.get_filename()
    except Exception:
        return None
    return name or None


def _is_file(part: EmailMessage) -> bool:
    """A part without a name is still a file when it says `attachment` or carries application data."""
    return part.get_content_disposition() == "attachment" or part.get_content_maintype() == "application"


def _default_name(part: EmailMessage) -> str:
    ctype = part.get_content_type()
    return "attachment" + (mimetypes.guess_extension(ctype) or ".bin")
