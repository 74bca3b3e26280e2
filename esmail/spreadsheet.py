"""Spreadsheets (xlsx, xls, xlsb, ods) → CSV of the first sheet, cell by cell as DESIGN §5 says.

python-calamine reads the cells several times faster than openpyxl or xlrd,
but it hides three things §5 needs: a cell's number format (it decides
date/date-time/time from the value alone), error cells (it gives ""), and
integers past 2^53 (it gives floats). When a sheet holds such a cell, and
only then, the sheet's own XML (xlsx) or xlrd (xls) is read for those cells.
"""

from __future__ import annotations

import io
import re
import tempfile
import zipfile
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta
from posixpath import join, normpath

import orjson
from python_calamine import CalamineWorkbook
from xlrd import compdoc

from esmail.errors import Unprocessable
from esmail.kinds import XLS, XLSX

MAX_CELLS = 2_000_000
MAX_COLUMNS = 16_384
MAX_XML_BYTES = 1_000_000_000  # uncompressed size of one xlsx part
MAX_XML_RATIO = 200  # compression ratio of an xlsx part beyond which it is a bomb

_EXCEL_EPOCH = datetime(1899, 12, 30)
_BIG = 2.0**53


def to_csv(data: bytes, kind: str) -> bytes:
    """The first sheet of a workbook (`kind` xlsx, xls, xlsb or ods) as CSV bytes (UTF-8, `\\n` line ends).

    Rows are written as calamine yields them; only the rows a fix-up may change
    (see `_may_change`) are kept as Python values, so memory holds the lines,
    not a million cell objects.
    """
    xlsx = _Xlsx(data) if kind == XLSX else None
    if kind == XLS:
        _check_ole2(data)
    sheet = _first_sheet(data, kind)
    lines: list[bytes] = []
    kept: dict[int, list] = {}
    inexact: set[int] = set()
    skipped = sheet.start[1] if sheet.start else 0  # iter_rows leaves out leading empty columns (not rows)
    pad = b"," * skipped
    for r, row in enumerate(_rows(sheet, kind)):
        line = _fast_line(row)  # numbers and dates only: nothing a fix-up could change
        if line is None:
            try:
                line = _line(row).encode()
            except _Inexact:
                line = b""
                inexact.add(r)
            if r in inexact or _may_change(line):
                kept[r] = [""] * skipped + row
        lines.append(pad + line if pad else line)
    del sheet  # calamine's cells: as big as the CSV, or more
    for r in _fix_up(kept, inexact, xlsx, data if kind == XLS else None) | inexact:
        lines[r] = ",".join(map(_field, kept[r])).encode()
    if not lines:
        return b""
    lines.append(b"")
    return b"\n".join(lines)


def _first_sheet(data: bytes, kind: str):
    """The workbook's first sheet, read by calamine from a temporary file.

    From a file calamine keeps one copy of the bytes, not three (its
    file-like reader copies them into Rust first): an 18 MB xls peaks
    ~60 MB lower. The workbook is dropped once the sheet is out of it.
    """
    with _reading(kind), tempfile.NamedTemporaryFile(suffix="." + kind) as file:
        file.write(data)
        file.flush()
        book = CalamineWorkbook.from_path(file.name)
        if not book.sheet_names:
            raise Unprocessable("the workbook has no sheets")
        sheet = book.get_sheet_by_index(0)
    if sheet.width > MAX_COLUMNS or sheet.height * sheet.width > MAX_CELLS:
        raise Unprocessable(f"the sheet is {sheet.height} rows × {sheet.width} columns, over the limit of {MAX_CELLS:,} cells or {MAX_COLUMNS:,} columns")
    return sheet


def _rows(sheet, kind: str):
    with _reading(kind):
        yield from sheet.iter_rows()


@contextmanager
def _reading(kind: str):
    """calamine's errors, and its panics, as Unprocessable."""
    try:
        yield
    except Unprocessable:
        raise
    except Exception as exc:  # calamine raises its own error types and plain ValueErrors
        raise Unprocessable(f"cannot read the {kind} file: {exc}") from None
    except BaseException as exc:  # a panic in calamine's Rust code arrives as pyo3's PanicException, a BaseException
        if type(exc).__name__ != "PanicException":
            raise
        raise Unprocessable(f"cannot read the {kind} file: the reader failed ({exc})") from None


def _may_change(line: bytes) -> bool:
    """Whether a fix-up could rewrite this line: it has an empty field (an error cell reads as
    empty) or a `:` (a date-time or time, whose format may say otherwise). Dates alone cannot change."""
    return b":" in line or b",," in line or line[:1] == b"," or line[-1:] == b"," or not line


# --- writing one cell -------------------------------------------------------


class Raw(str):
    """A field written as it is (an error such as `#DIV/0!`, or an exact integer)."""


def _number(v: float) -> str:
    if v.is_integer():
        return str(int(v))
    text = repr(v)
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:  # Ruby's Float#to_s: 1.0e-05, never 1e-05
        return f"{mantissa}.0e{exponent}"
    return text


def _string(v: str) -> str:
    return '"' + v.replace('"', '""') + '"' if v else ""


def _datetime(v: datetime) -> str:
    v = _round_to_second(v)
    if not (v.hour or v.minute or v.second):
        return v.date().isoformat()
    return v.strftime("%Y-%m-%dT%H:%M:%S+00:00")


def _time(v: time) -> str:
    return v.strftime("%H:%M:%S")


def _duration(v: timedelta) -> str:
    seconds = round(v.total_seconds())
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _round_to_second(v: datetime) -> datetime:
    return (v + timedelta(microseconds=500_000)).replace(microsecond=0) if v.microsecond else v


_WRITERS = {
    float: _number,
    int: lambda v: str(v),
    str: _string,
    bool: lambda v: '"true"' if v else '"false"',
    date: date.isoformat,
    datetime: _datetime,
    time: _time,
    timedelta: _duration,
    Raw: str,
}


def _field(v) -> str:
    return _WRITERS[type(v)](v)


class _Inexact(Exception):
    """A whole number past 2^53: calamine's float may have rounded it."""


def _integral(v: float) -> str:
    if -_BIG < v < _BIG:
        return str(int(v))
    raise _Inexact


def _line(row: list) -> str:
    """One CSV line, cell by cell. Floats are written inline; a row that may hold a float in exponent
    form (`e-`, from repr) is written again field by field for Ruby's `1.0e-05`."""
    line = ",".join([(_integral(v) if v.is_integer() else repr(v)) if type(v) is float else _WRITERS[type(v)](v) for v in row])
    return line if "e-" not in line else ",".join(map(_field, row))


_PLAIN = frozenset({float, int, date})  # what orjson writes as §5 does, once the notation is checked


def _fast_line(row: list, dumps=orjson.dumps) -> bytes | None:
    """The same line as `_line` for a row of only numbers and dates, written by orjson; None when this row
    needs `_line` after all.

    Formatting floats is the cost of a Python writer: `repr` takes ~300 ns a
    cell, orjson (Ryu, the same shortest round-trip digits) ~65 ns. Where
    their notations differ it hands the row back: exponents (`1e16`, and
    small numbers it writes as `0.00001` where §5 has `1.0e-05`), `-0.0`,
    NaN, and whole numbers of 16 digits or more (past 2^53 the float may
    have been rounded: `_integral` sends those to the fix-up).
    """
    if not _PLAIN.issuperset(map(type, row)):
        return None
    try:
        line = dumps(row)
    except TypeError:  # an int past 64 bits
        return None
    if b"e" in line or b"-0.0" in line or b".0000" in line or b"null" in line:
        return None
    end = line.find(b".0,")
    while end >= 0:  # each whole number: `100.0` → `100`, unless it has 16 digits or more
        if line[end - 16:end].isdigit():
            return None
        end = line.find(b".0,", end + 3)
    if line.endswith(b".0]"):
        if line[-19:-3].isdigit():
            return None
        line = line[:-3] + b"]"
    line = line[1:-1].replace(b".0,", b",")
    return line.replace(b'"', b"") if b'"' in line else line  # a date's quotes (there is no string)


# --- what calamine hides ----------------------------------------------------

_DATE_LIKE = {datetime, time}


def _fix_up(rows: dict[int, list], inexact: set[int], xlsx: "_Xlsx | None", xls: bytes | None) -> set[int]:
    """Correct the cells calamine cannot get right, from formats and raw values; return the rows changed.

    `rows` holds the rows that may change, by index, with every column from A.
    """
    dates = [(r, c) for r, row in rows.items() if _DATE_LIKE.intersection(map(type, row))
             for c, v in enumerate(row) if type(v) in _DATE_LIKE]
    maybe_errors = any(row.count("") for row in rows.values())  # calamine writes an error cell as ""
    changed = set()
    if xlsx is not None:
        kinds = xlsx.style_kinds()
        kinds_in_book = set(kinds.values())
        ambiguous = {rc for rc in dates if _may_differ(rows[rc[0]][rc[1]], kinds_in_book)}
        if ambiguous or ((inexact or maybe_errors) and xlsx.has_errors_or_big_integers()):
            for (r, c), (style, kind_attr, raw) in xlsx.raw_cells(ambiguous).items():
                if r not in rows or c >= len(rows[r]):
                    continue
                if kind_attr == "e":
                    rows[r][c] = Raw(raw)
                elif type(rows[r][c]) is float and _BIG_INTEGER.fullmatch(raw):
                    rows[r][c] = Raw(str(int(raw)))  # exact, where the float rounded past 2^53
                elif (r, c) in ambiguous and style in kinds:
                    rows[r][c] = _as_format(rows[r][c], kinds[style])
                changed.add(r)
    elif xls is not None and (dates or (maybe_errors and _xls_may_have_errors(xls))):
        changed = _fix_up_xls(rows, xls)
    return changed


_BIG_INTEGER = re.compile(r"-?\d{16,}")  # 2^53 has 16 digits: shorter integers are exact as floats


def _may_differ(v, kinds: set) -> bool:
    """Whether a calamine date/time value could be written differently under some format in the book."""
    if type(v) is datetime:
        return "date" in kinds
    return bool(kinds & {"date", "datetime"})


def _as_format(v, kind: str | None):
    """A calamine date-like value as §5 writes it under a format of this kind."""
    if kind == "date":
        return v.date() if type(v) is datetime else _EXCEL_EPOCH.date()
    if kind == "datetime" and type(v) is time:
        return datetime.combine(_EXCEL_EPOCH.date(), v)
    return v


def format_kind(code: str) -> str | None:
    """`"date"`, `"datetime"`, `"time"` or None for a number format code such as `yyyy-mm-dd hh:mm`."""
    code = re.sub(r'"[^"]*"|\\.|_.|\*.', "", code.split(";")[0].lower())
    code = re.sub(r"\[(?![hms]+\])[^\]]*\]", "", code)  # colours and locales, not elapsed [h]
    has_time = "h" in code or "s" in code
    has_date = "y" in code or "d" in code or ("m" in code and not has_time)
    if has_date and has_time:
        return "datetime"
    return "date" if has_date else "time" if has_time else None


# built-in number formats (ECMA-376 §18.8.30) that are dates or times
_BUILTIN_KINDS = {14: "date", 15: "date", 16: "date", 17: "date", 18: "time", 19: "time", 20: "time", 21: "time", 22: "datetime", 45: "time", 46: "time", 47: "time"}
_BUILTIN_KINDS.update({i: "date" for i in (27, 28, 29, 30, 31, 34, 35, 36, 50, 51, 52, 53, 54, 57, 58)})
_BUILTIN_KINDS.update({i: "time" for i in (32, 33, 55, 56)})


_BIG_VALUE = re.compile(rb"<v>-?\d{16}")  # a literal prefix: sre scans for it at memchr speed


class _Xlsx:
    """Just enough of an xlsx package to find the first sheet's styles, errors and raw values."""

    def __init__(self, data: bytes):
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
            for info in self.zip.infolist():
                if info.file_size > MAX_XML_BYTES or (info.file_size > 10_000_000 and info.file_size > MAX_XML_RATIO * max(info.compress_size, 1)):
                    raise Unprocessable(f"xlsx part {info.filename} would expand to {info.file_size:,} bytes (a zip bomb?)")
            self.sheet = self._first_sheet_path()
        except Unprocessable:
            raise
        except Exception as exc:
            raise Unprocessable(f"cannot read the .xlsx file: {exc}") from None
        self._check_dimension()

    def _read(self, name: str) -> bytes:
        return self.zip.read(name)

    def _first_sheet_path(self) -> str:
        workbook = self._read("xl/workbook.xml")
        match = re.search(rb"<(?:\w+:)?sheet\b[^>]*?\br:id=\"([^\"]+)\"", workbook) or re.search(rb"<(?:\w+:)?sheet\b[^>]*?\bid=\"([^\"]+)\"", workbook)
        if not match:
            raise Unprocessable("the workbook has no sheets")
        rels = self._read("xl/_rels/workbook.xml.rels")
        for rel in re.finditer(rb"<Relationship\b[^>]*>", rels):
            if re.search(rb'\bId="' + re.escape(match.group(1)) + rb'"', rel.group(0)):
                target = re.search(rb'\bTarget="([^"]+)"', rel.group(0)).group(1).decode()
                return target.lstrip("/") if target.startswith("/") else normpath(join("xl", target))
        raise Unprocessable("the workbook's first sheet has no part")

    def _check_dimension(self) -> None:
        """Refuse a sheet whose declared size is over the limits before any cell is read."""
        with self.zip.open(self.sheet) as stream:
            head = stream.read(4096)
        match = re.search(rb'<(?:\w+:)?dimension\s+ref="([A-Z]+)(\d+)(?::([A-Z]+)(\d+))?"', head)
        if match and match.group(3):
            cols = _column(match.group(3)) - _column(match.group(1)) + 1
            rows = int(match.group(4)) - int(match.group(2)) + 1
            if cols > MAX_COLUMNS or rows * cols > MAX_CELLS:
                raise Unprocessable(f"the sheet declares {rows:,} rows × {cols:,} columns, over the limit of {MAX_CELLS:,} cells or {MAX_COLUMNS:,} columns")

    def style_kinds(self) -> dict[int, str | None]:
        """cellXfs index → date kind of its number format."""
        try:
            styles = self._read("xl/styles.xml")
        except KeyError:
            return {}
        custom = {int(m.group(1)): _unescape(m.group(2).decode()) for m in re.finditer(rb'<(?:\w+:)?numFmt\b[^>]*?numFmtId="(\d+)"[^>]*?formatCode="([^"]*)"', styles)}
        xfs = re.search(rb"<(?:\w+:)?cellXfs\b.*?</(?:\w+:)?cellXfs>", styles, re.S)
        kinds = {}
        for i, xf in enumerate(re.finditer(rb"<(?:\w+:)?xf\b[^>]*>", xfs.group(0) if xfs else b"")):
            fmt = re.search(rb'numFmtId="(\d+)"', xf.group(0))
            fmt_id = int(fmt.group(1)) if fmt else 0
            kinds[i] = format_kind(custom[fmt_id]) if fmt_id in custom else _BUILTIN_KINDS.get(fmt_id)
        return kinds

    def has_errors_or_big_integers(self) -> bool:
        """Whether the sheet has an error cell or an integer a float cannot hold, read as a stream."""
        with self.zip.open(self.sheet) as stream:
            tail = b""
            while chunk := stream.read(1 << 20):
                window = tail + chunk
                if b't="e"' in window or _BIG_VALUE.search(window):
                    return True
                tail = chunk[-40:]
        return False

    def raw_cells(self, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], tuple[int | None, str | None, str]]:
        """(row, col) → (style index, t attribute, raw value) for the wanted cells, every error cell
        and every cell holding a long integer."""
        xml = self._read(self.sheet)
        found = {}
        for match in re.finditer(rb"<(?:\w+:)?c\b([^>]*?)(?:/>|>(.*?)</(?:\w+:)?c>)", xml, re.S):
            attrs = match.group(1)
            ref = re.search(rb'\br="([A-Z]+)(\d+)"', attrs)
            if not ref:
                continue
            rc = (int(ref.group(2)) - 1, _column(ref.group(1)) - 1)
            kind = re.search(rb'\bt="(\w+)"', attrs)
            kind = kind.group(1).decode() if kind else None
            value = re.search(rb"<(?:\w+:)?v>([^<]*)</", match.group(2) or b"")
            raw = _unescape(value.group(1).decode()) if value else ""
            if rc not in wanted and kind != "e" and not _BIG_INTEGER.fullmatch(raw):
                continue
            style = re.search(rb'\bs="(\d+)"', attrs)
            found[rc] = (int(style.group(1)) if style else 0, kind, raw)
        return found


def _column(letters: bytes) -> int:
    n = 0
    for ch in letters:
        n = n * 26 + ch - 64
    return n


def _unescape(text: str) -> str:
    return text.replace("&quot;", '"').replace("&apos;", "'").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


# --- xls --------------------------------------------------------------------

# BIFF8 BOOLERR record holding an error, and FORMULA record whose cached result is an error
_XLS_ERROR = re.compile(rb"\x05\x02\x08\x00.{7}\x01|\x06\x00..{6}\x02.{5}\xff\xff", re.S)


def _check_ole2(data: bytes) -> None:
    """Refuse a corrupt OLE2 container before calamine reads it.

    calamine (0.x, `cfb::Sectors::get_chain`) follows a looping sector chain
    until memory runs out, so a 6 KB file can take the process down; xlrd's
    reader checks the chains and the directory first, in milliseconds.
    """
    try:
        doc = compdoc.CompDoc(data, logfile=_QUIET)
        if doc.locate_named_stream("Workbook")[0] is None and doc.locate_named_stream("Book")[0] is None:
            raise Unprocessable("an OLE2 file without a Workbook stream: not a spreadsheet")
    except Unprocessable:
        raise
    except Exception as exc:  # CompDocError, and IndexError or struct.error on truncated tables
        raise Unprocessable(f"cannot read the xls file: a corrupt OLE2 container ({type(exc).__name__}: {exc})") from None


class _Quiet(io.StringIO):
    def write(self, text: str) -> int:  # xlrd reports oddities here; the exception says what matters
        return len(text)


_QUIET = _Quiet()


def _xls_may_have_errors(data: bytes) -> bool:
    return _XLS_ERROR.search(data) is not None


def _fix_up_xls(rows: dict[int, list], data: bytes) -> set[int]:
    import xlrd

    book = xlrd.open_workbook(file_contents=data, formatting_info=True, on_demand=True)
    sheet = book.sheet_by_index(0)
    kinds: dict[int, str | None] = {}
    changed = set()
    for r in (r for r in rows if r < sheet.nrows):
        for c in range(min(sheet.ncols, len(rows[r]))):
            ctype = sheet.cell_type(r, c)
            if ctype == xlrd.XL_CELL_ERROR:
                rows[r][c] = Raw(xlrd.error_text_from_code.get(sheet.cell_value(r, c), "#N/A"))
                changed.add(r)
            elif type(rows[r][c]) in (datetime, time):
                xf = sheet.cell_xf_index(r, c)
                if xf not in kinds:
                    fmt = book.format_map.get(book.xf_list[xf].format_key)
                    kinds[xf] = format_kind(fmt.format_str) if fmt else None
                rows[r][c] = _as_format(rows[r][c], kinds[xf])
                changed.add(r)
    return changed
