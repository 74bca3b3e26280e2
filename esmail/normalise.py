"""Text normalisation (DESIGN §5): any CSV-ish bytes → UTF-8 lines ending `\\n`, no blank lines.

Works on the whole buffer with `bytes.replace` and one regex rather than a
line loop: that is what makes it several hundred MB/s.
"""

from __future__ import annotations

import codecs
import re

_BLANK_LINES = re.compile(rb"\n\s*\n")
_REPLACEMENT = "\ufffd".encode()
_SAMPLE = 4096


def normalise(data: bytes, ascii_only: bool = False) -> bytes:
    """Decode (UTF-8, UTF-16, else Windows-1252), drop NULs and U+FFFD, unify line ends, drop blank lines."""
    if data.isascii():
        text = data.replace(b"\x00", b"")
    else:
        decoded = decode(data).replace("\x00", "").replace("\ufffd", "")
        text = decoded.encode("ascii", "ignore") if ascii_only else decoded.encode("utf-8")
    text = b"\n" + text.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + b"\n"
    return _BLANK_LINES.sub(b"\n", text)[1:]


def decode(data: bytes) -> str:
    """Bytes of unknown encoding as text: a BOM or NUL pattern says UTF-16, else UTF-8, else Windows-1252."""
    body = data
    while body.startswith(_REPLACEMENT):  # a BOM damaged by an earlier UTF-8 round trip
        body = body[len(_REPLACEMENT):]
    if body.startswith(codecs.BOM_UTF16_LE) or body.startswith(codecs.BOM_UTF16_BE):
        return body.decode("utf-16", "replace")
    utf16 = _utf16_by_nuls(body[:_SAMPLE])
    if utf16:
        return body.decode(utf16, "replace")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def _utf16_by_nuls(sample: bytes) -> str | None:
    """UTF-16 without a BOM shows as NULs in every other byte of ASCII-range text."""
    pairs = len(sample) // 2
    if pairs < 2:
        return None
    even, odd = sample[0::2].count(0), sample[1::2].count(0)
    if odd > pairs * 0.3 and even < odd * 0.1:
        return "utf-16-le"
    if even > pairs * 0.3 and odd < even * 0.1:
        return "utf-16-be"
    return None
