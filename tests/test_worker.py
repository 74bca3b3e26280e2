"""The whole ingest path on both backends: spool → worker → objects in the right buckets with the right keys."""

import io
import zipfile
from email.message import EmailMessage

from conftest import RECEIVED, bucket_contents, ingest
from esmail.spool import Spool
from esmail.worker import Worker
from sheets import xls, xlsx

CSV = b"MPAN,00:30\r\n2200013680374,1.5\r\n\r\n"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


def feed_message() -> bytes:
    """A message with a zip of CSVs, an xlsx, an xls, a png and a forwarded-as-attachment message."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.csv", CSV)
        z.writestr("sub/b.csv", CSV)
    inner = EmailMessage()
    inner["To"] = "someone@example.com"
    inner.set_content("forwarded")
    inner.add_attachment(CSV, maintype="text", subtype="csv", filename="export.csv")
    msg = EmailMessage()
    msg["To"] = "sheffield@datafeeds.example.org"
    msg.set_content("see attached")
    msg.add_attachment(buf.getvalue(), maintype="application", subtype="zip", filename="readings.zip")
    msg.add_attachment(xlsx({"A1": "MPAN", "B1": 1.5}), maintype="application", subtype="octet-stream", filename="export.xlsx")
    msg.add_attachment(xls({(0, 0): "MPAN", (0, 1): 2.5}), maintype="application", subtype="vnd.ms-excel", filename="export.xls")
    msg.add_attachment(PNG, maintype="image", subtype="png", filename="logo.png")
    msg.add_attachment(CSV, maintype="text", subtype="csv", filename="export.csv")
    msg.add_attachment(inner)
    return bytes(msg)


async def test_feed_message_lands_in_the_right_buckets(config, store):
    raw = feed_message()
    envelope, stored, spool = await ingest(config, store, raw, ["sheffield"])
    folder = "sheffield/20250323-101112"
    assert await bucket_contents(store, config.buckets.amr_data) == {
        f"{folder}/a.csv": b"MPAN,00:30\n2200013680374,1.5\n",
        f"{folder}/sub/b.csv": b"MPAN,00:30\n2200013680374,1.5\n",
        f"{folder}/export.xlsx.csv": b'"MPAN",1.5\n',
        f"{folder}/export.xls.csv": b'"MPAN",2.5\n',
        f"{folder}/export.csv": b"MPAN,00:30\n2200013680374,1.5\n",
        f"{folder}/export-2.csv": b"MPAN,00:30\n2200013680374,1.5\n",
    }
    assert await bucket_contents(store, config.buckets.unprocessable) == {f"{folder}/logo.png": PNG}
    assert await bucket_contents(store, config.buckets.inbox) == {f"{folder}/{envelope.id}.eml": raw}
    assert spool.pending() == [] and sorted(s.key for s in stored) == sorted(
        [f"{folder}/{envelope.id}.eml", f"{folder}/logo.png"] + [f"{folder}/{n}" for n in ("a.csv", "sub/b.csv", "export.xlsx.csv", "export.xls.csv", "export.csv", "export-2.csv")])


async def test_two_recipients_two_prefixes(config, store):
    await ingest(config, store, feed_message(), ["sheffield", "leeds"])
    keys = await store.keys(config.buckets.amr_data)
    assert {k.split("/")[0] for k in keys} == {"sheffield", "leeds"} and len(keys) == 12


async def test_second_message_in_the_same_second_gets_its_own_folder(config, store):
    spool = Spool(config.spool.path)
    envelope = spool.accept(feed_message(), ["sheffield"], received=RECEIVED)
    other = spool.accept(feed_message(), ["sheffield"], received=RECEIVED)
    assert (envelope.folders, other.folders) == ({"sheffield": "20250323-101112"}, {"sheffield": "20250323-101112-2"})
    restarted = Spool(config.spool.path).accept(b"x", ["sheffield"], received=RECEIVED)  # pending entries are remembered
    assert restarted.folders == {"sheffield": "20250323-101112-3"}


async def test_replay_writes_the_same_keys_once(config, store):
    """A crash after storing but before removing the entry: processing again adds nothing."""
    raw = feed_message()
    spool = Spool(config.spool.path)
    envelope = spool.accept(raw, ["sheffield"], received=RECEIVED)
    entry = (spool.queue / f"{envelope.id}.msg").read_bytes()
    first = await Worker(config, spool, store).process(envelope.id)
    (spool.queue / f"{envelope.id}.msg").write_bytes(entry)  # as if the removal never happened
    second = await Worker(config, Spool(config.spool.path), store).process(envelope.id)
    assert [s.key for s in first] == [s.key for s in second]
    assert len(await store.keys(config.buckets.amr_data)) == 6


async def test_no_usable_recipient_goes_whole_to_unprocessable(config, store):
    raw = b"Subject: nobody\r\n\r\nhello\r\n"
    envelope, stored, _ = await ingest(config, store, raw, [])
    key = f"unknown/20250323-101112/{envelope.id}.eml"
    assert await bucket_contents(store, config.buckets.unprocessable) == {key: raw}
    assert await bucket_contents(store, config.buckets.inbox) == {key: raw}


async def test_junk_that_is_not_mime_is_kept(config, store):
    raw = b"\x00\xff not a message at all \r\n\r\n\x80"
    envelope, _, _ = await ingest(config, store, raw, ["junk"])
    assert await bucket_contents(store, config.buckets.inbox) == {f"junk/20250323-101112/{envelope.id}.eml": raw}
    assert await store.keys(config.buckets.amr_data) == []


async def test_mime_nested_too_deep_to_parse_is_one_unprocessable_file(config, store, caplog):
    """MIME nested 3,000 deep exhausts the parser: the raw message is stored whole, as message.eml, and the entry is done."""
    raw = b"To: a@b\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
    raw += b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1) for i in range(3000))
    envelope, stored, spool = await ingest(config, store, raw, ["deep"])
    assert await bucket_contents(store, config.buckets.unprocessable) == {"deep/20250323-101112/message.eml": raw}
    assert await bucket_contents(store, config.buckets.inbox) == {f"deep/20250323-101112/{envelope.id}.eml": raw}
    assert spool.pending() == [] and spool.failed_ids() == []
    assert "is unprocessable: MIME parts nested too deep to parse" in caplog.text


async def test_big_outputs_come_back_from_the_pool_whole_and_leave_nothing_behind(config, store):
    """A CSV over 1 MB returns from the conversion process through a file in the spool's tmp/: stored whole, file gone."""
    rows = b"".join(b"2200013680374,%d.5\r\n" % i for i in range(120_000))  # ~2.3 MB
    msg = EmailMessage()
    msg["To"] = "sheffield@datafeeds.example.org"
    msg.set_content("see attached")
    msg.add_attachment(rows, maintype="text", subtype="csv", filename="big.csv")
    msg.add_attachment(CSV, maintype="text", subtype="csv", filename="small.csv")
    spool = Spool(config.spool.path)
    envelope = spool.accept(bytes(msg), ["sheffield"], received=RECEIVED)
    worker = Worker(config, spool, store, processes=True)
    try:
        await worker.process(envelope.id)
    finally:
        worker.close()
    folder = "sheffield/20250323-101112"
    assert await bucket_contents(store, config.buckets.amr_data) == {
        f"{folder}/big.csv": rows.replace(b"\r\n", b"\n"), f"{folder}/small.csv": b"MPAN,00:30\n2200013680374,1.5\n"}
    assert list(spool.tmp.iterdir()) == [] and spool.pending() == []
