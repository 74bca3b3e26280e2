"""Object keys (DESIGN §2, §3): prefixes, safe names, received-time folders, `-2` suffixes.

Keys are a contract with the downstream importer, and they are the one place
where sender-chosen text (addresses, file names, zip entry paths) becomes a
storage path, so every such string passes through here.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from typing import Iterable

_LOCAL_PART = re.compile(r"[a-z0-9._+-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_SEGMENT = 200  # bytes kept of one path segment; S3 allows 1,024 for a whole key


def prefix_of(address: str) -> str | None:
    """The feed prefix of an address (its local part, lower-cased), or None when it is not safe."""
    local, at, _domain = address.strip().strip("<>").rpartition("@")
    local = (local if at else address.strip().strip("<>")).lower()
    if not _LOCAL_PART.fullmatch(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        return None
    return local


def domain_of(address: str) -> str:
    return address.strip().strip("<>").rpartition("@")[2].lower().rstrip(".")


def safe_path(name: str) -> str:
    """A sender's file name or zip entry path as a relative key path that stays inside its folder."""
    name = unicodedata.normalize("NFC", name.replace("\\", "/"))
    segments = []
    for segment in name.split("/"):
        segment = _CONTROL.sub("", segment).strip()
        if segment in ("", ".", ".."):
            continue
        segments.append(_truncate(segment))
    return "/".join(segments) or "unnamed"


def _truncate(segment: str) -> str:
    """Keep a segment under MAX_SEGMENT bytes of UTF-8, keeping its extension."""
    if len(segment.encode()) <= MAX_SEGMENT:
        return segment
    stem, dot, ext = segment.rpartition(".")
    ext = dot + ext if dot and len(ext) <= 10 else ""
    stem = segment[: len(segment) - len(ext)]
    while len((stem + ext).encode()) > MAX_SEGMENT:
        stem = stem[:-1]
    return stem + ext


def extension(name: str) -> str:
    """The last extension of the last path segment, lower-cased: `"A/Export.XLSX"` → `".xlsx"`."""
    last = name.rsplit("/", 1)[-1]
    stem, dot, ext = last.rpartition(".")
    return "." + ext.lower() if dot and stem else ""


def with_suffix(name: str, n: int) -> str:
    """`n`-th variant of a name: `-n` before the first extension of its last segment (`export-2.xlsx.csv`)."""
    if n < 2:
        return name
    head, slash, last = name.rpartition("/")
    first_dot = last.find(".", 1)
    stem, ext = (last, "") if first_dot < 0 else (last[:first_dot], last[first_dot:])
    return f"{head}{slash}{stem}-{n}{ext}"


def folder_name(received: datetime, n: int = 1) -> str:
    """`YYYYmmdd-HHMMSS`, or `YYYYmmdd-HHMMSS-n` for the n-th message of a prefix in that second."""
    return numbered_folder(received.strftime("%Y%m%d-%H%M%S"), n)


def numbered_folder(second: str, n: int) -> str:
    """The folder of a prefix's n-th message in a second already named (`folder_name`)."""
    return second if n < 2 else f"{second}-{n}"


def unique_names(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(bucket, name) pairs with repeats renamed `-2`, `-3`, … in order, so no two share a key."""
    taken: set[tuple[str, str]] = set()
    result = []
    for bucket, name in items:
        n, candidate = 1, name
        while (bucket, candidate) in taken:
            n += 1
            candidate = with_suffix(name, n)
        taken.add((bucket, candidate))
        result.append((bucket, candidate))
    return result
