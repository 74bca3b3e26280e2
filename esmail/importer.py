"""What the importer will make of a CSV (DESIGN §16): its rules, applied to the bytes esmail stores, as one report.

The overnight importer (Energy Sparks' DataFileParser → DataFeedValidator →
DataFeedTranslator → SingleReadConverter → AmrReadingData) reads each CSV by
the column positions `header_example` gives and never looks at the file's
own header. `check` runs the same steps — Ruby's CSV, the header rows, the
filters, the per-row warnings, row-per-reading meter-days, Ruby's dates —
and adds the comparison the importer lacks: the file's header against
`header_example`, naming each read column that moved or went missing.

Where the importer drops rows silently, the report counts them as the
warning that says why they do not import: a row-per-day row with more blank
half hours than missing_readings_limit, and a row-per-reading meter-day with
more empty slots than it, are `missing_readings`; a reading overwritten by a
later one for the same slot is `duplicate_reading`. A blank date is
`missing_reading_date` alone (the importer adds `invalid_reading_date`: §16
says one warning per cause). What needs the importer's database (a serial
number's meter, kWh conversion) or its rarer switches (delayed_reading,
handle_off_by_one, status columns) is not judged.

It runs in the conversion process on every CSV bound for amr-data, so the
hot path splits a row only as far as it must (up to its readings, when they
are the last columns read), looks each distinct date up once, and checks the
48 readings of a row with string operations rather than a loop over cells.
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from typing import Iterator

from esmail import rubydate
from esmail.formats import HALF_HOURS, Format, Unusable

OK, WARNINGS, REJECTED, HEADER_CHANGED, FORMAT_UNUSABLE, NEW_SHAPE = "ok", "warnings", "rejected", "header changed", "format unusable", "new shape"
WOULD_NOT_IMPORT = (REJECTED, HEADER_CHANGED, FORMAT_UNUSABLE)
NO_VALID_READINGS = "No valid readings in file"  # the importer's own words
EXAMPLES = 10
EXAMPLE_TEXT = 300  # characters of a row kept in an example

# The importer's warnings (AmrReadingData::WARNINGS), and esmail's own about the header row
MISSING_READINGS, MISSING_MPAN, NON_NUMERIC_MPAN = "missing_readings", "missing_mpan_mprn", "invalid_non_numeric_mpan_mprn"
MISSING_DATE, INVALID_DATE, FUTURE_DATE, DUPLICATE = "missing_reading_date", "invalid_reading_date", "future_reading_date", "duplicate_reading"
HEADER_ROW_MOVED = "header_row_moved"
_BITS = (MISSING_READINGS, MISSING_MPAN, NON_NUMERIC_MPAN, MISSING_DATE, INVALID_DATE, FUTURE_DATE, DUPLICATE)
_READINGS, _MPAN, _NON_NUMERIC, _NO_DATE, _BAD_DATE, _FUTURE, _DUP = (1 << i for i in range(len(_BITS)))
DATE_FORMAT_DIFFERS = "date_format_differs"


@dataclass
class Header:
    """The file's header against `header_example` (columns 1-based)."""

    row: int | None  # where the header was found; None: no row looks like it
    expected: list[str]
    found: list[str]
    moved: list[dict] = field(default_factory=list)  # {"name", "expected", "found"}: a read column at another position
    missing: list[str] = field(default_factory=list)  # read columns the header does not have


@dataclass
class Example:
    line: int
    warnings: list[str]
    text: str


@dataclass
class Report:
    """What the importer will make of one CSV (§16's fields; `reason` says why it is rejected or unusable)."""

    name: str
    verdict: str
    reason: str = ""
    rows: int = 0  # data rows after the header rows, the empty and single-field rows and the filtered ones
    filtered: int = 0  # rows column_row_filters or expected_units removed
    valid_rows: int = 0
    days: int = 0  # meter-days that import
    meters: int = 0
    first_date: str | None = None
    last_date: str | None = None
    warnings: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    header: Header | None = None
    examples: list[Example] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        header = Header(**data["header"]) if data.get("header") else None
        return cls(**{**data, "header": header, "examples": [Example(**e) for e in data.get("examples", [])]})

    @property
    def would_import(self) -> bool:
        return self.verdict not in WOULD_NOT_IMPORT

    def header_changes(self) -> str:
        """The read columns that moved or went missing, for people ("" when none did)."""
        if self.header is None:
            return ""
        parts = [f"{m['name']} moved from column {m['expected']} to {m['found']}" for m in self.header.moved[:3]]
        if len(self.header.moved) > 3:
            parts.append(f"{len(self.header.moved) - 3} more read columns moved")
        if self.header.missing:
            parts.append("missing " + ", ".join(self.header.missing[:5]) + (", …" if len(self.header.missing) > 5 else ""))
        return "; ".join(parts)

    def summary(self) -> str:
        """One line for people: the verdict's cause first, then what imports."""
        parts = [self.reason] if self.reason else []
        if self.verdict == NEW_SHAPE and self.header is not None:
            parts.append(f"header {','.join(self.header.found)!r}, usually {','.join(self.header.expected)!r}")
        elif self.header_changes():
            parts.append(self.header_changes())
        if self.verdict != NEW_SHAPE and self.verdict != FORMAT_UNUSABLE:
            dates = f", {self.first_date} to {self.last_date}" if self.first_date else ""
            filtered = f", {self.filtered} more filtered out" if self.filtered else ""
            parts.append(f"{self.valid_rows} of {self.rows} rows import ({self.days} meter-days, {self.meters} meters{dates}){filtered}")
        if self.warnings:
            parts.append("warnings: " + ", ".join(f"{name} {n}" for name, n in self.warnings.items()))
        return "; ".join(parts)


class Malformed(Exception):
    """What Ruby's CSV refuses (the importer's "Unable to parse the file")."""


class Stop(Exception):
    """What stops the importer on a whole file (row per reading: a date or time it cannot read)."""


# --- the check -----------------------------------------------------------------------------------------------------

def check(name: str, data: bytes, fmt: Format | Unusable, today: date | None = None) -> Report:
    """The report of one CSV (esmail's normalised UTF-8) read with `fmt`, as the importer would on `today` (UTC)."""
    if isinstance(fmt, Unusable):
        return Report(name, FORMAT_UNUSABLE, reason=fmt.reason)
    today = today or rubydate.today_utc()
    lines = data.decode("utf-8", "replace").split("\n")
    if lines[-1] == "":
        lines.pop()
    layout = _Layout(fmt)
    report = Report(name, OK)
    reader = _Reader(lines, fmt.column_separator, layout.split, fmt.number_of_header_rows + 2)
    rows = _data_rows(reader, fmt, layout, report)
    try:
        if fmt.row_per_reading:
            _row_per_reading(rows, fmt, layout, report, lines, today)
        else:
            try:
                _row_per_day(rows, fmt, layout, report, lines, today)
            except _Repeats:
                report = Report(name, OK)
                reader = _Reader(lines, fmt.column_separator, layout.split, fmt.number_of_header_rows + 2)
                _row_per_day(_data_rows(reader, fmt, layout, report), fmt, layout, report, lines, today, exact=True)
    except Malformed as exc:
        report.reason = f"Unable to parse the file ({exc})"
    except Stop as exc:
        report.reason = str(exc)
        report.rows += _remaining(rows)  # the importer stopped; the file still has them
        report.valid_rows = report.days = report.meters = 0
        report.first_date = report.last_date = None
        report.warnings.clear()
        report.examples.clear()
    report.header = _header(reader.first, fmt, layout, report)
    report.verdict = _verdict(report)
    return report


def _remaining(rows: Iterator) -> int:
    """How many rows are left (up to a row Ruby's CSV would refuse)."""
    count = 0
    try:
        for _ in rows:
            count += 1
    except Malformed:
        pass
    return count


def _verdict(report: Report) -> str:
    if report.header is not None and (report.header.moved or report.header.missing):
        return HEADER_CHANGED
    if report.reason or not report.valid_rows:
        report.reason = report.reason or NO_VALID_READINGS
        return REJECTED
    return WARNINGS if report.warnings else OK


class _Layout:
    """Where the importer reads each field: indices into `header_example.split(",")`, as `find_index` gives them."""

    def __init__(self, fmt: Format):
        columns = fmt.columns
        self.columns = columns
        index = {}
        for i, name in enumerate(columns):
            index.setdefault(name, i)
        self.meter = index[fmt.meter_field]
        self.date = index[fmt.reading_date_field]
        self.period = index[fmt.period_field] if fmt.positional_index and fmt.period_field else None
        self.time = index[fmt.reading_time_field] if fmt.row_per_reading and fmt.reading_time_field else None
        self.units = index[fmt.units_field] if fmt.units_field else None
        self.readings = [index[name] for name in fmt.reading_fields]
        first = self.readings[0]
        self.span = (first, first + len(self.readings)) if self.readings == list(range(first, first + len(self.readings))) else None
        self.filters = [(index[column], re.compile(pattern, re.M)) for column, pattern in fmt.column_row_filters]
        used = [self.meter, self.date, *self.readings, *(i for i, _ in self.filters)]
        used += [i for i in (self.period, self.time, self.units) if i is not None]
        self.width = max(used) + 1
        # A row is split only this deep, the rest left in one piece: past the last column read, or, when the
        # readings are the last columns read, before them (their 48 values are then checked as one string).
        self.cut = self.span[0] if self.span and max(i for i in used if i < self.span[0] or i >= self.span[1]) < self.span[0] else None
        self.split = self.cut if self.cut is not None else self.width


class _Reader:
    """Rows of a CSV as Ruby's CSV parses them: (first line number, fields); Malformed where it raises.

    A row is split `depth` fields deep, its remainder (if any) as one last
    piece: a line without quotes in C (`str.split`), a row with quotes by the
    csv module once it has passed Ruby's rules. The first `keep` rows are read
    whole first (`read_head`), for the header rows and the header check.
    """

    def __init__(self, lines: list[str], sep: str, depth: int, keep: int):
        self.lines, self.sep, self.depth, self.keep = lines, sep, depth, keep
        self.first: list[tuple[int, list[str]]] = []  # (line number, every field) of the first `keep` rows
        self.ends: list[int] = []  # the line index after each of them
        field_ = rf'"(?:[^"]|"")*"|(?:(?!{re.escape(sep)})[^"])*'
        self._strict = re.compile(rf"(?:{field_})(?:{re.escape(sep)}(?:{field_}))*")
        self._head = _quoted_head(sep, depth)

    def read_head(self) -> list[tuple[int, list[str]]]:
        i = 0
        while i < len(self.lines) and len(self.first) < self.keep:
            number, i, fields = self._row(i)
            self.first.append((number, fields))
            self.ends.append(i)
        return self.first

    def row(self, i: int) -> tuple[int, int, list[str]]:
        """The row starting at line index i, split `depth` deep: (its line number, the next index, its fields).

        The usual quoted line (a spreadsheet's text cells: `"2200013680374",2026-11-01,1.5,…`) has its quotes
        in the fields before the rest: those are read by one match, and the rest, without quotes, is kept whole.
        """
        line = self.lines[i]
        match = self._head.match(line)
        if match is not None and '"' not in line[match.end():]:
            groups = match.groups()
            fields = [plain if quoted is None else quoted.replace('""', '"') for quoted, plain in zip(groups[::2], groups[1::2])]
            return i + 1, i + 1, fields + [line[match.end():]]
        number, after, fields = self._row(i)
        if len(fields) > self.depth + 1:
            fields = fields[:self.depth] + [self.sep.join(fields[self.depth:])]
        return number, after, fields

    def _row(self, i: int) -> tuple[int, int, list[str]]:
        """The whole row starting at line index i: (its line number, the next index, all its fields)."""
        line = self.lines[i]
        if '"' not in line:
            return i + 1, i + 1, line.split(self.sep) if line else []
        parts, quotes, j = [line], line.count('"'), i + 1
        while quotes % 2 and j < len(self.lines):  # a quoted field goes on to the next line
            parts.append(self.lines[j])
            quotes += self.lines[j].count('"')
            j += 1
        text = "\n".join(parts)
        if not self._strict.fullmatch(text):
            raise Malformed(_ruby_csv_error(text, self.sep, i + 1))
        if len(self.sep) == 1:
            return i + 1, j, next(csv.reader([text], delimiter=self.sep, quotechar='"', strict=True))
        return i + 1, j, [f[1:-1].replace('""', '"') if f.startswith('"') else f for f in _split_quoted(text, self.sep)]


@functools.lru_cache(maxsize=32)
def _quoted_head(sep: str, depth: int) -> re.Pattern:
    """The first `depth` fields of a line, each with its separator: quoted as Ruby's CSV allows (group 1), or plain (2)."""
    plain = f'[^"{re.escape(sep)}]*' if len(sep) == 1 else f'(?:(?!{re.escape(sep)})[^"])*'
    return re.compile(f'(?:"((?:[^"]|"")*)"|({plain})){re.escape(sep)}' * depth)


def _split_quoted(text: str, sep: str) -> list[str]:
    """Fields of a valid line with a separator of several characters (rare: the csv module takes one)."""
    fields, current, quoted = [], [], False
    i = 0
    while i < len(text):
        if text[i] == '"':
            quoted = not quoted
        if not quoted and text.startswith(sep, i):
            fields.append("".join(current))
            current, i = [], i + len(sep)
            continue
        current.append(text[i])
        i += 1
    fields.append("".join(current))
    return fields


def _ruby_csv_error(text: str, sep: str, line: int) -> str:
    """Ruby CSV's message for the first fault in a row that breaks its quoting rules."""
    i = 0
    while i <= len(text):
        if text.startswith('"', i):  # a quoted field
            j = i + 1
            while True:
                j = text.find('"', j)
                if j < 0:
                    return f"Unclosed quoted field in line {line}."
                if text.startswith('""', j):
                    j += 2
                    continue
                break
            after = j + 1
            if after < len(text) and not text.startswith(sep, after):
                return f"Any value after quoted field isn't allowed in line {line + text.count(chr(10), 0, after)}."
            i = after + len(sep)
        else:
            end = text.find(sep, i)
            end = len(text) if end < 0 else end
            if '"' in text[i:end]:
                return f"Illegal quoting in line {line + text.count(chr(10), 0, i)}."
            i = end + len(sep)
    return f"Illegal quoting in line {line}."


def _data_rows(reader: _Reader, fmt: Format, layout: _Layout, report: Report) -> Iterator[tuple[int, list[str]]]:
    """Step 1: the header rows skipped, empty and single-field rows dropped, filtered rows counted; the rest.

    One loop over the lines, splitting each as it goes (the hot path: no
    generator in between)."""
    first = reader.read_head()
    skip = fmt.number_of_header_rows
    if skip > len(first):
        if first:  # the importer: an empty file is simply empty
            raise Stop(f"Expected {skip} header rows but file has only {len(first)}.")
        return
    if skip:
        start = reader.ends[skip - 1]
    else:
        start = reader.ends[0] if first and ",".join(first[0][1]) == fmt.header_example else 0
    lines, sep, depth = reader.lines, reader.sep, reader.depth
    filters, units = layout.filters, layout.units
    expected_units = fmt.expected_units if fmt.expected_units and fmt.expected_units.strip() else None
    resume = start
    for i, line in enumerate(itertools.islice(lines, start, None), start):
        if i < resume or not line:
            continue  # within a quoted field's row, or empty
        if '"' in line:
            number, resume, fields = reader.row(i)
        else:
            number, fields = i + 1, line.split(sep, depth)
        n = len(fields)
        if n - fields.count("") <= 2 and _one_field(fields, depth, sep):
            continue
        if filters and any(col >= n or not fields[col] or rx.search(fields[col]) for col, rx in filters):
            report.filtered += 1
            continue
        if expected_units is not None and (fields[units] if units < n else None) != expected_units:
            report.filtered += 1
            continue
        yield number, fields


def _one_field(fields: list[str], depth: int, sep: str) -> bool:
    """Ruby's `row.one?` (exactly one non-empty field), for a row split `depth` deep (its last piece the rest)."""
    pieces = fields if len(fields) <= depth else fields[:depth] + fields[depth].split(sep)
    return len(pieces) - pieces.count("") == 1


# --- row per day -----------------------------------------------------------------------------------------------------

class _Repeats(Exception):
    """A meter and date seen twice: the file needs the exact (slower) pass, which keeps every row."""


def _row_per_day(rows, fmt: Format, layout: _Layout, report: Report, lines: list[str], today: date, exact: bool = False) -> None:
    """Steps 2 and 4 for a row per meter and day: every warning of AmrReadingData, then what imports.

    The usual file has each meter and date once, and is counted as it is read;
    the first repeat raises _Repeats, and `exact` then keeps every row, for
    the importer's `uniq` and `duplicate_reading`, which look at later rows.
    """
    meter_i, date_i, units_i, sep = layout.meter, layout.date, layout.units, fmt.column_separator
    cut, span, reading_is = layout.cut, layout.span, layout.readings
    pair, dash = sep + sep, sep + "-" + sep
    numeric = not fmt.lookup_by_serial_number
    limit, merging = fmt.missing_readings_limit, fmt.allow_merging
    dates = _Dates(fmt.date_format, today)
    cache, today_ord = dates.cache, today.toordinal()
    records = []  # exact: (line, meter, date text, identity of what it imports, warning bits, date ordinal)
    keys: set[tuple[str, str]] = set()
    warned: list[tuple[int, int]] = []  # (line, warning bits)
    meters: set[str] = set()
    valid = low = high = differs = 0
    for line, fields in rows:
        n = len(fields)
        meter = fields[meter_i].strip() if meter_i < n else ""
        day = fields[date_i].strip() if date_i < n else ""
        bits = 0
        if cut is not None:  # the readings are the rest of the line: 48 values are 47 separators, none doubled
            text = fields[cut] if n > cut else ""
            if text.count(sep) != HALF_HOURS - 1:
                values = text.split(sep, HALF_HOURS)[:HALF_HOURS] if n > cut else []
                text = sep.join(values)
                bits = _gaps(values, limit, merging)
            elif pair in text or text[:1] == sep or text[-1:] == sep or " " in text or "\t" in text or "-" in text and _dashes(text, sep, dash):
                bits = _gaps(text.split(sep), limit, merging)
        else:
            values = fields[span[0]:span[1]] if span and n >= span[1] else [fields[i] if i < n else None for i in reading_is]
            text = sep.join(v or "" for v in values)
            if None in values or "" in values or "-" in values or " " in text or "\t" in text:
                bits = _gaps(values, limit, merging)
        if not meter:
            bits |= _MPAN
        elif numeric and not (meter.isdigit() and meter.isascii()):
            bits |= _NON_NUMERIC
        ordinal = 0
        if not day:
            bits |= _NO_DATE
        else:
            ordinal = cache.get(day)
            if ordinal is None:
                ordinal = dates.read(day)
            if ordinal < 0:
                ordinal = -ordinal
                differs += 1
            if ordinal == 0:
                bits |= _BAD_DATE
            elif ordinal > today_ord:
                bits |= _FUTURE
        if exact:
            units = fields[units_i] if units_i is not None and units_i < n else None
            records.append((line, meter, day, hash((meter, day, units, text)), bits, ordinal))
            continue
        if meter and day:
            seen = len(keys)
            keys.add((meter, day))
            if len(keys) == seen:
                raise _Repeats
        if bits:
            warned.append((line, bits))
            continue
        valid += 1
        meters.add(meter)
        if ordinal > high:
            high = ordinal
        if not low or ordinal < low:
            low = ordinal
    if exact:
        _duplicates(records)
        kept = [record for record in records if not record[4]]
        valid, meters = len(kept), {record[1] for record in kept}
        keys = {(record[1], record[5]) for record in kept}
        low, high = min((r[5] for r in kept), default=0), max((r[5] for r in kept), default=0)
        warned = [(record[0], record[4]) for record in records if record[4]]
    report.rows = len(records) if exact else valid + len(warned)
    report.valid_rows, report.meters, report.days = valid, len(meters), len(keys) if exact else valid
    if valid:
        report.first_date, report.last_date = date.fromordinal(low).isoformat(), date.fromordinal(high).isoformat()
    _tally_warnings(report, warned, lines)
    if differs:
        report.notes[DATE_FORMAT_DIFFERS] = differs


def _dashes(text: str, sep: str, dash: str) -> bool:
    """Whether one of the values joined in `text` is exactly `-` (the importer's "no reading")."""
    return text == "-" or text.startswith("-" + sep) or text.endswith(sep + "-") or dash in text


def _gaps(values: list[str | None], limit: int | None, merging: bool) -> int:
    """The missing_readings bit of a row's readings (None: the row is too short to have it).

    The importer's validator drops a row with more than missing_readings_limit
    blanks (or too short), when that is set; AmrReadingData then warns on any
    row with fewer than 48 present (not blank, not `-`), unless allow_merging.
    """
    present = sum(1 for v in values if v is not None and v.strip() and v != "-")
    if limit is not None and (len(values) < HALF_HOURS or None in values or sum(1 for v in values if not (v or "").strip()) > limit):
        return _READINGS
    return 0 if merging or present >= HALF_HOURS else _READINGS


def _duplicates(records: list) -> None:
    """`duplicate_reading`: a row with a later one for the same meter and date (the last wins), counted after
    identical rows are merged (the importer's `uniq`); an identical repeat shares its first's fate."""
    identities = {record[3] for record in records}
    if len(identities) == len(records) and len({(r[1], r[2]) for r in records}) == len(records):
        return  # the usual file: nothing repeats
    first: dict[int, int] = {}
    for i in range(len(records) - 1, -1, -1):
        first[records[i][3]] = i
    later: set[tuple[str, str]] = set()
    for i in range(len(records) - 1, -1, -1):
        line, meter, day, identity, bits, ordinal = records[i]
        if first[identity] != i or not (meter and day):
            continue
        if (meter, day) in later:
            records[i] = (line, meter, day, identity, bits | _DUP, ordinal)
        else:
            later.add((meter, day))
    for i, record in enumerate(records):
        j = first[record[3]]
        if j != i and records[j][4] != record[4]:
            records[i] = (*record[:4], records[j][4], record[5])


def _tally_warnings(report: Report, warned: list[tuple[int, int]], lines: list[str]) -> None:
    """Each warning's count, and the first rows that have them as examples; `warned` is (line, bits), in line order."""
    counts = [0] * len(_BITS)
    for line, bits in warned:
        for k in range(len(_BITS)):
            counts[k] += bits >> k & 1
        if len(report.examples) < EXAMPLES:
            report.examples.append(Example(line, [name for k, name in enumerate(_BITS) if bits >> k & 1], lines[line - 1][:EXAMPLE_TEXT]))
    report.warnings.update({name: n for name, n in zip(_BITS, counts) if n})


class _Dates:
    """Reading dates as AmrReadingData reads them: `Date.strptime` with date_format, else `Date.parse`.

    `cache` maps each distinct text to its ordinal: positive when the format
    read it, negative when only the fallback did, 0 when neither.
    """

    def __init__(self, date_format: str, today: date):
        self.strptime = rubydate.strptime(date_format)
        self.today = today
        self.cache: dict[str, int] = {}

    def read(self, text: str) -> int:
        found = self.strptime.date(text, self.today)
        if found is not None:
            ordinal = found.toordinal()
        else:
            parsed = rubydate.parse(text, self.today)
            ordinal = -parsed.day.toordinal() if parsed is not None else 0
        self.cache[text] = ordinal
        return ordinal


# --- row per reading -------------------------------------------------------------------------------------------------

_TIME = re.compile(r"([0-1]?[0-9]|2[0-3]):([0-5][0-9])(?::00)?")
_RUBY_INT = re.compile(r"\s*([+-]?\d+)")


def _row_per_reading(rows, fmt: Format, layout: _Layout, report: Report, lines: list[str], today: date) -> None:
    """Step 3: readings gathered into meter-days of 48 half hours (SingleReadConverter), then step 2's warnings per day."""
    meter_i, date_i, period_i, time_i = layout.meter, layout.date, layout.period, layout.time
    by_period = fmt.positional_index and fmt.period_field
    by_time = fmt.positional_index and not by_period and fmt.reading_time_field
    at_start = not fmt.positional_index and fmt.half_hourly_labelling == "start"
    strptime = rubydate.strptime(fmt.date_format)
    notes = 0
    days: dict[tuple[str, int], list] = {}  # (meter, ordinal) → [first line, rows, {slot: (line, identity)}, overwritten]
    row_warnings: list[tuple[int, int]] = []  # (line, bits) of rows that do not import on their own account
    count = 0
    identities: set[int] = set()
    for line, fields in rows:
        count += 1
        report.rows = count  # so far: a Stop below counts the rest
        n = len(fields)
        meter = fields[meter_i].strip() if meter_i < n else ""
        text = fields[date_i].strip() if date_i < n else ""
        if not meter or not text:
            row_warnings.append((line, (_MPAN if not meter else 0) | (_NO_DATE if not text else 0)))
            continue
        identity = hash((meter, text, tuple(fields[:layout.width])))
        if identity in identities:  # an identical row: the importer's `uniq` merged it
            continue
        identities.add(identity)
        parsed = rubydate.parse(text, today)
        strict = strptime.date(text, today)
        if strict is not None and parsed is None:
            parsed = rubydate.Parsed(strict)
        elif strict is None and parsed is not None:
            notes += 1
        if parsed is None:
            raise Stop(f"the importer stops at line {line}: it cannot read the date {text!r}; nothing in the file imports ({NO_VALID_READINGS})")
        if by_period:
            day, slot = parsed.day, _ruby_int(fields[period_i] if period_i < n else "") - 1
        elif by_time:
            day, slot = parsed.day, _slot_of_time(fields[time_i] if time_i < n else None, line)
        elif at_start:
            moment = strptime.time_of_day(text)
            if moment is None:
                raise Stop(f"the importer stops at line {line}: {text!r} does not match date_format {fmt.date_format!r}, "
                           f"from which it takes the half hour; nothing in the file imports ({NO_VALID_READINGS})")
            day, slot = parsed.day, moment[0] * 2 + (moment[1] >= 30)
        else:
            day, hour, minute = parsed.in_utc()
            if hour == 0 and minute == 0:  # labelled at the end: midnight is the previous day's last half hour
                day, slot = day - timedelta(days=1), HALF_HOURS - 1
            else:
                slot = ((hour * 60 + minute - 30) // 30)
        if slot >= HALF_HOURS or slot < -HALF_HOURS:
            continue  # past the 48th: the importer truncates it away
        slot %= HALF_HOURS
        entry = days.get((meter, day.toordinal()))
        if entry is None:
            entry = days[(meter, day.toordinal())] = [line, 0, {}, []]
        entry[1] += 1
        if slot in entry[2]:
            entry[3].append(entry[2][slot])  # the earlier reading is overwritten: the last wins
        entry[2][slot] = line
    report.rows = count
    _tally_days(report, fmt, days, row_warnings, lines, today)
    if notes:
        report.notes[DATE_FORMAT_DIFFERS] = notes


def _ruby_int(text: str) -> int:
    """Ruby's `String#to_i`: the leading integer, 0 when there is none."""
    match = _RUBY_INT.match(text)
    return int(match.group(1)) if match else 0


def _slot_of_time(text: str | None, line: int) -> int:
    """SingleReadConverter's half hour of a time field (`01:30`, `1:30`, `130`, `00:00 to 00:30`); Stop where it raises."""
    if text is not None and text.split():
        value = text.split()[0]
        if not _TIME.fullmatch(value):
            value = value.rjust(4, "0")
            value = value[:-2] + ":" + value[-2:]
        match = _TIME.fullmatch(value)
        if match:
            return int(match.group(1)) * 2 + (int(match.group(2)) >= 30)
    raise Stop(f"the importer stops at line {line}: {text!r} is not a time it reads (01:30, 130, 23:30); "
               f"it imports nothing of the file")


def _tally_days(report: Report, fmt: Format, days: dict, row_warnings: list, lines: list[str], today: date) -> None:
    """What imports of each meter-day, and the warnings of those that do not (one each, on the day's first line)."""
    threshold = fmt.missing_readings_limit if fmt.missing_readings_limit is not None else 1
    numeric = not fmt.lookup_by_serial_number
    today_ord = today.toordinal()
    warned = list(row_warnings)
    meters: set[str] = set()
    low = high = valid = imported = 0
    for (meter, ordinal), (first_line, rows, slots, overwritten) in days.items():
        warned += [(line, _DUP) for line in overwritten]
        bits = 0
        if not fmt.allow_merging and HALF_HOURS - len(slots) > threshold:
            bits |= _READINGS
        if numeric and not (meter.isdigit() and meter.isascii()):
            bits |= _NON_NUMERIC
        if ordinal > today_ord:
            bits |= _FUTURE
        if bits:
            warned.append((first_line, bits))
            continue
        imported += 1
        valid += rows - len(overwritten)
        meters.add(meter)
        low = ordinal if not low or ordinal < low else low
        high = max(high, ordinal)
    _tally_warnings(report, sorted(warned), lines)
    report.valid_rows, report.days, report.meters = valid, imported, len(meters)
    if imported:
        report.first_date, report.last_date = date.fromordinal(low).isoformat(), date.fromordinal(high).isoformat()


# --- the header ------------------------------------------------------------------------------------------------------

def _header(first: list[tuple[int, list[str]]], fmt: Format, layout: _Layout, report: Report) -> Header | None:
    """Step 5: the row among the first `number_of_header_rows + 2` holding the most of header_example's names,
    and each read column's position there against header_example's."""
    expected = layout.columns
    names = {_name(column) for column in expected if column.strip()}
    configured = max(fmt.number_of_header_rows, 1)
    best, best_score = None, 0
    for row, (line, fields) in enumerate(first, 1):
        score = len(names.intersection(map(_name, fields)))
        if score * 2 >= len(names) and (score > best_score or (score == best_score and row == configured)):
            best, best_score = row, score
    if best is None:
        if fmt.number_of_header_rows and first:  # the configured header row is not a header: the importer skips data
            _warn_header_row(report, first[configured - 1] if configured <= len(first) else first[-1])
            return Header(None, expected, [])
        return None
    line, found = first[best - 1]
    header = Header(best, expected, found)
    position: dict[str, int] = {}
    for i, column in enumerate(found):
        position.setdefault(_name(column), i)
    seen = set()
    for column in fmt.read_fields().values():
        if column in seen:
            continue
        seen.add(column)
        at = position.get(_name(column))
        if at is None:
            header.missing.append(column)
        elif at != layout.columns.index(column):
            header.moved.append({"name": column, "expected": layout.columns.index(column) + 1, "found": at + 1})
    if best != configured:
        _warn_header_row(report, (line, found))
    read = {_name(column) for column in seen}
    renamed = sum(1 for a, b in zip(expected, found) if _name(a) != _name(b) and _name(a) not in read)
    if renamed:
        report.notes["unread_columns_renamed"] = renamed
    if len(found) > len(expected):
        report.notes["columns_added"] = len(found) - len(expected)
    elif len(found) < len(expected) and not header.missing:
        report.notes["columns_removed"] = len(expected) - len(found)
    return header


def _name(column: str) -> str:
    return column.strip().casefold()


def _warn_header_row(report: Report, row: tuple[int, list[str]]) -> None:
    report.warnings[HEADER_ROW_MOVED] = 1
    same = next((example for example in report.examples if example.line == row[0]), None)
    if same is not None:
        same.warnings.insert(0, HEADER_ROW_MOVED)
        return
    report.examples.insert(0, Example(row[0], [HEADER_ROW_MOVED], _text(row[1])))
    del report.examples[EXAMPLES:]


def _text(fields: list[str]) -> str:
    return ",".join(fields)[:EXAMPLE_TEXT]
