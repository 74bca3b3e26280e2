"""The conversion chain (DESIGN §4): one named file → zero or more outputs, each for a bucket.

Pure functions over bytes, no I/O: they run in a process pool, and a file
that cannot be converted comes back as an output for the unprocessable
bucket carrying its original bytes and the reason.
"""

from __future__ import annotations

import io
import logging
import stat
import zipfile
from dataclasses import dataclass
from posixpath import dirname, join

from esmail import spreadsheet
from esmail.errors import Unprocessable
from esmail.keys import extension, safe_path
from esmail.normalise import normalise

log = logging.getLogger(__name__)

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

    @property
    def content_type(self) -> str:
        return "text/csv; charset=utf-8" if self.bucket == AMR_DATA else "application/octet-stream"


def route(name: str, data: bytes, ascii_only: bool = False, depth: int = 1) -> list[Output]:
    """Route one file by its extension; depth 1 is a file attached to the message."""
    ext = extension(name)
    try:
        if ext in (".csv", ".cns"):
            return [Output(AMR_DATA, name, normalise(data, ascii_only))]
        if ext in (".xlsx", ".xls"):
            return [Output(AMR_DATA, name + ".csv", normalise(spreadsheet.to_csv(data, ext), ascii_only))]
        if ext == ".zip":
            return _unzip(name, data, ascii_only, depth)
        raise Unprocessable(f"no conversion for {ext or 'a name without an extension'}")
    except Unprocessable as exc:
        reason = str(exc)
    except Exception as exc:  # a library failing on bad input must not lose the file
        reason = f"conversion failed: {type(exc).__name__}: {exc}"
    log.info("unprocessable %s: %s", name, reason)
    return [Output(UNPROCESSABLE, name, data, reason)]


def _unzip(name: str, data: bytes, ascii_only: bool, depth: int) -> list[Output]:
    """Each entry routed again at the zip's folder; the whole zip is unprocessable if a limit is hit."""
    if depth > MAX_ZIP_DEPTH:
        raise Unprocessable(f"a zip nested {depth} deep (the limit is {MAX_ZIP_DEPTH})")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise Unprocessable(f"not a readable zip: {exc}") from None
    entries = [info for info in archive.infolist() if not info.is_dir()]
    if len(entries) > MAX_ZIP_ENTRIES:
        raise Unprocessable(f"the zip has {len(entries):,} entries (the limit is {MAX_ZIP_ENTRIES:,})")
    folder = dirname(name)
    outputs: list[Output] = []
    total = 0
    for info in entries:
        if stat.S_ISLNK(info.external_attr >> 16):
            raise Unprocessable(f"the zip entry {info.filename!r} is a symbolic link")
        entry = _read_entry(archive, info, MAX_ZIP_TOTAL - total)
        total += len(entry)
        outputs.extend(route(join(folder, safe_path(info.filename)), entry, ascii_only, depth + 1))
    return outputs


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> bytes:
    """An entry's bytes, read in chunks so that a lying header cannot make us hold more than the limits."""
    if info.file_size > budget:
        raise Unprocessable(f"the zip expands to over {MAX_ZIP_TOTAL:,} bytes")
    limit_ratio = MAX_ZIP_RATIO * max(info.compress_size, 1)
    parts, size = [], 0
    try:
        with archive.open(info) as stream:
            while chunk := stream.read(_CHUNK):
                size += len(chunk)
                if size > budget:
                    raise Unprocessable(f"the zip expands to over {MAX_ZIP_TOTAL:,} bytes")
                if size > RATIO_CHECK_FROM and size > limit_ratio:
                    raise Unprocessable(f"the zip entry {info.filename!r} expands over {MAX_ZIP_RATIO}:1 (a zip bomb?)")
                parts.append(chunk)
    except Unprocessable:
        raise
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError, ValueError) as exc:
        # RuntimeError: encrypted; NotImplementedError: unknown compression; BadZipFile: CRC
        raise Unprocessable(f"cannot read the zip entry {info.filename!r}: {exc}") from None
    return b"".join(parts)
