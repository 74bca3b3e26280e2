"""Supplier mail as it really comes: disguised files, TNEF, ods and xlsb, inline logos, forwarded mail.

Each case goes through the worker into real buckets (both backends) and is
judged by the keys and bytes it leaves there.
"""

import io
import struct
import zipfile
from datetime import date
from email.message import EmailMessage
from pathlib import Path

import pytest

from conftest import bucket_contents, ingest
from esmail import mail
from sheets import ods, xls, xlsb, xlsx

FOLDER = "sheffield/20250323-101112"
SEED = Path(__file__).parents[2] / "shared" / "seed-samples"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


def message(*files: tuple[str, bytes], body: str = "see attached") -> bytes:
    msg = EmailMessage()
    msg["To"] = "sheffield@datafeeds.example.org"
    msg.set_content(body)
    for name, data in files:
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return bytes(msg)


async def amr_data_of(config, store, raw: bytes) -> dict[str, bytes]:
    await ingest(config, store, raw, ["sheffield"])
    return await bucket_contents(store, config.buckets.amr_data)


def tnef(*files: tuple[str, bytes]) -> bytes:
    """A winmail.dat as Outlook writes it: signature, key, then attachment attributes (level 2), each checksummed."""
    def attribute(level: int, kind: int, ident: int, data: bytes) -> bytes:
        return struct.pack("<BHHI", level, ident, kind, len(data)) + data + struct.pack("<H", sum(data) & 0xFFFF)

    out = struct.pack("<IH", 0x223E9F78, 1) + attribute(1, 0x0009, 0x9006, struct.pack("<I", 0x00010000))
    for name, data in files:
        out += attribute(2, 0x0006, 0x9002, b"\x01\x00" + b"\xff" * 12)  # attAttachRendData starts an attachment
        out += attribute(2, 0x0001, 0x8010, name.encode() + b"\x00")  # attAttachTitle
        out += attribute(2, 0x0006, 0x800F, data)  # attAttachData
    return out


async def test_an_xls_that_is_an_html_table_becomes_its_csv(config, store, caplog):
    page = (b"<html><head><meta charset='utf-8'></head><body><p>Report</p><table border=1>"
            b"<tr><th>MPAN</th><th>Date</th><th colspan=2>kWh</th></tr>"
            b"<tr><td>2200013680374</td><td>15/03/2023</td><td>1.5</td><td>&pound;2 &amp; &quot;more&quot;</td></tr>"
            b"<tr><td></td><td>caf\xc3\xa9<br>line two</td></tr></table>"
            b"<table><tr><td>a second table is ignored</td></tr></table></body></html>")
    with caplog.at_level("INFO", logger="esmail.worker"):
        assert await amr_data_of(config, store, message(("export.xls", page))) == {
            f"{FOLDER}/export.xls.csv": '"MPAN","Date","kWh",\n"2200013680374","15/03/2023","1.5","£2 & ""more"""\n,"café\nline two",,\n'.encode(),
        }
    assert "sheffield/20250323-101112/export.xls.csv, 93 bytes (html table, named .xls)" in caplog.text  # the rule that decided


async def test_an_xls_or_xlsx_that_is_csv_or_tab_separated_text_becomes_normalised_text(config, store):
    raw = message(("export.xls", b"MPAN,kWh\r\n123,1.5\r\n\r\n"), ("export.xlsx", b"MPAN\tkWh\r\n123\t\xa31.5\r\n"))
    assert await amr_data_of(config, store, raw) == {
        f"{FOLDER}/export.xls.csv": b"MPAN,kWh\n123,1.5\n",
        f"{FOLDER}/export.xlsx.csv": "MPAN\tkWh\n123\t£1.5\n".encode(),
    }


async def test_files_with_no_or_an_unknown_extension_are_routed_by_their_magic_bytes(config, store):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("inner.csv", b"a,b\r\n")
    raw = message(("report", xlsx({"A1": "MPAN", "B1": 2})), ("export.dat", xls({(0, 0): "xls", (0, 1): 3.5})),
                  ("download.bin", archive.getvalue()))
    assert await amr_data_of(config, store, raw) == {
        f"{FOLDER}/report.csv": b'"MPAN",2\n',
        f"{FOLDER}/export.dat.csv": b'"xls",3.5\n',
        f"{FOLDER}/inner.csv": b"a,b\n",
    }


async def test_a_csv_that_is_really_an_xlsx_is_converted_and_keeps_its_name(config, store):
    raw = message(("export.csv", xlsx({"A1": "MPAN", "B1": 1.25})), ("export.CSV.xls", xlsx({"A1": "x"})))
    assert await amr_data_of(config, store, raw) == {
        f"{FOLDER}/export.csv": b'"MPAN",1.25\n',
        f"{FOLDER}/export.CSV.xls.csv": b'"x"\n',
    }


async def test_a_genuinely_unknown_file_still_goes_to_unprocessable_unchanged(config, store):
    raw = message(("photo.jpg", b"\xff\xd8\xff\xe0JFIF"), ("export.xlsx", b"\xff\xd8\xff\xe0 not a workbook\x00\x01\x02" * 20),
                  ("notes", b"plain text with no extension\n"))
    assert await amr_data_of(config, store, raw) == {}
    assert await bucket_contents(store, config.buckets.unprocessable) == {
        f"{FOLDER}/photo.jpg": b"\xff\xd8\xff\xe0JFIF",
        f"{FOLDER}/export.xlsx": b"\xff\xd8\xff\xe0 not a workbook\x00\x01\x02" * 20,
        f"{FOLDER}/notes": b"plain text with no extension\n",
    }


async def test_ods_and_xlsb_become_csv_by_the_same_cell_rules(config, store):
    rows = [["MPAN", "Date", "kWh", None], ["2200013680374", date(2023, 3, 15), 1.5, True], [None, None, 100.0, None]]
    expected = b'"MPAN","Date","kWh",\n"2200013680374",2023-03-15,1.5,"true"\n,,100,\n'
    raw = message(("export.ods", ods(rows)), ("export.xlsb", xlsb(rows)))
    assert await amr_data_of(config, store, raw) == {f"{FOLDER}/export.ods.csv": expected, f"{FOLDER}/export.xlsb.csv": expected}


async def test_a_tnef_winmail_dat_is_unwrapped_and_its_files_routed(config, store):
    wrapped = tnef(("readings.csv", b"MPAN,kWh\r\n1,2\r\n"), ("export.xlsx", xlsx({"A1": "inside"})), ("logo.png", PNG))
    msg = EmailMessage()
    msg["To"] = "sheffield@datafeeds.example.org"
    msg.set_content("from Outlook")
    msg.add_attachment(wrapped, maintype="application", subtype="ms-tnef", filename="winmail.dat")
    assert await amr_data_of(config, store, bytes(msg)) == {
        f"{FOLDER}/readings.csv": b"MPAN,kWh\n1,2\n",
        f"{FOLDER}/export.xlsx.csv": b'"inside"\n',
    }
    assert await bucket_contents(store, config.buckets.unprocessable) == {f"{FOLDER}/logo.png": PNG}


async def test_a_tnef_with_no_files_goes_to_unprocessable(config, store):
    wrapped = tnef()
    assert await amr_data_of(config, store, message(("winmail.dat", wrapped))) == {}
    assert await bucket_contents(store, config.buckets.unprocessable) == {f"{FOLDER}/winmail.dat": wrapped}


async def test_inline_signature_images_are_skipped_not_unprocessable(config, store, caplog):
    msg = EmailMessage()
    msg["To"] = "sheffield@datafeeds.example.org"
    msg.set_content("readings attached")
    msg.add_alternative('<p>readings attached</p><img src="cid:logo@x">', subtype="html")
    html = msg.get_payload()[1]
    html.add_related(PNG, maintype="image", subtype="png", cid="<logo@x>", disposition="inline", filename="image001.png")
    html.add_related(PNG, maintype="image", subtype="png", cid="<logo2@x>", disposition="inline")
    msg.add_attachment(b"a,b\r\n", maintype="text", subtype="csv", filename="export.csv")
    msg.add_attachment(PNG, maintype="image", subtype="png", filename="chart.png")  # attached, not inline: kept
    with caplog.at_level("INFO", logger="esmail.worker"):
        assert await amr_data_of(config, store, bytes(msg)) == {f"{FOLDER}/export.csv": b"a,b\n"}
    assert await bucket_contents(store, config.buckets.unprocessable) == {f"{FOLDER}/chart.png": PNG}
    assert "3 objects, " in caplog.text and ", 2 inline images skipped" in caplog.text


async def test_a_message_forwarded_as_an_attachment_gives_its_files(config, store):
    inner = EmailMessage()
    inner["To"] = "someone@example.com"
    inner["Subject"] = "readings"
    inner.set_content("attached")
    inner.add_attachment(b"MPAN\r\n1\r\n", maintype="text", subtype="csv", filename="inner.csv")
    outer = EmailMessage()
    outer["To"] = "sheffield@datafeeds.example.org"
    outer.set_content("FYI")
    outer.add_attachment(inner)
    assert await amr_data_of(config, store, bytes(outer)) == {f"{FOLDER}/inner.csv": b"MPAN\n1\n"}


@pytest.mark.skipif(not SEED.is_dir(), reason="../shared/seed-samples is absent (it sits beside the checkout in CI)")
@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_the_old_pipelines_forwarded_mail_keeps_its_keys(config, store):
    """X-Forwarded-To gives the prefix when there is no envelope, as in the old pipeline: sheffield/{ts}/{entry}."""
    raw = (SEED / "files" / "sheffield-fwd.txt").read_bytes()
    prefix = mail.header_prefix(mail.parse_headers(raw), ())
    await ingest(config, store, raw, [prefix])
    amr_data = await bucket_contents(store, config.buckets.amr_data)
    assert list(amr_data) == [f"{FOLDER}/4003063_9232_Export_20190227_120407_366.csv"]
    assert amr_data[f"{FOLDER}/4003063_9232_Export_20190227_120407_366.csv"].startswith(b"siteRef,MPAN,ConsumptionDate,")
