"""The conversion chain (DESIGN §4): one named file → zero or more outputs, each for a bucket.

What a file is comes from `kinds` (its bytes, then its name); containers
(zip, TNEF) are opened and their files routed again.

Pure functions over bytes, no I/O: they run in a process pool, and a file
that cannot be converted comes back as an output for the unprocessable
bucket carrying its original bytes and the reason.
"""

from __future__ import annotations

import io
import stat
import zipfile
from dataclasses import dataclass
from posixpath import dirname, join

from esmail.errors import Unprocessable
from esmail.keys import extension, safe_path
from esmail.kinds import HTML, SPREADSHEETS, TEXT, TNEF, ZIP, identify
from esmail.normalise import normalise


AMR_DATA = "amr_data"
UNPROCESSABLE = "unprocessable"
INBOX = "inbox"

MAX_ZIP_DEPTH = 3
MAX_ZIP_ENTRIES = 1_000
MAX_ZIP_TOTAL = 200_000_000
MAX_ZIP_RATIO = 100
RATIO_CHECK_FROM = 1_000_000
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Output:
    """One file for one bucket; `name` is its path under the message's key folder."""

    bucket: str
    name: str
    data: bytes
    reason: str | None = None  # why it is unprocessable
    rule: str = ""  # which routing rule decided (kinds.identify), for the log
    kind: str = ""  # what the file was found to be (kinds: text, xlsx, zip, …); "" when nothing esmail converts

    @property
    def content_type(self) -> str:
        return "text/csv; charset=utf-8" if self.bucket == AMR_DATA else "application/octet-stream"


class _Budget:
    """What one attached file may expand to, counted across every archive nested in it (the 42.zip shape)."""

    def __init__(self) -> None:
        self.files = MAX_ZIP_ENTRIES
        self.bytes = MAX_ZIP_TOTAL

    def take_files(self, n: int) -> None:
        self.files -= n
        if self.files < 0:
            raise _OverBudget(f"over {MAX_ZIP_ENTRIES:,} files inside, nested archives included")

    def take_bytes(self, n: int) -> None:
        self.bytes -= n
        if self.bytes < 0:
            raise _OverBudget(f"expands to over {MAX_ZIP_TOTAL:,} bytes, nested archives included")


class _OverBudget(Unprocessable):
    """A limit of a whole attached file: that file, not the archive deep inside it, goes to unprocessable."""


def route(name: str, data: bytes, ascii_only: bool = False, depth: int = 1, budget: _Budget | None = None) -> list[Output]:
    """Route one file by what it is (kinds.identify); depth 1 is a file attached to the message."""
    budget = budget or _Budget()
    kind, rule = identify(name, data)
    try:
        if kind == TEXT:
            csv_name = name if extension(name) in (".csv", ".cns") else name + ".csv"
            return [Output(AMR_DATA, csv_name, normalise(data, ascii_only), rule=rule, kind=kind)]
        if kind in SPREADSHEETS:
            from esmail import spreadsheet  # the readers are imported by the first file that needs them

            return [Output(AMR_DATA, _csv_name(name), normalise(spreadsheet.to_csv(data, kind), ascii_only), rule=rule, kind=kind)]
        if kind == HTML:
            from esmail import html_table

            return [Output(AMR_DATA, _csv_name(name), normalise(html_table.to_csv(data), ascii_only), rule=rule, kind=kind)]
        if kind == ZIP:
            return _unzip(name, data, ascii_only, depth, budget)
        if kind == TNEF:
            return _untnef(name, data, ascii_only, depth, budget)
        raise Unprocessable(rule)
    except _OverBudget as exc:
        if depth > 1:
            raise
        reason = str(exc)
    except Unprocessable as exc:
        reason = str(exc)
    except Exception as exc:  # a library failing on bad input must not lose the file
        reason = f"conversion failed: {type(exc).__name__}: {exc}"
    return [Output(UNPROCESSABLE, name, data, reason, rule, kind or "")]


def _csv_name(name: str) -> str:
    """A spreadsheet's CSV is named `export.xlsx.csv` (DESIGN §3); a workbook named `.csv` keeps its name."""
    return name if extension(name) == ".csv" else name + ".csv"


def _untnef(name: str, data: bytes, ascii_only: bool, depth: int, budget: _Budget) -> list[Output]:
    """Outlook's winmail.dat: each file inside routed again, at the message's folder like a zip's entries."""
    if depth > MAX_ZIP_DEPTH:
        raise Unprocessable(f"a TNEF file nested {depth} deep (the limit is {MAX_ZIP_DEPTH})")
    from tnefparse import TNEF

    wrapped = TNEF(data, do_checksum=False)
    files = [att for att in wrapped.attachments if att.data]
    if not files:
        raise Unprocessable("a TNEF (winmail.dat) file with no attachments")
    budget.take_files(len(files))
    budget.take_bytes(sum(len(att.data) for att in files))
    folder = dirname(name)
    return [out for att in files
            for out in route(join(folder, safe_path(att.long_filename() or "attachment")), att.data, ascii_only, depth + 1, budget)]


def _unzip(name: str, data: bytes, ascii_only: bool, depth: int, budget: _Budget) -> list[Output]:
    """Each entry routed again at the zip's folder; the whole zip is unprocessable if a limit is hit."""
    if depth > MAX_ZIP_DEPTH:
        raise Unprocessable(f"a zip nested {depth} deep (the limit is {MAX_ZIP_DEPTH})")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise Unprocessable(f"not a readable zip: {exc}") from None
    entries = [info for info in archive.infolist() if not info.is_dir()]
    budget.take_files(len(entries))
    folder = dirname(name)
    outputs: list[Output] = []
    for info in entries:
        if stat.S_ISLNK(info.external_attr >> 16):
            raise Unprocessable(f"the zip entry {info.filename!r} is a symbolic link")
        entry = _read_entry(archive, info, budget)
        outputs.extend(route(join(folder, safe_path(info.filename)), entry, ascii_only, depth + 1, budget))
    return outputs


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _Budget) -> bytes:
    """An entry's bytes, read in chunks so that a lying header cannot make us hold more than the limits."""
    if info.file_size > budget.bytes:  # the header admits it already
        budget.take_bytes(info.file_size)
    limit_ratio = MAX_ZIP_RATIO * max(info.compress_size, 1)
    parts, size = [], 0
    try:
        with archive.open(info) as stream:
            while chunk := stream.read(_CHUNK):
                size += len(chunk)
                budget.take_bytes(len(chunk))
                if size > RATIO_CHECK_FROM and size > limit_ratio:
                    raise Unprocessable(f"the zip entry {info.filename!r} expands over {MAX_ZIP_RATIO}:1 (a zip bomb?)")
                parts.append(chunk)
    except Unprocessable:
        raise
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError, ValueError) as exc:
        # RuntimeError: encrypted; NotImplementedError: unknown compression; BadZipFile: CRC
        raise Unprocessable(f"cannot read the zip entry {info.filename!r}: {exc}") from None
    return b"".join(parts)
