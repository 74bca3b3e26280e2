"""Builders for spreadsheet fixtures: real xlsx (openpyxl) and xls (xlwt) files made in the tests."""

from __future__ import annotations

import io
import re
import zipfile

import openpyxl
import xlwt


def xlsx(cells: dict[str, object], formats: dict[str, str] | None = None, cached: dict[str, str] | None = None,
         extra_sheets: int = 0) -> bytes:
    """An xlsx whose first sheet holds `cells` (A1 refs); `cached` gives formula cells a cached value (raw XML)."""
    wb = openpyxl.Workbook()
    ws = wb.active
    for ref, value in cells.items():
        ws[ref] = value
        if formats and ref in formats:
            ws[ref].number_format = formats[ref]
    for i in range(extra_sheets):
        wb.create_sheet(f"Other{i}")["A1"] = "not the first sheet"
    buf = io.BytesIO()
    wb.save(buf)
    return patch_sheet(buf.getvalue(), cached or {})


def patch_sheet(data: bytes, cached: dict[str, str]) -> bytes:
    """Give formula cells a cached value, as Excel would have saved it (`t="str"` etc. go in the value)."""
    if not cached:
        return data
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            part = src.read(info.filename)
            if info.filename == "xl/worksheets/sheet1.xml":
                for ref, (kind, value) in cached.items():
                    t = f' t="{kind}"' if kind else ""
                    part = re.sub(rb'<c r="' + ref.encode() + rb'"([^>]*)><f>(.*?)</f><v ?/>', lambda m: b'<c r="' + ref.encode() + b'"' + m.group(1) + t.encode() + b"><f>" + m.group(2) + b"</f><v>" + value.encode() + b"</v>", part)
            dst.writestr(info, part)
    return out.getvalue()


def xls(cells: dict[tuple[int, int], object], formats: dict[tuple[int, int], str] | None = None) -> bytes:
    """An xls (BIFF8) whose first sheet holds `cells` at (row, col)."""
    wb = xlwt.Workbook()
    ws = wb.add_sheet("Sheet1")
    for (r, c), value in cells.items():
        fmt = (formats or {}).get((r, c))
        if fmt:
            ws.write(r, c, value, xlwt.easyxf(num_format_str=fmt))
        else:
            ws.write(r, c, value)
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()
