"""DESIGN §4 routing and the zip limits that protect the host."""

import io
import zipfile


from esmail import chain
from esmail.chain import AMR_DATA, UNPROCESSABLE, route
from sheets import xls, xlsx

CSV = b"a,b\r\n1,2\r\n"


def make_zip(entries: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def routed(outputs):
    return [(o.bucket, o.name, o.data) for o in outputs]


def test_csv_and_cns_are_normalised():
    assert routed(route("Export.CSV", CSV)) == [(AMR_DATA, "Export.CSV", b"a,b\n1,2\n")]
    assert routed(route("x.cns", CSV)) == [(AMR_DATA, "x.cns", b"a,b\n1,2\n")]


def test_spreadsheets_get_csv_appended():
    assert routed(route("export.XLSX", xlsx({"A1": 1}))) == [(AMR_DATA, "export.XLSX.csv", b"1\n")]
    assert routed(route("export.xls", xls({(0, 0): "a"}))) == [(AMR_DATA, "export.xls.csv", b'"a"\n')]


def test_anything_else_is_unprocessable_unchanged():
    png = b"\x89PNG\r\n\x1a\n rest"
    [out] = route("image.png", png)
    assert (out.bucket, out.name, out.data) == (UNPROCESSABLE, "image.png", png) and out.reason


def test_broken_spreadsheet_is_unprocessable_unchanged():
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(100)
    [out] = route("image.xlsx", jpeg)
    assert (out.bucket, out.name, out.data) == (UNPROCESSABLE, "image.xlsx", jpeg)


def test_zip_entries_keep_their_paths_and_are_routed_again():
    data = make_zip({"sub/a.csv": CSV, "b.xlsx": xlsx({"A1": "x"}), "logo.png": b"png", "dir/": b""})
    assert routed(route("export.zip", data)) == [
        (AMR_DATA, "sub/a.csv", b"a,b\n1,2\n"),
        (AMR_DATA, "b.xlsx.csv", b'"x"\n'),
        (UNPROCESSABLE, "logo.png", b"png"),
    ]


def test_nested_zips_to_depth_three():
    inner = make_zip({"deep.csv": CSV})
    level2 = make_zip({"inner/inner.zip": inner})
    assert routed(route("outer.zip", level2)) == [(AMR_DATA, "inner/deep.csv", b"a,b\n1,2\n")]
    level3 = make_zip({"l3.zip": level2})
    assert routed(route("outer.zip", level3))[0][:2] == (AMR_DATA, "inner/deep.csv")
    level4 = make_zip({"l4.zip": level3})
    [out] = route("outer.zip", level4)  # outer 1, l4 2, l3 3, inner.zip 4
    assert (out.bucket, out.name, out.data) == (UNPROCESSABLE, "inner/inner.zip", inner) and "nested" in out.reason


def test_traversal_names_stay_inside():
    data = make_zip({"../../etc/passwd.csv": CSV, "/abs/x.csv": CSV, "a/./b/../c.csv": CSV})
    assert [o.name for o in route("z.zip", data)] == ["etc/passwd.csv", "abs/x.csv", "a/b/c.csv"]


def test_too_many_entries():
    data = make_zip({f"{i}.csv": CSV for i in range(chain.MAX_ZIP_ENTRIES + 1)})
    [out] = route("many.zip", data)
    assert out.bucket == UNPROCESSABLE and out.data == data and out.reason == "over 1,000 files inside, nested archives included"


def test_zip_bomb_by_ratio():
    """A highly compressed entry over 1 MB is refused while it is read, not after."""
    data = make_zip({"bomb.csv": b"0" * 5_000_000})
    [out] = route("bomb.zip", data)
    assert out.bucket == UNPROCESSABLE and out.data == data and "100:1" in out.reason


def test_zip_bomb_by_total_size(monkeypatch):
    monkeypatch.setattr(chain, "MAX_ZIP_TOTAL", 300_000)
    data = make_zip({"a.csv": bytes(range(256)) * 800, "b.csv": bytes(range(256)) * 800}, zipfile.ZIP_STORED)
    [out] = route("big.zip", data)
    assert out.bucket == UNPROCESSABLE and "expands" in out.reason


def test_corrupt_zip_is_unprocessable():
    data = make_zip({"a.csv": CSV * 100})
    broken = data[:40] + b"\x00" * 20 + data[60:]
    [out] = route("broken.zip", broken)
    assert out.bucket == UNPROCESSABLE and out.data == broken


def test_a_zip_named_as_a_workbook_is_tried_as_one_not_unzipped():
    """A zip named .xlsx stays one file: read as a workbook, or (here) unprocessable whole, never unzipped into its parts."""
    data = make_zip({"notes.txt": b"not a workbook part", "data.csv": CSV})
    [out] = route("export.xlsx", data)
    assert (out.bucket, out.name, out.data) == (UNPROCESSABLE, "export.xlsx", data) and out.reason.startswith("cannot read the")
