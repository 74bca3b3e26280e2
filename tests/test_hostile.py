"""Hostile input: each attack or broken file gets the right SMTP code or goes to unprocessable, and nothing escapes.

Grouped as docs/security.md is: SMTP, MIME, archives,
spreadsheets, CSV injection, resources. (Links: tests/test_links.py.
Relay attempts, smuggling, long lines, the size limit and timeouts are also
in tests/test_smtp.py.) Every fixture is built here.
"""

import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import replace
from email.message import EmailMessage

import pytest

from conftest import RunningDaemon, bucket_contents, ingest
from esmail import chain
from esmail.chain import UNPROCESSABLE, route
from esmail.spool import Spool
from esmail.worker import Worker
from sheets import xls, xlsx
from test_chain import make_zip

DOMAIN = "datafeeds.example.org"
FOLDER = "sheffield/20250323-101112"
CSV = b"MPAN,kWh\r\n2200013680374,1.5\r\n"
local_only = pytest.mark.parametrize("config", ["local"], indirect=True)


def with_domains(config, **smtp):
    return replace(config, smtp=replace(config.smtp, domains=(DOMAIN,), **smtp))


def spool_is_clean(spool: Spool) -> bool:
    """Nothing half-written and nothing queued: what the server refused left no trace."""
    return not list(spool.tmp.iterdir()) and not spool.pending()


class Session:
    """A raw SMTP client that can send without waiting and reads replies on a thread of its own."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.replies: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        lines = self.sock.makefile("rb")
        try:
            for line in lines:
                self.replies.append(line.rstrip(b"\r\n"))
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_for(self, code: bytes, timeout: float = 30) -> list[bytes]:
        """The replies so far, once one starts with `code` (or the connection closed, or time ran out)."""
        deadline = time.monotonic() + timeout
        while not any(r.startswith(code) for r in self.replies) and self.reader.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.replies

    def close(self) -> None:
        self.sock.close()


# --- SMTP ---------------------------------------------------------------------


@local_only
def test_ten_thousand_pipelined_recipients_get_100_accepted_and_452_for_the_rest(config):
    with RunningDaemon(with_domains(config)) as server:
        session = Session(server.port)
        session.send(b"EHLO attacker.example\r\nMAIL FROM:<a@attacker.example>\r\n")
        session.send(b"".join(b"RCPT TO:<feed%d@%s>\r\n" % (n, DOMAIN.encode()) for n in range(10_000)))
        session.send(b"RSET\r\nQUIT\r\n")
        replies = session.wait_for(b"221", timeout=60)
        session.close()
        rcpt = [r for r in replies if r.startswith((b"250 2.1.5", b"452 4.5.3"))]
        assert len(rcpt) == 10_000
        assert all(r.startswith(b"250 2.1.5") for r in rcpt[:100]) and all(r.startswith(b"452 4.5.3") for r in rcpt[100:])
        assert replies[-1].startswith(b"221")
        with server.smtp() as client:
            assert client.noop()[0] == 250
        assert spool_is_clean(server.spool)


@local_only
def test_a_pipelining_flood_that_never_reads_does_not_hold_up_others(config):
    """A client that sends megabytes of commands and never reads its replies is cut off; others are served meanwhile."""
    with RunningDaemon(with_domains(config, command_timeout=1.0)) as server:
        flood = socket.create_connection(("127.0.0.1", server.port), timeout=0.5)
        sent, served, cut_off = 0, 0, False
        started = time.monotonic()
        while not cut_off and time.monotonic() - started < 60:
            try:
                sent += flood.send(b"NOOP\r\n" * 10_000)
            except TimeoutError:  # the server stopped reading: it waits for us to read its replies
                with server.smtp() as client:
                    client.sendmail("a@b.org", [f"sheffield@{DOMAIN}"], b"Subject: hi\r\n\r\nstill served\r\n")
                served += 1
            except OSError:  # reset: command_timeout passed while it waited, then HANG_UP_GRACE
                cut_off = True
        flood.close()
        assert served > 0
        assert cut_off and sent > 1_000_000, (cut_off, sent)
        with server.smtp() as client:
            assert client.noop()[0] == 250


@local_only
def test_a_client_that_never_ends_data_is_cut_off_and_nothing_is_kept(config):
    with RunningDaemon(with_domains(config, command_timeout=1.0, session_timeout=2.0)) as server:
        session = Session(server.port)
        session.send(b"EHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<sheffield@%s>\r\nDATA\r\n" % DOMAIN.encode())
        started = time.monotonic()
        try:
            while time.monotonic() - started < 10:
                session.send(b"To: a\r\n" + b"x" * 100 + b"\r\n")  # busy, never silent for command_timeout
                time.sleep(0.2)
        except OSError:
            pass
        session.reader.join(10)
        assert any(r.startswith(b"421 4.4.2") for r in session.replies) and time.monotonic() - started < 5, (session.replies[5:], time.monotonic() - started)
        session.close()
        assert spool_is_clean(server.spool)


@local_only
def test_many_idle_connections_hit_the_cap_and_time_out_then_others_get_through(config):
    with RunningDaemon(with_domains(config, max_sessions=20, command_timeout=3.0)) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(200)]
        greetings = [sock.recv(100) for sock in idle]
        assert sum(g.startswith(b"220") for g in greetings) == 20
        assert sum(g.startswith(b"421 4.7.0") for g in greetings) == 180
        time.sleep(3.5)  # the idle sessions time out
        with server.smtp() as client:
            client.sendmail("a@b.org", [f"sheffield@{DOMAIN}"], b"Subject: hi\r\n\r\nserved\r\n")
        for sock in idle:
            sock.close()


@local_only
def test_a_size_lie_at_mail_from_does_not_let_a_huge_data_in(config):
    limit = 20_000
    with RunningDaemon(with_domains(config, max_message_size=limit)) as server:
        session = Session(server.port)
        session.send(b"EHLO x\r\nMAIL FROM:<a@b.org> SIZE=100\r\nRCPT TO:<sheffield@%s>\r\nDATA\r\n" % DOMAIN.encode())
        session.wait_for(b"354")
        session.send(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 1_000 + b".\r\nQUIT\r\n")
        replies = session.wait_for(b"221")
        session.close()
        assert any(r.startswith(b"552 5.3.4") for r in replies), replies
        assert spool_is_clean(server.spool)


# --- MIME ---------------------------------------------------------------------


def feed(*parts: tuple[str, bytes], **headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["To"] = f"sheffield@{DOMAIN}"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("readings")
    for name, data in parts:
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return msg


async def all_objects(config, store) -> dict[str, dict[str, bytes]]:
    return {logical: await bucket_contents(store, config.buckets.named(logical)) for logical in ("amr_data", "unprocessable", "inbox")}


@local_only
async def test_header_lines_of_megabytes_are_kept_and_the_attachment_still_converted(config, store):
    raw = b"Subject: " + b"x" * 3_000_000 + b"\r\nX-Folded: " + b"a\r\n " * 500_000 + b"\r\n" + bytes(feed(("export.csv", CSV)))
    envelope, _, spool = await ingest(config, store, raw, ["sheffield"])
    objects = await all_objects(config, store)
    assert objects["amr_data"] == {f"{FOLDER}/export.csv": b"MPAN,kWh\n2200013680374,1.5\n"}
    assert objects["inbox"] == {f"{FOLDER}/{envelope.id}.eml": raw}


@local_only
async def test_ten_thousand_parts_are_one_unprocessable_message(config, store):
    msg = feed(*[(f"f{n}.csv", CSV) for n in range(10_000)])
    raw = bytes(msg)
    await ingest(config, store, raw, ["sheffield"])
    objects = await all_objects(config, store)
    assert objects["amr_data"] == {} and objects["unprocessable"] == {f"{FOLDER}/message.eml": raw}


@local_only
async def test_mime_nested_1000_deep_is_one_unprocessable_message(config, store):
    depth = 1_000
    raw = (b"To: sheffield@x\r\nMIME-Version: 1.0\r\n"
           + b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth))
           + b"Content-Type: text/csv\r\nContent-Disposition: attachment; filename=x.csv\r\n\r\na,b\r\n"
           + b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth))))
    await ingest(config, store, raw, ["sheffield"])
    assert (await all_objects(config, store))["unprocessable"] == {f"{FOLDER}/message.eml": raw}


@local_only
async def test_broken_base64_and_quoted_printable_lose_nothing(config, store):
    raw = (b"To: sheffield@x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n"
           b"--zz\r\nContent-Type: text/csv\r\nContent-Disposition: attachment; filename=b64.csv\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nTVBBTixrV2gK!!!not base64 at all===\r\n"
           b"--zz\r\nContent-Type: text/csv\r\nContent-Disposition: attachment; filename=qp.csv\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\nMPAN=2CkWh=0A=ZZ=\r\n1=2C2=\r\n"
           b"--zz--\r\n")
    envelope, _, spool = await ingest(config, store, raw, ["sheffield"])
    objects = await all_objects(config, store)
    assert set(objects["amr_data"]) | set(objects["unprocessable"]) == {f"{FOLDER}/b64.csv", f"{FOLDER}/qp.csv"}
    assert objects["inbox"] == {f"{FOLDER}/{envelope.id}.eml": raw} and spool.failed_ids() == []


@local_only
async def test_wrong_and_undeclared_charsets_and_missing_boundaries(config, store):
    raw = (b"To: sheffield@x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\n"  # no boundary at all
           b"--zz\r\nContent-Type: text/csv; charset=x-no-such-charset\r\nContent-Disposition: attachment; "
           b"filename*=x-no-such-charset''caf%E9.csv\r\n\r\ncaf\xe9,1\r\n--zz--\r\n")
    await ingest(config, store, raw, ["sheffield"])
    second = (b"To: sheffield@x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=never-used\r\n\r\n"
              b"no part ever starts\r\n")
    await ingest(config, store, second, ["sheffield"])
    objects = await all_objects(config, store)
    assert len(objects["inbox"]) == 2 and objects["amr_data"] == {} and objects["unprocessable"] == {}


@local_only
@pytest.mark.parametrize("name, expected", [
    ("=?utf-8?q?..=2F..=2Fetc=2Fpasswd.csv?=", "etc/passwd.csv"),
    ("=?utf-8?b?L2Fic29sdXRlLmNzdg==?=", "absolute.csv"),  # "/absolute.csv"
    ("=?utf-8?q?nul=00and=01control=1F=7F.csv?=", "nulandcontrol.csv"),
    ("=?utf-8?q?" + "a" * 10_000 + ".csv?=", "a" * 196 + ".csv"),
])
async def test_encoded_word_file_names_stay_safe(config, store, name, expected):
    raw = (b"To: sheffield@x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n"
           b"--zz\r\nContent-Type: text/csv\r\nContent-Disposition: attachment; filename=\"" + name.encode() + b"\"\r\n\r\n"
           b"a,b\r\n--zz--\r\n")
    await ingest(config, store, raw, ["sheffield"])
    assert list((await all_objects(config, store))["amr_data"]) == [f"{FOLDER}/{expected}"]


# --- archives -----------------------------------------------------------------


def forty_two_zip() -> bytes:
    """16 zips of 16 zips of 16 zips of one CSV: each level is small, the whole tree is not."""
    level = make_zip({"data.csv": b"0," * 100_000})
    for _ in range(3):
        level = make_zip({f"{n}.zip": level for n in range(16)})
    return level


def test_the_42_zip_shape_is_bounded_across_nesting():
    """The attachment, not a zip deep inside it, goes whole to unprocessable."""
    level = forty_two_zip()
    outputs = route("42.zip", level)
    assert [(o.bucket, o.name, o.data) for o in outputs] == [(UNPROCESSABLE, "42.zip", level)]
    assert outputs[0].reason == f"over {chain.MAX_ZIP_ENTRIES:,} files inside, nested archives included"


def test_nested_archives_share_one_byte_budget():
    """Ten zips of 19 MB of text each: no single one is over the limit, the tree is (200 MB)."""
    inner = make_zip({"big.csv": os.urandom(9_500_000).hex().encode()}, zipfile.ZIP_STORED)
    outer = make_zip({f"{n}.zip": inner for n in range(11)}, zipfile.ZIP_STORED)
    [out] = route("outer.zip", outer)
    assert out.bucket == UNPROCESSABLE and out.data == outer and "200,000,000 bytes" in out.reason


def test_overlapping_entries_are_refused():
    """Many central-directory entries pointing at one compressed local entry (the overlap zip bomb)."""
    single = make_zip({"a.csv": b"0" * 5_000_000})
    cd_at, end_at = single.index(b"PK\x01\x02"), single.index(b"PK\x05\x06")
    count = 200
    end = bytearray(single[end_at:])
    end[8:12] = struct.pack("<HH", count, count)
    end[12:16] = struct.pack("<I", (end_at - cd_at) * count)
    bomb = single[:cd_at] + single[cd_at:end_at] * count + bytes(end)
    [out] = route("overlap.zip", bomb)
    assert out.bucket == UNPROCESSABLE and out.data == bomb


def test_encrypted_and_symlink_entries_make_the_zip_unprocessable():
    plain = make_zip({"a.csv": CSV})
    encrypted = bytearray(plain)
    for header in (b"PK\x03\x04", b"PK\x01\x02"):  # set bit 0 of the general purpose flags: "encrypted"
        at = plain.index(header) + (6 if header == b"PK\x03\x04" else 8)
        encrypted[at] |= 1
    [out] = route("secret.zip", bytes(encrypted))
    assert out.bucket == UNPROCESSABLE and "encrypted" in out.reason
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        link = zipfile.ZipInfo("link.csv")
        link.external_attr = (0o120777 << 16)
        archive.writestr(link, "/etc/passwd")
    [out] = route("links.zip", buf.getvalue())
    assert out.bucket == UNPROCESSABLE and "symbolic link" in out.reason


def test_entry_names_absolute_dotdot_case_and_encodings():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("/abs/a.csv", CSV)
        archive.writestr("../../up.csv", CSV)
        archive.writestr("Case.csv", b"upper\n")
        archive.writestr("case.csv", b"lower\n")
        archive.writestr("caf\u00e9.csv", b"utf8 flag\n")  # zipfile sets the UTF-8 flag for a non-ASCII name
        archive.writestr("XtX.csv", b"cp437\n")  # renamed below to CP437 bytes, flag clear, as old archivers wrote
    data = buf.getvalue().replace(b"XtX.csv", "\u00e9t\u00e9.csv".encode("cp437"))
    outputs = route("names.zip", data)
    assert sorted(o.name for o in outputs) == ["Case.csv", "abs/a.csv", "café.csv", "case.csv", "up.csv", "été.csv"]
    assert {o.name: o.data for o in outputs}["Case.csv"] == b"upper\n"


# --- spreadsheets -------------------------------------------------------------


NS = b'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
BILLION_LAUGHS = (b'<!DOCTYPE lolz [<!ENTITY lol "lol">'
                  + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10) for i in range(1, 10))
                  + b"]>")


def attacked_xlsx(sheet_text: bytes = b"MPAN", shared_text: bytes | None = None, doctype: bytes = b"") -> bytes:
    """An xlsx whose A1 holds `sheet_text` inline, or `shared_text` from a sharedStrings.xml; `doctype` heads the part that holds it."""
    src = zipfile.ZipFile(io.BytesIO(xlsx({"A1": "MPAN", "B1": 1})))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            content = src.read(info.filename)
            if info.filename == "xl/worksheets/sheet1.xml":
                if shared_text is None:
                    content = doctype + content.replace(b"<t>MPAN</t>", b"<t>" + sheet_text + b"</t>")
                else:
                    content = content.replace(b'<c r="A1" t="inlineStr"><is><t>MPAN</t></is></c>', b'<c r="A1" t="s"><v>0</v></c>')
            elif info.filename == "xl/_rels/workbook.xml.rels" and shared_text is not None:
                content = content.replace(b"</Relationships>", b'<Relationship Id="rIdSST" Target="sharedStrings.xml" Type='
                                          b'"http://schemas.openxmlformats.org/officeDocument/2006/relationships/sharedStrings"/></Relationships>')
            elif info.filename == "[Content_Types].xml" and shared_text is not None:
                content = content.replace(b"</Types>", b'<Override PartName="/xl/sharedStrings.xml" ContentType='
                                          b'"application/vnd.openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"/></Types>')
            dst.writestr(info.filename, content)
        if shared_text is not None:
            dst.writestr("xl/sharedStrings.xml", doctype + b"<sst " + NS + b' count="1" uniqueCount="1"><si><t>' + shared_text + b"</t></si></sst>")
    return out.getvalue()


def with_part(data: bytes, part: str, transform) -> bytes:
    """The same zip with one member's bytes transformed."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            content = src.read(info.filename)
            dst.writestr(info.filename, transform(content) if info.filename == part else content)
    return out.getvalue()


def test_the_attack_fixtures_are_real_workbooks():
    """Without the attack, each fixture converts: so a refusal below is the defence, not a broken fixture."""
    assert route("plain.xlsx", attacked_xlsx())[0].data == b'"MPAN",1\n'
    assert route("shared.xlsx", attacked_xlsx(shared_text=b"shared MPAN"))[0].data == b'"shared MPAN",1\n'


@pytest.mark.parametrize("shared", [False, True])
def test_entity_expansion_in_xlsx_parts_is_not_expanded(shared):
    data = attacked_xlsx(b"&lol9;", b"&lol9;" if shared else None, BILLION_LAUGHS)
    started = time.monotonic()
    [out] = route("lol.xlsx", data)
    assert time.monotonic() - started < 10
    assert b"lollollol" not in out.data


@pytest.mark.parametrize("shared", [False, True])
def test_external_entities_are_not_read(tmp_path, shared):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    doctype = b'<!DOCTYPE x [<!ENTITY xxe SYSTEM "file://%s">]>' % str(secret).encode()
    [out] = route("xxe.xlsx", attacked_xlsx(b"&xxe;", b"&xxe;" if shared else None, doctype))
    assert b"TOP-SECRET" not in out.data


def test_a_shared_strings_bomb_is_refused():
    """A sharedStrings.xml that compresses 1000:1 to 300 MB: refused from its declared size and ratio, before it is read."""
    data = attacked_xlsx(shared_text=b"A" * 300_000_000)
    assert len(data) < 1_000_000
    [out] = route("strings.xlsx", data)
    assert out.bucket == UNPROCESSABLE and out.data == data and "(a zip bomb?)" in out.reason


def test_corrupt_ole2_streams_in_xls_are_unprocessable():
    good = xls({(0, 0): "MPAN", (0, 1): 1.5})
    far_directory = bytearray(good)
    far_directory[0x30:0x34] = struct.pack("<I", 0x7FFFFFF0)  # the first directory sector: far past the end
    for corrupt in (good[:600], good[:512] + os.urandom(len(good) - 512), bytes(far_directory)):
        [out] = route("export.xls", corrupt)
        assert (out.bucket, out.data) == (UNPROCESSABLE, corrupt) and out.reason.startswith("cannot read the xls file")


# --- CSV injection ------------------------------------------------------------


def test_formula_like_cells_are_data_and_no_line_holds_a_nul_or_bare_cr():
    cells = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(A1:A2)", '=HYPERLINK("http://evil.example","click")']
    csv = ("\r\n".join(cells) + "\r\nnul\x00inside,cr\ronly\r\n").encode()
    [out] = route("inject.csv", csv)
    assert out.data.decode().split("\n")[:5] == cells
    [sheet] = route("inject.xlsx", xlsx({f"A{n + 1}": cell for n, cell in enumerate(cells)} | {"B2": "a\rb"}))
    for data in (out.data, sheet.data):
        assert b"\x00" not in data and b"\r" not in data


def test_formulas_are_written_as_their_cached_value_never_evaluated():
    data = xlsx({"A1": '=HYPERLINK("http://evil.example","click")', "A2": "=cmd|' /C calc'!A0"},
                cached={"A1": ("str", "click"), "A2": ("e", "#REF!")})
    [out] = route("formulas.xlsx", data)
    assert out.data == b'"click"\n#REF!\n'


# --- resources ----------------------------------------------------------------


def hostile_files() -> dict[str, bytes]:
    """The archive and spreadsheet cases above, as files for one `esmail convert` run."""
    return {
        "42.zip": forty_two_zip(),
        "ratio.zip": make_zip({"bomb.csv": b"0" * 150_000_000}),
        "strings.xlsx": attacked_xlsx(shared_text=b"A" * 300_000_000),
        "lol.xlsx": attacked_xlsx(b"&lol9;", b"&lol9;", BILLION_LAUGHS),
        "huge.xlsx": with_part(xlsx({"A1": 1, "B2": 2}), "xl/worksheets/sheet1.xml",
                               lambda xml: xml.replace(b'<dimension ref="A1:B2"', b'<dimension ref="A1:XFD1048576"')),
    }


def test_memory_stays_under_the_bound_on_the_hostile_files(tmp_path):
    """DESIGN §10: 400 MB for the daemon; the conversion of every case above, in one process, peaks well under it."""
    for name, data in hostile_files().items():
        (tmp_path / name).write_bytes(data)
    # VmHWM, not ru_maxrss: Linux carries the forking parent's peak into ru_maxrss across exec
    script = ("import re, sys; from esmail.cli import main; code = main(sys.argv[1:]); "
              "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(0 if code in (0, 1) else code)")
    result = subprocess.run([sys.executable, "-c", script, "convert", "--out", str(tmp_path / "out"), *map(str, sorted(tmp_path.glob("*.*")))],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    peak_mb = int(result.stdout.strip().splitlines()[-1]) / 1024
    assert peak_mb < 400, f"peak RSS {peak_mb:.0f} MB"
    assert not list((tmp_path / "out").rglob("*")) or all(p.stat().st_size < 10_000_000 for p in (tmp_path / "out").rglob("*") if p.is_file())


@local_only
async def test_no_file_descriptors_leak_over_1000_bad_messages(config, store):
    spool = Spool(config.spool.path)
    worker = Worker(config, spool, store)
    bad = [b"\x00\xff junk", bytes(feed(("x.xlsx", b"PK\x03\x04broken"))), bytes(feed(("y.zip", b"PK\x05\x06" + b"\x00" * 18))),
           bytes(feed(("z.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 600)))]

    async def one_round(n: int) -> None:
        for i in range(n):
            envelope = spool.accept(bad[i % len(bad)], ["sheffield"], origin="ingest")
            await worker.process(envelope.id)

    await one_round(20)  # warm up: lazily opened files, thread pools
    before = len(os.listdir("/proc/self/fd"))
    await one_round(1_000)
    after = len(os.listdir("/proc/self/fd"))
    assert after - before <= 2, (before, after)
    assert spool_is_clean(spool) and spool.failed_ids() == []
