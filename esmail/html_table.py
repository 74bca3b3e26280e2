"""An HTML table (what many web portals send as `.xls`) → CSV by the string rules of DESIGN §5.

The first `<table>` in the document, row by row: every non-empty cell is a
quoted string, an empty cell an empty field, and a cell spanning columns
is written in its first column with empty fields after it, as a merged
spreadsheet cell is. Text inside a nested table joins its outer cell.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from esmail.errors import Unprocessable
from esmail.normalise import to_utf8

_SPACE = re.compile(r"\s+")
MAX_SPAN = 1_000
MAX_CELLS = 2_000_000


def to_csv(data: bytes) -> bytes:
    parser = _FirstTable()
    parser.feed(to_utf8(data).decode("utf-8", "replace"))
    parser.close()
    if not parser.found:
        raise Unprocessable("an HTML file with no <table>")
    rows = parser.rows
    width = max(map(len, rows), default=0)
    if width * len(rows) > MAX_CELLS:
        raise Unprocessable(f"the HTML table is {len(rows)} rows × {width} columns, over the limit of {MAX_CELLS:,} cells")
    return "".join(",".join(row + [""] * (width - len(row))) + "\n" for row in rows).encode("utf-8")


class _FirstTable(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found = False
        self.done = False
        self.depth = 0  # of <table> elements, once inside the first
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None  # text of the open cell
        self.span = 1

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.done:
            return
        if tag == "table":
            self.found = True
            self.depth += 1
        elif self.depth == 1 and tag == "tr":
            self._end_cell()
            self.rows.append([])
        elif self.depth == 1 and tag in ("td", "th"):
            self._end_cell()
            if not self.rows:
                self.rows.append([])
            self.cell = []
            span = dict(attrs).get("colspan") or "1"
            self.span = min(int(span), MAX_SPAN) if span.strip().isdigit() and int(span) > 0 else 1
        elif self.cell is not None and tag == "br":
            self.cell.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.done or not self.depth:
            return
        if tag == "table":
            self.depth -= 1
            if not self.depth:
                self._end_cell()
                self.done = True
        elif self.depth == 1 and tag in ("td", "th", "tr"):
            self._end_cell()

    def handle_data(self, data: str) -> None:
        if self.cell is not None and not self.done:
            self.cell.append(data)

    def _end_cell(self) -> None:
        if self.cell is None:
            return
        text = "\n".join(_SPACE.sub(" ", line).strip() for line in "".join(self.cell).split("\n")).strip()
        self.rows[-1].append('"' + text.replace('"', '""') + '"' if text else "")
        self.rows[-1].extend([""] * (self.span - 1))
        self.cell = None
