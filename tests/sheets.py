"""Builders for spreadsheet fixtures: real xlsx (openpyxl) and xls (xlwt) files made in the tests."""

from __future__ import annotations

import datetime
import io
import struct
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


def xlsb(rows: list[list[object]]) -> bytes:
    """A one-sheet xlsb written record by record ([MS-XLSB]); no library writes xlsb.

    Strings are BrtCellSt, numbers BrtCellReal, booleans BrtCellBool, and
    dates BrtCellReal (Excel serial) in a cell style with the built-in date
    format 14; None leaves the cell out.
    """
    def record(kind: int, body: bytes = b"") -> bytes:
        head = bytes([kind]) if kind < 0x80 else bytes([(kind & 0x7F) | 0x80, kind >> 7])
        size, length = len(body), b""
        while True:
            length += bytes([(size & 0x7F) | (0x80 if size > 0x7F else 0)])
            size >>= 7
            if not size:
                return head + length + body

    def wide(text: str) -> bytes:
        return struct.pack("<I", len(text.encode("utf-16-le")) // 2) + text.encode("utf-16-le")

    cells = b""
    for r, row in enumerate(rows):
        cells += record(0, struct.pack("<IIHHBBB", r, 0, 300, 0, 0, 0, 0) + b"\x00" * 4)  # BrtRowHdr
        for c, value in enumerate(row):
            if value is None:
                continue
            if isinstance(value, bool):
                cells += record(4, struct.pack("<IIB", c, 0, value))
            elif isinstance(value, (int, float)):
                cells += record(5, struct.pack("<IId", c, 0, float(value)))
            elif isinstance(value, datetime.date):
                cells += record(5, struct.pack("<IId", c, 1, (value - datetime.date(1899, 12, 30)).days))
            else:
                cells += record(6, struct.pack("<II", c, 0) + wide(str(value)))
    width = max(map(len, rows), default=1)
    sheet = (record(129) + record(148, struct.pack("<IIII", 0, max(len(rows) - 1, 0), 0, max(width - 1, 0)))
             + record(145) + cells + record(146) + record(130))
    book = (record(131) + record(143) + record(156, struct.pack("<II", 0, 1) + wide("rId1") + wide("Sheet1"))
            + record(144) + record(132))
    xf = struct.pack("<HHHHHBBHBB", 0xFFFF, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    date_xf = struct.pack("<HHHHHBBHBB", 0, 14, 0, 0, 0, 0, 0, 0, 0, 0)
    styles = record(278) + record(617, struct.pack("<I", 2)) + record(47, xf) + record(47, date_xf) + record(618) + record(279)
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    parts = {
        "[Content_Types].xml": '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="bin" ContentType="application/vnd.ms-excel.sheet.binary.macroEnabled.main"/>'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/></Types>',
        "_rels/.rels": f'<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        f'<Relationship Id="rId1" Type="{rel}/officeDocument" Target="xl/workbook.bin"/></Relationships>',
        "xl/_rels/workbook.bin.rels": f'<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        f'<Relationship Id="rId1" Type="{rel}/worksheet" Target="worksheets/sheet1.bin"/>'
        f'<Relationship Id="rId2" Type="{rel}/styles" Target="styles.bin"/></Relationships>',
        "xl/workbook.bin": book,
        "xl/worksheets/sheet1.bin": sheet,
        "xl/styles.bin": styles,
    }
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in parts.items():
            archive.writestr(name, content)
    return out.getvalue()


def ods(rows: list[list[object]]) -> bytes:
    """A one-sheet OpenDocument spreadsheet: the zip of XML parts that LibreOffice writes, cut to what a reader needs."""
    def cell(value: object) -> str:
        if value is None:
            return "<table:table-cell/>"
        if isinstance(value, bool):
            return f'<table:table-cell office:value-type="boolean" office:boolean-value="{str(value).lower()}"/>'
        if isinstance(value, (int, float)):
            return f'<table:table-cell office:value-type="float" office:value="{value}"/>'
        if isinstance(value, datetime.date):
            return f'<table:table-cell office:value-type="date" office:date-value="{value.isoformat()}"/>'
        text = str(value).replace("&", "&amp;").replace("<", "&lt;")
        return f'<table:table-cell office:value-type="string"><text:p>{text}</text:p></table:table-cell>'

    body = "".join("<table:table-row>" + "".join(map(cell, row)) + "</table:table-row>" for row in rows)
    ns = ('xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" '
          'xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0" '
          'xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0"')
    content = (f'<?xml version="1.0" encoding="UTF-8"?><office:document-content {ns} office:version="1.2">'
               f'<office:body><office:spreadsheet><table:table table:name="Sheet1">{body}</table:table>'
               f'<table:table table:name="Other"><table:table-row><table:table-cell office:value-type="string">'
               f'<text:p>not the first sheet</text:p></table:table-cell></table:table-row></table:table>'
               f'</office:spreadsheet></office:body></office:document-content>')
    manifest = ('<?xml version="1.0" encoding="UTF-8"?><manifest:manifest '
                'xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0" manifest:version="1.2">'
                '<manifest:file-entry manifest:full-path="/" manifest:media-type="application/vnd.oasis.opendocument.spreadsheet"/>'
                '<manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml"/></manifest:manifest>')
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("mimetype", "application/vnd.oasis.opendocument.spreadsheet")  # first and stored, as the format asks
        archive.writestr("content.xml", content, zipfile.ZIP_DEFLATED)
        archive.writestr("META-INF/manifest.xml", manifest, zipfile.ZIP_DEFLATED)
    return out.getvalue()
