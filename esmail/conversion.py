"""What runs in the conversion processes: a raw message → its outputs, or the links to fetch.

Kept apart from the worker so that those processes import the parsers and
nothing else: not aiohttp, boto or rollbar, which would cost each of them
~30 MB for code they never run.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import resource
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from esmail import mail
from esmail.chain import AMR_DATA, UNPROCESSABLE, Output, route
from esmail.keys import unique_names
from esmail.orphans import die_with_parent
from esmail.spool import read_entry

if TYPE_CHECKING:
    from esmail.formats import Format, Unusable
    from esmail.importer import Report

MAX_FILES = 1_000  # attached files in one message
SPILL_OVER = 1 << 20  # bytes of one output past which it leaves the conversion process through a file
_spill_dir: Path | None = None  # set in each conversion process by start_process


@dataclass(frozen=True)
class Converted:
    outputs: list[Output]
    links: list[str]  # to download: found only when the message has no attachments
    inline_images: int  # skipped: signature logos are not data
    summary: dict[str, str] = field(default_factory=dict)  # mail.summary: read here, where the message is parsed anyway
    checks: dict[str, dict[str, Report]] = field(default_factory=dict)  # prefix → CSV name → what the importer makes of it
    attachments: tuple[tuple[str, int], ...] = ()  # the files as the message carried them: (name, bytes), for the page

    def __reduce__(self):
        """Leaving a conversion process, an output over 1 MB goes through a file in the spool's tmp/:
        through the pool's pipe the daemon would hold it twice (the pipe's buffer, then the bytes)."""
        if _spill_dir is None:
            return Converted, (self.outputs, self.links, self.inline_images, self.summary, self.checks, self.attachments)
        outputs = [_spill(out) if len(out.data) > SPILL_OVER else (None, out) for out in self.outputs]
        return _unspill, (outputs, self.links, self.inline_images, self.summary, self.checks, self.attachments)


def _spill(out: Output) -> tuple[str | None, Output]:
    """The output written to a file; if that fails (a full disk), the output as it is, through the pipe."""
    path = None
    try:
        fd, path = tempfile.mkstemp(prefix="output-", dir=_spill_dir)
        with os.fdopen(fd, "wb") as file:
            file.write(out.data)
    except OSError:
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return None, out
    return path, replace(out, data=b"")


def _unspill(outputs: list[tuple[str | None, Output]], links: list[str], inline_images: int, summary: dict[str, str],
             checks: dict, attachments: tuple[tuple[str, int], ...] = ()) -> Converted:
    """In the daemon: each spilled output read back (one copy) and its file removed."""
    taken = []
    for path, out in outputs:
        if path is not None:
            try:
                out = replace(out, data=Path(path).read_bytes())
            finally:
                os.unlink(path)
        taken.append(out)
    return Converted(taken, links, inline_images, summary, checks, attachments)


def convert(raw: bytes, ascii_only: bool = False, link_patterns: tuple[str, ...] = (),
            formats: dict[str, Format | Unusable] | None = None) -> Converted:
    """Every output of one message's attachments, or, with none, the links in its body; each CSV checked
    with the format of each prefix in `formats` (DESIGN §16).

    A message past the MIME limits (parts nested too deep to parse, more than
    MAX_FILES files) is one unprocessable file, `message.eml`, the raw bytes.
    """
    try:
        files, found_links, inline_images, summary = _take_apart(raw, link_patterns)
    except RecursionError:
        return _whole_message(raw, "MIME parts nested too deep to parse")
    if len(files) > MAX_FILES:
        return _whole_message(raw, f"{len(files):,} attached files, over the limit of {MAX_FILES:,}")
    del raw  # not held while the files are converted (convert_entry's caller keeps no copy)
    return replace(convert_files(files, ascii_only, formats, found_links, inline_images), summary=summary,
                   attachments=tuple((name, len(data)) for name, data in files))


def convert_entry(path: Path, ascii_only: bool = False, link_patterns: tuple[str, ...] = (),
                  formats: dict[str, Format | Unusable] | None = None, request=None):
    """`convert` of a spool entry, read here: the conversion process reads the message from
    disk rather than have the daemon send it over a pipe (and hold it meanwhile).
    With an `authentication.Request` (feeds declared) the entry is authenticated first, and the result is
    `authentication.authenticate_and_convert`'s: (Authentication, Converted or None)."""
    if request is not None:
        from esmail.authentication import authenticate_and_convert  # dkimpy, pyspf: only where feeds are declared

        return authenticate_and_convert(path, request, ascii_only, link_patterns, formats)
    return convert(read_entry(path)[1], ascii_only, link_patterns, formats)


def convert_files(files: list[tuple[str, bytes]], ascii_only: bool = False, formats: dict[str, Format | Unusable] | None = None,
                  links: list[str] | None = None, inline_images: int = 0) -> Converted:
    """The outputs of named files (attachments, or downloaded links), each CSV checked with each prefix's format."""
    outputs = route_all(files, ascii_only)
    return Converted(outputs, links or [], inline_images, checks=check_all(outputs, formats or {}))


def check_all(outputs: list[Output], formats: dict[str, Format | Unusable]) -> dict[str, dict[str, Report]]:
    """prefix → CSV name → report; a format shared by several prefixes reads each CSV once."""
    if not formats:
        return {}
    from esmail.importer import FORMAT_UNUSABLE, Report, check  # only where some prefix has a format

    by_format: dict[Format | Unusable, list[str]] = {}
    for prefix, fmt in formats.items():
        by_format.setdefault(fmt, []).append(prefix)
    checks: dict[str, dict[str, Report]] = {prefix: {} for prefix in formats}
    for out in outputs:
        if out.bucket != AMR_DATA:
            continue
        for fmt, prefixes in by_format.items():
            try:
                report = check(out.name, out.data, fmt)
            except Exception as exc:  # a fault of the check itself must not keep the CSV from being stored
                report = Report(out.name, FORMAT_UNUSABLE, reason=f"esmail could not check it ({type(exc).__name__}: {exc}): "
                                                                  "a fault in esmail, please report it")
            for prefix in prefixes:
                checks[prefix][out.name] = report
    return checks


def convert_entries(paths: list[Path], ascii_only: bool = False, link_patterns: tuple[str, ...] = (),
                    formats: list[dict[str, Format | Unusable]] | None = None, requests: list | None = None) -> list:
    """`convert_entry` of several entries in one trip to the pool (small messages: the trip costs more than their
    conversion), each with its prefixes' formats and its authentication request (or None); each result is
    `convert_entry`'s, or the exception it raised."""
    results = []
    for path, each, request in zip(paths, formats or [None] * len(paths), requests or [None] * len(paths)):
        try:
            results.append(convert_entry(path, ascii_only, link_patterns, each, request))
        except Exception as exc:
            try:
                pickle.dumps(exc)
            except Exception:  # it must travel back to the daemon: as its text, then
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            results.append(exc)
    return results


def _take_apart(raw: bytes, link_patterns: tuple[str, ...]) -> tuple[list[tuple[str, bytes]], list[str], int, dict[str, str]]:
    """The attached files, the links (only when there are no files), the count of inline images and mail.summary.
    The parsed message is gone when this returns: its payloads weigh as much as the message."""
    msg = mail.parse(raw)
    found = mail.attachments(msg)
    files = [(att.name, att.data) for att in found if not att.inline_image]
    return files, [] if files else find_links(mail.body_text(msg), link_patterns), len(found) - len(files), mail.summary(msg)


def _whole_message(raw: bytes, reason: str) -> Converted:
    return Converted([Output(UNPROCESSABLE, "message.eml", raw, reason, "message")], [], 0)


def route_all(files: list[tuple[str, bytes]], ascii_only: bool = False) -> list[Output]:
    """Every output of these files, named uniquely per bucket (`export-2.csv` for a repeat)."""
    outputs = [out for name, data in files for out in route(name, data, ascii_only)]
    names = unique_names((out.bucket, out.name) for out in outputs)
    return [replace(out, name=name) for out, (_, name) in zip(outputs, names)]


def find_links(text: str, patterns: tuple[str, ...]) -> list[str]:
    """Every distinct link in `text` that a pattern matches, in order of appearance."""
    found: dict[str, int] = {}
    for pattern in patterns:
        for match in re.finditer(pattern, text):
            found.setdefault(match.group(0), match.start())
    return sorted(found, key=found.__getitem__)


def start_process(memory_limit: int, spill_dir: str | None = None, parent: int = 0) -> None:
    """Set up a conversion process: end with the daemon, cap its address space (a file that makes a reader
    allocate without end kills this process, not the host), and say where big outputs go on their way back."""
    global _spill_dir
    if parent:
        die_with_parent(parent)
    if memory_limit:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    _spill_dir = Path(spill_dir) if spill_dir else None
