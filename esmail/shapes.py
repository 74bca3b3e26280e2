"""Learned shapes (DESIGN §16): for a prefix without a format, a CSV whose header was not seen lately is `new shape`.

The worker keeps, in memory, the header rows each prefix's CSVs had in the
last `[history] keep_days`, and the verdict each feed was last alerted for;
it never waits on a database for them. At start they are seeded from the
history's recent reports (`seed`, the one place that reads them back, in a
thread beside the worker).
"""

from __future__ import annotations

import csv
import json
import time
from typing import TYPE_CHECKING

from esmail.importer import NEW_SHAPE, OK, Header, Report

if TYPE_CHECKING:
    from esmail.history import History

MAX_SHAPES = 20  # header rows remembered per prefix (the oldest forgotten first)
HEADER_LIMIT = 1 << 16  # bytes of a CSV's start read for its header


def header_row(data: bytes) -> list[str]:
    """A CSV's header as names: its first row, with a leading `sep=,` line taken together with the row after it."""
    end = data.find(b"\n")
    if data[:4].lower() == b"sep=" and end >= 0:
        end = data.find(b"\n", end + 1)
    first = data[:min(end if end >= 0 else len(data), HEADER_LIMIT)].decode("utf-8", "replace")  # the CSV may be tens of MB
    return [name for row in csv.reader(first.split("\n")) for name in row]


class Shapes:
    """prefix → the header rows seen, each with when it was last seen."""

    def __init__(self, keep_seconds: float):
        self.keep_seconds = keep_seconds
        self._seen: dict[str, dict[tuple[str, ...], float]] = {}

    def check(self, prefix: str, name: str, data: bytes) -> Report:
        """The learned check of one CSV: `new shape` when its header is not among the prefix's recent ones (the first
        file of a prefix sets the shape); `ok` otherwise, with the usual header beside the one found."""
        found = header_row(data)
        rows = max(data.count(b"\n") - 1, 0)
        seen = self._recent(prefix)
        usual = list(max(seen, key=seen.get)) if seen else found
        verdict = NEW_SHAPE if seen and tuple(found) not in seen else OK
        header = Header(1, usual, found)
        if verdict == NEW_SHAPE:
            position = {column: i for i, column in reversed(list(enumerate(found)))}
            header.missing = [column for column in usual if column not in position]
            header.moved = [{"name": column, "expected": i + 1, "found": position[column] + 1}
                            for i, column in enumerate(usual) if column in position and position[column] != i]
        return Report(name, verdict, rows=rows, header=header)

    def remember(self, prefix: str, header: list[str], when: float | None = None) -> None:
        seen = self._seen.setdefault(prefix, {})
        seen[tuple(header)] = max(seen.get(tuple(header), 0.0), when or time.time())
        if len(seen) > MAX_SHAPES:
            del seen[min(seen, key=seen.get)]

    def _recent(self, prefix: str) -> dict[tuple[str, ...], float]:
        seen = self._seen.get(prefix, {})
        cutoff = time.time() - self.keep_seconds
        for header in [header for header, when in seen.items() if when < cutoff]:
            del seen[header]
        return seen


def seed(history: History, shapes: Shapes, alerted: set[str]) -> None:
    """Fill `shapes` with the headers of the history's recent CSVs, and `alerted` with the feeds whose last
    report was `header changed` or `rejected` (so that a restart does not report them again).

    The one place that reads the reports back; blocking (call it in a thread),
    once at start; a history that cannot be read seeds nothing.
    """
    from datetime import datetime, timedelta, timezone

    from esmail.importer import HEADER_CHANGED, REJECTED

    since = (datetime.now(timezone.utc) - timedelta(seconds=shapes.keep_seconds)).replace(microsecond=0).isoformat()
    last: dict[str, str] = {}
    for row in history.recent_checks(since):
        try:
            report = json.loads(row["check_report"])
            when = datetime.fromisoformat(row["received"]).timestamp()
        except (TypeError, ValueError):
            continue
        last[row["prefix"]] = report.get("verdict", "")
        header = report.get("header") or {}
        if header.get("row") == 1 and header.get("found") and report.get("verdict") in (OK, NEW_SHAPE):
            shapes.remember(row["prefix"], header["found"], when)
    alerted.update(prefix for prefix, verdict in last.items() if verdict in (HEADER_CHANGED, REJECTED))
