"""What a file really is (DESIGN §4): decided by its bytes first, its name second.

Portals send HTML tables named `.xls`, CSV named `.xlsx`, workbooks named
`.csv` or with no extension at all. Binary formats announce themselves in
their first bytes (a zip's `PK`, OLE2's `D0 CF 11 E0`, TNEF's `78 9F 3E 22`),
and a zip's member names tell xlsx, xlsb and ods from a plain archive; a
name is trusted only for what bytes cannot say (text is text).
"""

from __future__ import annotations

import io
import zipfile
from typing import NamedTuple

from esmail.keys import extension

TEXT = "text"
ZIP = "zip"
TNEF = "tnef"
HTML = "html"
XLSX, XLS, XLSB, ODS = "xlsx", "xls", "xlsb", "ods"
SPREADSHEETS = (XLSX, XLS, XLSB, ODS)

_BY_NAME = {".csv": TEXT, ".cns": TEXT, ".zip": ZIP, ".xlsx": XLSX, ".xls": XLS, ".xlsb": XLSB, ".ods": ODS}
_OLE2 = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_TNEF = b"\x78\x9f\x3e\x22"
_ODS_MIMETYPE = b"application/vnd.oasis.opendocument.spreadsheet"
_SAMPLE = 8192
_CONTROLS = bytes(c for c in range(32) if c not in (9, 10, 13))  # not in text, tabs and line ends aside


class Kind(NamedTuple):
    kind: str | None  # None: nothing esmail can convert
    rule: str  # how it was decided, for the log


def identify(name: str, data: bytes) -> Kind:
    """The kind of a file and the rule that decided it."""
    ext = extension(name)
    named = _BY_NAME.get(ext)
    found = _by_magic(data)
    shown = ext or "no extension"
    if found == ZIP and named in (XLSX, XLSB, ODS):  # one file, read as that workbook or unprocessable whole, never unzipped
        return Kind(named, named)
    if found is not None:
        return Kind(found, found if found == named else f"{found} by content, named {shown}")
    if named == TEXT:
        return Kind(TEXT, ext[1:])
    if named in SPREADSHEETS:
        sample = data[:_SAMPLE].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
        if sample.startswith(b"<") and (b"<table" in sample or b"<html" in sample):
            return Kind(HTML, f"html table, named {ext}")
        if _looks_like_text(data[:_SAMPLE]):
            return Kind(TEXT, f"text, named {ext}")
        return Kind(None, f"named {ext} but not a {named} file")
    if named == ZIP:
        return Kind(None, "named .zip but not a zip")
    return Kind(None, f"no conversion for {shown}")


def _by_magic(data: bytes) -> str | None:
    if data.startswith(_OLE2):
        return XLS
    if data.startswith(_TNEF):
        return TNEF
    if data.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_kind(data)
    return None


def _zip_kind(data: bytes) -> str:
    """xlsx, xlsb and ods are zips: their member names say which (a broken zip stays a zip)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = set(archive.namelist())
        if "xl/workbook.xml" in names:
            return XLSX
        if "xl/workbook.bin" in names:
            return XLSB
        if "mimetype" in names and archive.read("mimetype").strip() == _ODS_MIMETYPE:
            return ODS
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, NotImplementedError, EOFError):
        pass
    return ZIP


def _looks_like_text(sample: bytes) -> bool:
    """CSV or tab-separated text: no NULs (or the alternating NULs of UTF-16), few other control bytes."""
    if sample.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True
    body = sample.replace(b"\x00", b"") if sample.count(0) > len(sample) // 3 else sample
    controls = len(body) - len(body.translate(None, _CONTROLS))
    return bool(body) and controls <= len(body) // 100
