"""DESIGN §5, spreadsheets: each row of the cell table, for xlsx and xls."""

from datetime import date, datetime, time

import pytest
import xlwt
from hypothesis import given, settings, strategies as st

from esmail import spreadsheet
from esmail.errors import Unprocessable
from esmail.spreadsheet import MAX_CELLS, format_kind, to_csv
from sheets import xls, xlsx


def one_cell(value, fmt=None, cached=None) -> bytes:
    """The CSV line of a sheet with one cell at A1."""
    return to_csv(xlsx({"A1": value}, {"A1": fmt} if fmt else None, {"A1": cached} if cached else None), "xlsx")


@pytest.mark.parametrize("value, fmt, expected", [
    (100.0, None, b"100\n"),
    (2.5e16, None, b"25000000000000000\n"),
    (-0.0, None, b"0\n"),
    (0.0001, None, b"0.0001\n"),
    (1.5e-05, None, b"1.5e-05\n"),
    (1e-05, None, b"1.0e-05\n"),
    (1234567.891, "#,##0.00", b"1234567.891\n"),
    (0.25, "0%", b"0.25\n"),
    ("plain", None, b'"plain"\n'),
    ('say "hi", then\nleave', None, b'"say ""hi"", then\nleave"\n'),
    ("  café £ ", None, '"  café £ "\n'.encode()),
    (True, None, b'"true"\n'),
    (False, None, b'"false"\n'),
    (date(2023, 3, 15), "yyyy-mm-dd", b"2023-03-15\n"),
    (45000.75, "yyyy-mm-dd", b"2023-03-15\n"),
    (0, "yyyy-mm-dd", b"1899-12-30\n"),
    (datetime(2023, 3, 15, 12, 0), "yyyy-mm-dd hh:mm:ss", b"2023-03-15T12:00:00+00:00\n"),
    (45000, "yyyy-mm-dd hh:mm", b"2023-03-15\n"),
    (0.5, "yyyy-mm-dd hh:mm", b"1899-12-30T12:00:00+00:00\n"),
    (time(12, 0), "hh:mm:ss", b"12:00:00\n"),
    (0.75, "h:mm", b"18:00:00\n"),
    ("#DIV/0!", None, b"#DIV/0!\n"),
    ("#N/A", None, b"#N/A\n"),
])
def test_xlsx_cell(value, fmt, expected):
    """One cell, written as the §5 table says."""
    assert one_cell(value, fmt) == expected


@pytest.mark.parametrize("cached, expected", [
    (("", "3"), b"3\n"),
    (("str", "total"), b'"total"\n'),
    (("b", "1"), b'"true"\n'),
    (("e", "#DIV/0!"), b"#DIV/0!\n"),
    (("", "0.30000000000000004"), b"0.30000000000000004\n"),
    (("", "9007199254740993"), b"9007199254740993\n"),
    (("", "-1152921504606846977"), b"-1152921504606846977\n"),
    (("", "2.5E+16"), b"25000000000000000\n"),
])
def test_formula_written_as_its_cached_value(cached, expected):
    """A formula is its cached value; integers past 2^53 are exact, floats shortest round-trip."""
    assert one_cell("=1+2", cached=cached) == expected


def test_formula_without_cached_value_is_an_empty_field():
    assert to_csv(xlsx({"A1": "=1+2", "B1": 5}), "xlsx") == b",5\n"


def test_range_keeps_leading_empty_rows_and_columns_and_pads():
    """Rows 1…last and columns 1…last used, every line the same width."""
    data = xlsx({"C3": "x", "B4": 1})
    assert to_csv(data, "xlsx") == b',,\n,,\n,,"x"\n,1,\n'


def test_fix_ups_land_in_their_column_when_leading_columns_are_empty():
    """Formats and error cells are looked up by (row, column) from A1, past leading empty columns."""
    data = xlsx({"C2": 45000.75, "D3": "#DIV/0!", "E3": 1}, {"C2": "yyyy-mm-dd"})
    assert to_csv(data, "xlsx") == b",,,,\n,,2023-03-15,,\n,,,#DIV/0!,1\n"
    assert to_csv(xls({(0, 2): 45000.75, (1, 3): 2.5}, {(0, 2): "yyyy-mm-dd"}), "xls") == b",,2023-03-15,\n,,,2.5\n"


def test_empty_sheet_is_an_empty_file():
    assert to_csv(xlsx({}), "xlsx") == b""


def test_merged_cells_keep_the_top_left_value_only():
    import openpyxl, io
    wb = openpyxl.Workbook()
    ws = wb.active
    ws["A1"], ws["B1"], ws["B2"] = "merged", "x", 1
    ws.merge_cells("A1:A2")
    buf = io.BytesIO()
    wb.save(buf)
    assert to_csv(buf.getvalue(), "xlsx") == b'"merged","x"\n,1\n'


def test_first_sheet_in_workbook_order():
    assert to_csv(xlsx({"A1": "first"}, extra_sheets=2), "xlsx") == b'"first"\n'


def test_sheet_over_the_cell_limit_is_unprocessable():
    """The declared dimension is checked before the cells are read."""
    import io
    data = xlsx({"A1": 1, "B2": 2})
    import zipfile, re
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            part = src.read(info.filename)
            if info.filename == "xl/worksheets/sheet1.xml":
                part = re.sub(rb'<dimension ref="[^"]*"', b'<dimension ref="A1:XFD1048576"', part)
            dst.writestr(info, part)
    with pytest.raises(Unprocessable, match="limit"):
        to_csv(out.getvalue(), "xlsx")
    assert MAX_CELLS == 2_000_000


def test_not_a_spreadsheet_is_unprocessable():
    with pytest.raises(Unprocessable):
        to_csv(b"\xff\xd8\xff\xe0JFIF not really", "xlsx")
    with pytest.raises(Unprocessable):
        to_csv(b"\xff\xd8\xff\xe0JFIF not really", "xls")


@pytest.mark.parametrize("value, fmt, expected", [
    (100.0, None, b"100\n"),
    (1.7, None, b"1.7\n"),
    (1e-05, None, b"1.0e-05\n"),
    ("a \"quoted\", text", None, b'"a ""quoted"", text"\n'),
    (True, None, b'"true"\n'),
    (45000.0, "yyyy-mm-dd", b"2023-03-15\n"),
    (45000.75, "yyyy-mm-dd", b"2023-03-15\n"),
    (45000.5, "yyyy-mm-dd hh:mm:ss", b"2023-03-15T12:00:00+00:00\n"),
    (0.5, "hh:mm:ss", b"12:00:00\n"),
])
def test_xls_cell(value, fmt, expected):
    assert to_csv(xls({(0, 0): value}, {(0, 0): fmt} if fmt else None), "xls") == expected


def test_xls_error_cells():
    """Error cells are written unquoted, as their Excel text."""
    import io
    wb = xlwt.Workbook()
    ws = wb.add_sheet("Sheet1")
    ws.row(0).set_cell_error(0, "#DIV/0!")
    ws.write(0, 1, 1)
    ws.row(1).set_cell_error(1, 0x2A)
    buf = io.BytesIO()
    wb.save(buf)
    assert to_csv(buf.getvalue(), "xls") == b"#DIV/0!,1\n,#N/A\n"


def test_xls_range_and_padding():
    assert to_csv(xls({(1, 1): "x", (2, 0): 3.5}), "xls") == b',\n,"x"\n3.5,\n'


@pytest.mark.parametrize("code, kind", [
    ("yyyy-mm-dd", "date"), ("dd/mm/yyyy hh:mm", "datetime"), ("h:mm:ss", "time"), ("mm:ss", "time"),
    ("mmm-yy", "date"), ("[$-409]d-mmm-yy", "date"), ("[h]:mm", "time"), ("0.00", None), ("General", None),
    ('0.0 "days"', None), ("[Red]#,##0", None),
])
def test_format_kind(code, kind):
    assert format_kind(code) == kind


_values = st.one_of(st.floats(), st.floats(min_value=-1e6, max_value=1e6).map(lambda v: round(v, 3)), st.integers(),
                    st.integers(-2**60, 2**60).map(float), st.dates(), st.sampled_from([0.0, -0.0, 1e-05, 1e16, 2.0**53, 1e-4, 5e-324]))


@settings(max_examples=3000, deadline=None)
@given(st.lists(_values, max_size=60))
def test_the_fast_row_writer_agrees_with_the_cell_by_cell_one(row):
    """orjson's line for a row of numbers and dates is byte for byte the cell-by-cell line (§5), or it declines."""
    try:
        expected = spreadsheet._line(row).encode()
    except spreadsheet._Inexact:
        expected = None
    fast = spreadsheet._fast_line(row)
    assert fast is None or fast == expected, (row, fast, expected)


def test_the_fast_row_writer_takes_the_usual_amr_row():
    """A meter number, a date and half-hourly readings: written by the fast path, as §5 writes them."""
    row = [2200013680374.0, date(2024, 3, 15), 0.0, 1.5, 25.577, 100.0, 0.30000000000000004, 12]
    assert spreadsheet._fast_line(row) == b"2200013680374,2024-03-15,0,1.5,25.577,100,0.30000000000000004,12"
    assert spreadsheet._fast_line([1e-05, 1.0]) is None and spreadsheet._fast_line(["text", 1.0]) is None
