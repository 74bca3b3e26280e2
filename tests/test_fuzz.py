"""A property-based fuzzer (hypothesis): real-shaped messages, mutated, through the worker into a real local store.

Mutations: bytes flipped, truncated, a slice duplicated, headers reordered,
both in the raw message and in the files before they are attached. For
every input the invariants below must hold. CI runs ESMAIL_FUZZ_EXAMPLES
(default 200) examples; `python benchmarks/fuzz.py` runs many more.
"""

import asyncio
import io
import os
import re
import tempfile
import zipfile
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st
from tnefparse import TNEF

from conftest import RECEIVED, bucket_contents
from esmail import mail
from esmail.config import Buckets, Config, SpoolConfig, StorageConfig, WorkerConfig
from esmail.spool import Spool
from esmail.store import open_store
from esmail.worker import MAX_CRASHES, Worker, process_pool
from sheets import xls, xlsx
from test_chain import make_zip
from test_real_world_mail import tnef

EXAMPLES = int(os.environ.get("ESMAIL_FUZZ_EXAMPLES", "200"))
POOL = [process_pool(Config(worker=WorkerConfig(processes=1)))]
FOLDER = "fuzz/20250323-101112/"
CSV = b"MPAN,Date,00:30,01:00\r\n2200013680374,2023-03-15,1.5,2.25\r\n\r\n2200013680375,2023-03-15,0.5,0\r\n"


SEED_FILES = {
    "export.csv": CSV,
    "export.xlsx": xlsx({"A1": "MPAN", "B1": 1.5, "C1": "=1+1", "A2": "café", "B2": 45000.5}),
    "export.xls": xls({(0, 0): "MPAN", (0, 1): 2.5, (1, 0): "x"}),
    "readings.zip": make_zip({"a.csv": CSV, "sub/b.csv": CSV, "inner.zip": make_zip({"c.csv": CSV})}),
    "portal.xls": b"<html><table><tr><td>MPAN</td><td>1.5</td></tr><tr><td colspan=2>x</td></tr></table></html>",
    "winmail.dat": tnef(("inside.csv", CSV)),
    "logo.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
}


def build(files: list[tuple[str, bytes]], forwarded: bool) -> bytes:
    msg = EmailMessage()
    msg["From"] = "meters@supplier.example"
    msg["To"] = "fuzz@datafeeds.example.org"
    msg["Subject"] = "readings"
    msg.set_content("see attached")
    for name, data in files:
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    if forwarded:
        outer = EmailMessage()
        outer["To"] = "fuzz@datafeeds.example.org"
        outer.set_content("fwd")
        outer.add_attachment(msg)
        msg = outer
    for n, part in enumerate(p for p in msg.walk() if p.is_multipart()):
        part.set_boundary(f"==boundary-{n}==")  # fixed, so an example is the same bytes every run
    return bytes(msg)


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """`data` with a few random edits: flips, a truncation, a duplicated slice."""
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "duplicate", "insert"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "duplicate":
            end = draw(st.integers(at, min(len(data), at + 4096)))
            data[at:at] = data[at:end]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


@st.composite
def messages(draw) -> bytes:
    names = draw(st.lists(st.sampled_from(sorted(SEED_FILES)), min_size=0, max_size=4))
    files = [(name, draw(mutated(SEED_FILES[name])) if draw(st.booleans()) else SEED_FILES[name]) for name in names]
    raw = build(files, draw(st.booleans()))
    if draw(st.booleans()):  # reorder the header lines
        head, sep, body = raw.partition(b"\n\n")
        lines = re.split(rb"\n(?![ \t])", head)
        raw = b"\n".join(draw(st.permutations(lines))) + sep + body
    if draw(st.booleans()):
        raw = draw(mutated(raw))
    return raw


def originals(raw: bytes) -> set[bytes]:
    """Every byte string that may rightly land in unprocessable: the message, its files, and files inside those (an oracle)."""
    found = {raw}
    try:
        pending = [att.data for att in mail.attachments(mail.parse(raw))]
    except RecursionError:
        return found
    for _ in range(5):  # nesting levels
        inner = []
        for data in pending:
            found.add(data)
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as archive:
                    inner += [archive.read(info) for info in archive.infolist() if info.file_size < 50_000_000]
            except Exception:
                pass
            try:
                inner += [att.data for att in TNEF(data, do_checksum=False).attachments if att.data]
            except Exception:
                pass
        pending = inner
    return found


def check_invariants(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(storage=StorageConfig(path=Path(tmp) / "data"), spool=SpoolConfig(path=Path(tmp) / "spool"),
                        worker=WorkerConfig(processes=1), buckets=replace(Buckets(), inbox="inbox", amr_data="amr-data", unprocessable="unprocessable"))

        async def run() -> tuple[str, Spool, dict]:
            store = open_store(config)
            spool = Spool(config.spool.path)
            envelope = spool.accept(raw, ["fuzz"], received=RECEIVED, origin="ingest")
            worker = Worker(config, spool, store)
            worker.executor = POOL[0]  # conversions in memory-capped processes, as in the daemon: a crash there is not ours
            for _ in range(MAX_CRASHES + 1):  # the scheduler's loop, without the waiting
                if await worker.attempt(envelope.id) is None:
                    break
            POOL[0] = worker.executor  # renewed if a conversion killed it
            buckets = {name: await bucket_contents(store, name) for name in ("inbox", "amr-data", "unprocessable")}
            await store.close()
            return envelope.id, spool, buckets

        entry_id, spool, buckets = asyncio.run(run())
        assert spool.pending() == []
    assert buckets["inbox"] == {f"{FOLDER}{entry_id}.eml": raw}
    for bucket, objects in buckets.items():
        for key in objects:
            assert key.startswith(FOLDER), key
            assert all(segment not in ("", ".", "..") for segment in key.split("/")), key
            assert not re.search(r"[\x00-\x1f\x7f]", key), key
    for key, data in buckets["amr-data"].items():
        text = data.decode("utf-8")
        assert "\x00" not in text and "\r" not in text, key
        assert not text or (text.endswith("\n") and all(line.strip() for line in text[:-1].split("\n"))), key
    allowed = originals(raw)
    for key, data in buckets["unprocessable"].items():
        assert data in allowed, f"{key}: bytes that are not an original"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(messages())
def test_mutated_messages_keep_the_invariants(raw):
    check_invariants(raw)


@settings(max_examples=max(EXAMPLES // 4, 20), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_keep_the_invariants(raw):
    check_invariants(raw)
