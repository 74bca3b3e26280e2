"""DESIGN §5, text files: decoding, line ends, NULs, blank lines, and the ascii_only equivalence."""

import codecs
import re

import pytest

from esmail.normalise import normalise


def old_pipeline(data: bytes) -> bytes:
    """What the old pipeline made of bytes: every byte >= 0x80 and NUL dropped, blank lines dropped."""
    text = bytes(b for b in data if b < 0x80 and b != 0)
    lines = re.split(rb"\r\n|\r|\n", text)
    return b"".join(line + b"\n" for line in lines if line.strip())


@pytest.mark.parametrize("data, expected", [
    (b"a,b\r\nc,d\r\n", b"a,b\nc,d\n"),
    (b"a,b\rc,d", b"a,b\nc,d\n"),
    (b"a\n\n\n  \t \nb\n", b"a\nb\n"),
    (b"\n\n a\n", b" a\n"),
    (b"a\r\r\nb", b"a\nb\n"),
    (b"a\x00b\n\x00\n", b"ab\n"),
    (b"sep=,\nx,y\n", b"sep=,\nx,y\n"),
    (b"", b""),
    (b"\r\n \r\n", b""),
])
def test_ascii_lines(data, expected):
    """Line ends become \\n, NULs go, blank and whitespace-only lines go, a final \\n is added."""
    assert normalise(data) == expected


def test_utf8_kept():
    """UTF-8 text survives: café and £ are kept."""
    assert normalise("café,£5\r\n".encode()) == "café,£5\n".encode()


def test_windows_1252_decoded():
    """Invalid UTF-8 is read as Windows-1252, so £ (0xA3) becomes U+00A3."""
    assert normalise(b"price,\xa35\r\n") == "price,£5\n".encode()


@pytest.mark.parametrize("bom, codec", [(codecs.BOM_UTF16_LE, "utf-16-le"), (b"", "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"), (b"", "utf-16-be")])
def test_utf16(bom, codec):
    """UTF-16 is found by its BOM, or by NULs in every other byte."""
    data = bom + "MPR,kWh\r\n1700051910531,4.6 £\r\n\r\n".encode(codec)
    assert normalise(data) == "MPR,kWh\n1700051910531,4.6 £\n".encode()


def test_utf16_behind_damaged_bom():
    """A BOM turned into two U+FFFD by an earlier UTF-8 round trip does not hide UTF-16."""
    data = "\ufffd\ufffd".encode() + "sep=,\n\nMPR\n".encode("utf-16-le")
    assert normalise(data) == b"sep=,\nMPR\n"


def test_replacement_characters_dropped():
    assert normalise("a\ufffdb\n".encode()) == b"ab\n"


@pytest.mark.parametrize("data", [
    "café £ naïve\r\n\xa0\r\nplain\r\n".encode(),
    "café £\r\n€\r\nx\n".encode("cp1252"),
    b"\xff\xfe" + "a,é\r\n".encode("utf-16-le"),
    b"ascii only\r\n\r\n\x00line\n",
])
def test_ascii_only_is_the_old_pipeline_exactly(data):
    """ascii_only reproduces the old bytes; without it, lines minus non-ASCII equal the old lines."""
    if not data.startswith(b"\xff\xfe"):
        assert normalise(data, ascii_only=True) == old_pipeline(data)
    kept = [line.encode("ascii", "ignore") for line in normalise(data).decode().split("\n")]
    assert b"".join(line + b"\n" for line in kept if line.strip()) == normalise(data, ascii_only=True)


def test_no_bare_cr_or_nul_or_blank_line_survives():
    data = b"a\r\r\n\x00\r\nb\r \r\n\rc"
    out = normalise(data)
    assert b"\r" not in out and b"\x00" not in out and b"\n\n" not in out and out == b"a\nb\nc\n"
