"""Feed formats (DESIGN §16): the importer's configuration of a prefix, as a frozen value, with its faults named.

A format is Energy Sparks' `AmrDataFeedConfig` with the importer's own
attribute names, written inline (`[feed.format]` under a `[[feed]]`) or
taken from the JSON the importer's `AmrDataFeedConfig.all.to_json` writes
(`[formats] path`). Both go through `parse`; what it cannot check raises
FormatError naming the attribute and the fix. Inline, that is a config
error; in the export (the importer's own data, legacy entries included) the
entry becomes `Unusable`, logged at start, and its prefix's files get the
verdict `format unusable`.

Only the standard library here: the config loads this for every command.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from esmail import rubydate
from esmail.keys import prefix_of

HALF_HOURS = 48


class FormatError(ValueError):
    """An attribute of a format that cannot be checked: `key` and what is wrong with it, with the fix."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Format:
    """What the importer reads of a prefix's files (the attributes it uses; the others are ignored)."""

    header_example: str
    date_format: str
    reading_date_field: str
    reading_fields: tuple[str, ...]
    mpan_mprn_field: str = ""
    number_of_header_rows: int = 0
    row_per_reading: bool = False
    positional_index: bool = False
    period_field: str | None = None
    reading_time_field: str | None = None
    half_hourly_labelling: str | None = None  # "start" | "end"; none: end
    msn_field: str | None = None
    lookup_by_serial_number: bool = False
    units_field: str | None = None
    expected_units: str | None = None
    column_row_filters: tuple[tuple[str, str], ...] = ()  # (column name, regex), as the importer's JSON object
    missing_readings_limit: int | None = None
    allow_merging: bool = False
    column_separator: str = ","

    @property
    def columns(self) -> list[str]:
        """`header_example.split(",")` as Ruby splits: trailing empty names dropped."""
        names = self.header_example.split(",")
        while names and names[-1] == "":
            names.pop()
        return names

    @property
    def meter_field(self) -> str:
        """The column that names the meter: the serial number with lookup_by_serial_number, else the MPAN/MPRN."""
        return self.msn_field if self.lookup_by_serial_number else self.mpan_mprn_field

    def read_fields(self) -> dict[str, str]:
        """Every column the importer reads, attribute → column name (reading_fields as `reading_fields[i]`)."""
        read = {"lookup_by_serial_number" if self.lookup_by_serial_number else "mpan_mprn_field": self.meter_field,
                "reading_date_field": self.reading_date_field}
        if self.positional_index and self.period_field:
            read["period_field"] = self.period_field
        if self.row_per_reading and self.reading_time_field:
            read["reading_time_field"] = self.reading_time_field
        if self.units_field:
            read["units_field"] = self.units_field
        read.update({f"reading_fields[{i}]": name for i, name in enumerate(self.reading_fields)})
        read.update({f"column_row_filters[{name!r}]": name for name, _ in self.column_row_filters})
        return read


@dataclass(frozen=True)
class Unusable:
    """An exported format that cannot be checked: the prefix's files get the verdict `format unusable`, with `reason`."""

    reason: str


# The importer's other attributes (AmrDataFeedConfig's columns): accepted, and ignored
IGNORED = frozenset({
    "id", "description", "identifier", "enabled", "process_type", "source_type", "convert_to_kwh", "delayed_reading",
    "estimate_flags", "handle_off_by_one", "missing_reading_window", "owned_by_id", "reading_status_fields", "repeated_names",
    "created_at", "updated_at", "notes"})
ATTRIBUTES = tuple(f.name for f in fields(Format))


def _text(key: str, value: Any, example: str) -> str:
    if not isinstance(value, str):
        raise FormatError(key, f"must be text, e.g. {example}; got {value!r}")
    return value


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise FormatError(key, f"must be true or false; got {value!r}")
    return value


def _count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FormatError(key, f"must be a whole number, 0 or more; got {value!r}")
    return value


def parse(values: Mapping[str, Any], strict: bool = True) -> Format:
    """A format from the importer's attributes (None values as absent); FormatError for what cannot be checked.

    `strict` (inline): a key that is no attribute of the importer's is an
    error (a typo); the export's extra attributes are always ignored.
    """
    given = {key: value for key, value in values.items() if value is not None}
    if strict:
        for key in given:
            if key not in ATTRIBUTES and key not in IGNORED:
                raise FormatError(key, f"is not an attribute of the importer's AmrDataFeedConfig; the checked ones are {', '.join(ATTRIBUTES)}")
    for key in ("header_example", "date_format", "reading_date_field", "reading_fields"):
        if key not in given:
            raise FormatError(key, "is needed: copy it from the feed's configuration in the importer (admin → AMR data feed configs)")
    text = {key: _text(key, given[key], '"MPAN"') for key in ("header_example", "date_format", "reading_date_field", "mpan_mprn_field",
                                                              "period_field", "reading_time_field", "msn_field", "units_field",
                                                              "expected_units", "column_separator") if key in given}
    flags = {key: _flag(key, given[key]) for key in ("row_per_reading", "positional_index", "lookup_by_serial_number", "allow_merging")
             if key in given}
    counts = {key: _count(key, given[key]) for key in ("number_of_header_rows", "missing_readings_limit") if key in given}
    readings = given["reading_fields"]
    if not isinstance(readings, list) or not all(isinstance(name, str) for name in readings):
        raise FormatError("reading_fields", f'must be a list of column names, e.g. ["00:00", "00:30", …, "23:30"]; got {readings!r}')
    labelling = given.get("half_hourly_labelling")
    if labelling is not None and labelling not in ("start", "end"):
        raise FormatError("half_hourly_labelling", f'must be "start" or "end" (the default); got {labelling!r}')
    fmt = Format(reading_fields=tuple(readings), half_hourly_labelling=labelling,
                 column_row_filters=_filters(given.get("column_row_filters", {})), **text, **flags, **counts)
    _check(fmt)
    return fmt


def _filters(value: Any) -> tuple[tuple[str, str], ...]:
    key = "column_row_filters"
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise FormatError(key, f'must be a table of column name → regular expression, e.g. {{ MPAN = "Grand Total" }}; got {value!r}')
    for column, pattern in value.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise FormatError(key, f"{column} = {pattern!r} is not a regular expression: {exc}") from None
    return tuple(value.items())


def _check(fmt: Format) -> None:
    """What the importer needs of these attributes to read a file at all."""
    try:
        rubydate.strptime(fmt.date_format)
    except ValueError as exc:
        raise FormatError("date_format", str(exc)) from None
    if fmt.lookup_by_serial_number and not fmt.msn_field:
        raise FormatError("msn_field", "is needed with lookup_by_serial_number = true: the column that holds the meter serial number")
    if not fmt.lookup_by_serial_number and not fmt.mpan_mprn_field:
        raise FormatError("mpan_mprn_field", "is needed: the column that holds the MPAN or MPRN (or lookup_by_serial_number with msn_field)")
    if fmt.positional_index and not fmt.row_per_reading:
        raise FormatError("positional_index", "needs row_per_reading = true (the importer refuses it otherwise)")
    if fmt.positional_index and not (fmt.period_field or fmt.reading_time_field):
        raise FormatError("positional_index", "needs period_field (1-48) or reading_time_field (01:30, 130) to place each reading")
    if fmt.expected_units and not fmt.units_field:
        raise FormatError("expected_units", "needs units_field: the column whose value must equal it")
    if not fmt.column_separator:
        raise FormatError("column_separator", 'must not be empty; "," unless the feed uses ";" or a tab')
    needed = 1 if fmt.row_per_reading else HALF_HOURS
    if len(fmt.reading_fields) != needed:
        shape = "a row-per-reading format needs exactly one (the column of the reading)" if fmt.row_per_reading else \
            "a row-per-day format needs 48, one per half hour"
        raise FormatError("reading_fields", f"has {len(fmt.reading_fields)} names; {shape}")
    columns = fmt.columns
    if not columns:
        raise FormatError("header_example", "is empty: copy the header row of a good file, e.g. \"MPAN,Date,00:00,…,23:30\"")
    for key, name in fmt.read_fields().items():
        if name not in columns:
            shown = ", ".join(columns[:6]) + (", …" if len(columns) > 6 else "")
            raise FormatError(key.replace("lookup_by_serial_number", "msn_field"),
                              f"{name!r} is not a column of header_example ({shown}); name one of its columns, "
                              "or fix header_example to match the files")
    if fmt.half_hourly_labelling == "start" and fmt.row_per_reading and not fmt.positional_index:
        if "hour" not in rubydate.strptime(fmt.date_format).kinds:
            raise FormatError("date_format", f'{fmt.date_format!r} has no hour: with half_hourly_labelling = "start" the importer '
                              "takes each reading's half hour from its date's time (e.g. %d/%m/%Y %H:%M)")


def load_export(path: Path) -> tuple[dict[str, Format | Unusable], list[str]]:
    """The importer's exported configs: prefix → format (or Unusable), and one warning per entry that cannot be
    checked or used. ValueError (a config error) when the file cannot be read or is not such an export."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"is not JSON: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(entry, dict) for entry in data):
        raise ValueError("must be a JSON array of objects, as the importer's AmrDataFeedConfig.all.to_json writes it")
    formats: dict[str, Format | Unusable] = {}
    warnings: list[str] = []
    for n, entry in enumerate(data, 1):
        identifier = entry.get("identifier")
        if entry.get("process_type") not in (None, "s3_folder", 0):
            continue  # an API feed: no files to read
        if not isinstance(identifier, str) or prefix_of(identifier) != identifier:
            warnings.append(f"entry #{n}: identifier {identifier!r} is no prefix (a-z 0-9 . _ + -); it is ignored")
            continue
        try:
            formats[identifier] = parse(entry, strict=False)
        except FormatError as exc:
            formats[identifier] = Unusable(str(exc))
            warnings.append(f"identifier {identifier!r}: {exc}; its files get the verdict \"format unusable\"")
    return formats, warnings
