"""Dates as the importer's Ruby reads them (DESIGN §16, step 4): `Date.strptime` and the `Date.parse` fallback.

The importer's `date_format` is a Ruby strptime format, which is not
Python's: `%d` and `%e` take one or two digits (or a space and one),
`%Y` takes every digit it finds unless a number follows, whitespace in the
format matches any whitespace (none included), and the scan never goes
back. A format is compiled once into a regular expression that scans the
same way (possessive quantifiers, atomic groups) and fullmatches, as
`Date.strptime` refuses leftovers.

When the format does not read a date, the importer's `Date.parse` still
does for the forms §16 lists (ISO 8601, `30 Nov 2026`, `30-Nov-2026`,
`Nov 30 2026`, day-first `30/11/2026`, `30.11.2026`) and `2026/11/30`,
which Ruby reads the same unambiguous way; anything else is not a date.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache

MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october", "november", "december")
DAYS = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
_MONTH_NAMES = "|".join(MONTHS) + "|" + "|".join(m[:3] for m in MONTHS)  # full names first, as Ruby tries them
_DAY_NAMES = "|".join(DAYS) + "|" + "|".join(d[:3] for d in DAYS)
_ZONE = r"(?i:z|utc|gmt|[+-]\d{1,2}(?::?\d{2})?|[a-z]{3,4})"

# directive → (regex, group kind); kinds are read back by Strptime._fields
_DIRECTIVES = {
    "d": (r"(?> \d|\d{1,2})", "mday"), "e": (r"(?> \d|\d{1,2})", "mday"),
    "m": (r"\d{1,2}+", "mon"),
    "y": (r"\d{1,2}+", "year2"),
    "j": (r"\d{1,3}+", "yday"),
    "b": (rf"(?i:{_MONTH_NAMES})", "monname"), "B": (rf"(?i:{_MONTH_NAMES})", "monname"), "h": (rf"(?i:{_MONTH_NAMES})", "monname"),
    "a": (rf"(?i:{_DAY_NAMES})", ""), "A": (rf"(?i:{_DAY_NAMES})", ""),
    "H": (r"(?> \d|\d{1,2})", "hour"), "k": (r"(?> \d|\d{1,2})", "hour"),
    "I": (r"(?> \d|\d{1,2})", "hour12"), "l": (r"(?> \d|\d{1,2})", "hour12"),
    "M": (r"\d{1,2}+", "min"), "S": (r"\d{1,2}+", "sec"),
    "p": (r"(?i:[ap](?:m|\.m\.))", "ampm"), "P": (r"(?i:[ap](?:m|\.m\.))", "ampm"),
    "z": (_ZONE, ""), "Z": (_ZONE, ""),
    "n": (r"\s*+", ""), "t": (r"\s*+", ""),
}
_COMPOSITES = {"T": "%H:%M:%S", "R": "%H:%M", "F": "%Y-%m-%d", "D": "%m/%d/%y", "x": "%m/%d/%y", "r": "%I:%M:%S %p"}
_NUMERIC = set("CDdeFGgHIjkLlMmNQRrSsTUuVvWwXxYy")  # Ruby's NUM_PATTERN_P: a number follows
READS = "%d %e %m %b %B %y %Y %j %H %M %S %z %p %I %T %R %F %D %%"  # for error messages


@dataclass(frozen=True)
class Strptime:
    """One Ruby strptime format, compiled."""

    format: str
    regex: re.Pattern
    kinds: tuple[str, ...]  # the kind of each group, in order

    def _fields(self, text: str) -> dict[str, str] | None:
        match = self.regex.fullmatch(text)
        if match is None:
            return None
        return {kind: value for kind, value in zip(self.kinds, match.groups()) if kind}

    def date(self, text: str, today: date) -> date | None:
        """`Date.strptime(text, format)`: the date it reads, or None where Ruby raises ArgumentError."""
        fields = self._fields(text)
        if fields is None:
            return None
        try:
            year = _year(fields, today)
            if "yday" in fields:
                return date(year, 1, 1) + timedelta(days=int(fields["yday"]) - 1) if 1 <= int(fields["yday"]) <= 366 else None
            month = _month(fields, today)
            day = int(fields["mday"]) if "mday" in fields else 1
            return date(year, month, day) if _times_valid(fields) else None
        except ValueError:
            return None

    def time_of_day(self, text: str) -> tuple[int, int] | None:
        """(hour, minute) as `Time.strptime(text, format)` reads them; None where it raises."""
        fields = self._fields(text)
        if fields is None or not _times_valid(fields):
            return None
        hour = int(fields.get("hour", fields.get("hour12", "0")))
        if "hour12" in fields and "ampm" in fields:
            hour = hour % 12 + (12 if fields["ampm"][0] in "pP" else 0)
        return hour, int(fields.get("min", "0"))


def _year(fields: dict[str, str], today: date) -> int:
    if "year" in fields:
        return int(fields["year"])
    if "year2" in fields:
        short = int(fields["year2"])
        return short + (1900 if short >= 69 else 2000)
    return today.year


def _month(fields: dict[str, str], today: date) -> int:
    if "mon" in fields:
        return int(fields["mon"])
    if "monname" in fields:
        return _month_number(fields["monname"])
    return today.month if "mday" in fields else 1


def _times_valid(fields: dict[str, str]) -> bool:
    return (int(fields.get("hour", "0")) <= 24 and 1 <= int(fields.get("hour12", "1")) <= 12
            and int(fields.get("min", "0")) <= 59 and int(fields.get("sec", "0")) <= 60)


def _month_number(name: str) -> int:
    return MONTHS.index(next(m for m in MONTHS if m.startswith(name.lower()[:3]))) + 1


@lru_cache(maxsize=256)
def strptime(fmt: str) -> Strptime:
    """The compiled format; ValueError naming what Ruby's strptime does not read (a config error)."""
    parts: list[str] = []
    kinds: list[str] = []
    i = 0
    text = re.sub(r"%([%" + "".join(_COMPOSITES) + "])", lambda m: _COMPOSITES.get(m.group(1), "%%"), fmt)  # %T etc. spelt out
    while i < len(text):
        char = text[i]
        if char == "%":
            if i + 1 >= len(text):
                raise ValueError(f"{fmt!r} ends with a lone %")
            directive = text[i + 1]
            i += 2
            if directive == "%":
                parts.append("%")
            elif directive == "Y":
                follows_number = i < len(text) and (text[i].isdigit() or (text[i] == "%" and text[i + 1: i + 2] in _NUMERIC))
                parts.append(r"([+-]?\d{1,4}+)" if follows_number else r"([+-]?\d++)")
                kinds.append("year")
            elif directive in _DIRECTIVES:
                regex, kind = _DIRECTIVES[directive]
                parts.append(f"({regex})")
                kinds.append(kind)
            elif directive in "-_0^#":
                raise ValueError(f"{fmt!r} has %{directive}{text[i:i + 1]}: Ruby's strptime reads no flags such as "
                                 f"'{directive}' (they are strftime's); %d and %e read one or two digits")
            else:
                raise ValueError(f"{fmt!r} has %{directive}, which the importer's Ruby strptime does not read here; "
                                 f"use {READS}")
        elif char.isspace():
            parts.append(r"\s*+")
            i += 1
        else:
            parts.append(re.escape(char))
            i += 1
    if not any(kind in ("mday", "yday", "mon", "monname", "year", "year2") for kind in kinds):
        raise ValueError(f"{fmt!r} reads no part of a date; the importer needs the day, e.g. %d/%m/%Y")
    return Strptime(fmt, re.compile("".join(parts)), tuple(kinds))


# --- Date.parse, for the forms DESIGN §16 lists -----------------------------------------------------------------

_TIME = r"(?:(?:T|\s+|\s*,\s*)(\d{1,2}):(\d{2})(?::(\d{2})(?:[.,]\d+)?)?\s*(Z|UTC|GMT|[+-]\d{2}(?::?\d{2})?)?)?"
_WEEKDAY = rf"(?:(?:{_DAY_NAMES})\.?,?\s+)?"
_ORDINAL = r"(?:st|nd|rd|th)?"
_LENIENT_FORMS = [  # (regex, order of year, month, day groups), each followed by an optional time
    (rf"\s*([+-]?\d{{4}})-(\d{{1,2}})-(\d{{1,2}}){_TIME}\s*", "ymd"),
    (rf"\s*(\d{{4}})(\d{{2}})(\d{{2}})(?:T(\d{{2}})(\d{{2}})(\d{{2}})?(Z)?)?\s*", "ymd"),
    (rf"\s*(\d{{4}})[/.](\d{{1,2}})[/.](\d{{1,2}}){_TIME}\s*", "ymd"),
    (rf"\s*(\d{{1,2}})[/.](\d{{1,2}})[/.](\d{{3,}}){_TIME}\s*", "dmy"),
    (rf"\s*{_WEEKDAY}(\d{{1,2}}){_ORDINAL}[\s-]*((?:{_MONTH_NAMES})[a-z]*)\.?[\s-]*(\d{{2,}})?{_TIME}\s*", "dMy"),
    (rf"\s*{_WEEKDAY}((?:{_MONTH_NAMES})[a-z]*)\.?\s+(\d{{1,2}}){_ORDINAL},?(?:\s+(\d{{2,}}))?{_TIME}\s*", "Mdy"),
]


@lru_cache(maxsize=1)
def _lenient() -> list[tuple[re.Pattern, str]]:
    """The forms, compiled on first use (a command that reads no date pays nothing for them)."""
    return [(re.compile(pattern, re.I), order) for pattern, order in _LENIENT_FORMS]


@dataclass(frozen=True)
class Parsed:
    """What `Date.parse` (and `Time.zone.parse`, in UTC) reads: the date, and the time when there is one."""

    day: date
    time: tuple[int, int, int] | None = None  # hour, minute, second as written
    offset: int = 0  # minutes east of UTC

    def in_utc(self) -> tuple[date, int, int] | None:
        """(date, hour, minute) in UTC, as `Time.zone.parse` gives them with the zone UTC; None without a time."""
        if self.time is None:
            return self.day, 0, 0
        hour, minute, second = self.time
        moment = datetime(self.day.year, self.day.month, self.day.day) + timedelta(hours=hour, minutes=minute - self.offset, seconds=second)
        return moment.date(), moment.hour, moment.minute


def parse(text: str, today: date) -> Parsed | None:
    """The importer's lenient fallback for the forms it reads unambiguously; None for anything else."""
    for regex, order in _lenient():
        match = regex.fullmatch(text)
        if match is None:
            continue
        groups = match.groups()
        try:
            return _parsed(groups, order, today)
        except ValueError:
            return None
    return None


def _parsed(groups: tuple, order: str, today: date) -> Parsed:
    if order == "ymd":
        year, month, day = int(groups[0]), int(groups[1]), int(groups[2])
    elif order == "dmy":
        day, month, year = int(groups[0]), int(groups[1]), int(groups[2])
    elif order == "dMy":
        day, month, year = int(groups[0]), _month_number(groups[1]), _full_year(groups[2], today)
    else:
        month, day, year = _month_number(groups[0]), int(groups[1]), _full_year(groups[2], today)
    if not 1 <= month <= 12:
        raise ValueError
    found = date(year, month, day)
    hour, minute, second, zone = (groups[3:7] + (None,) * 4)[:4]
    if hour is None:
        return Parsed(found)
    if int(hour) > 24 or int(minute) > 59 or int(second or 0) > 60:
        raise ValueError
    return Parsed(found, (int(hour), int(minute), int(second or 0)), _offset(zone))


def _full_year(text: str | None, today: date) -> int:
    """A year as Date.parse completes it: none is this year; two digits are 1969-2068."""
    if not text:
        return today.year
    year = int(text)
    return year + (1900 if year >= 69 else 2000) if len(text) <= 2 else year


def _offset(zone: str | None) -> int:
    if not zone or zone.upper() in ("Z", "UTC", "GMT"):
        return 0
    sign = -1 if zone[0] == "-" else 1
    digits = zone[1:].replace(":", "")
    return sign * (int(digits[:2]) * 60 + int(digits[2:4] or 0))


def today_utc() -> date:
    """Today as the importer's `Time.zone.today` has it (its zone is UTC)."""
    return datetime.now(timezone.utc).date()
