"""SMTP acceptance speed, end to end against Postfix, reply time under load, memory, and a storage outage (DESIGN §10),
as ratios measured in one run.

    python benchmarks/smtp.py [--seconds 8] [--sessions 16] [--only PART] [--outage 150] [--against DIR] [--history-url URL]

acceptance: messages per second at --sessions concurrent senders, 5 KB and 1 MB, taken by (a) a bare aiosmtpd
   handler that discards, (b) esmail's receiver with its durable spool (fsync'd before 250; no worker, so that
   both do the same job: take the message), (c) the whole `esmail serve`, which also converts and stores, and
   at 5 KB with a [[feed]] declared, and with the feed's format checked (DESIGN §16).
postfix: end to end against a private Postfix (its own main.cf, master.cf, queue and a Maildir in the run's
   temporary folder, on a free port; needs root, for Postfix's master): smtp-source sends N messages, and
   the rate counts from the first connection until the last is delivered into the Maildir (Postfix) or
   stored with its spool entry removed (esmail serve, [smtp] processes = 2).
big: the p99 reply time of small messages while `esmail serve` takes and converts a ~39 MB message, and the
   peak RSS of its processes.
burst: 1 MB messages faster than the worker stores them: the p99 reply of small messages sent meanwhile, and
   the RSS of esmail serve's processes while the backlog grows.
outage: S3 (moto's server) behind a proxy that is stopped for --outage seconds while 40 messages arrive:
   seconds from the store's return until the last is stored.
Targets: 5 KB ≥ 0.8× bare, 1 MB ≥ 3× bare, end to end ≥ 1.0× Postfix, p99 ≤ 1 s, peak RSS ≤ 400 MB, the
outage drained within 15 s; the daemon with a [[feed]] ≥ 0.9×, with the feed's format checked ≥ 0.95× without.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

CORPUS = Path(__file__).parent / "corpus"
HERE = Path(__file__).resolve()
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # moto's server takes any


def message(size: int, name: str = "readings.csv", content: bytes | None = None, kind: str = "text/csv") -> bytes:
    """A feed-shaped message of about `size` bytes: headers, a line of text, one base64 attachment."""
    rng = random.Random(size)
    if content is None:
        raw_size = max(size - 600, 10) * 3 // 4
        lines, total = [], 0
        while total < raw_size:
            line = f"2200013680374,2026-03-{rng.randint(1, 28):02d}," + ",".join(f"{rng.uniform(0, 40):.3f}" for _ in range(8)) + "\r\n"
            lines.append(line)
            total += len(line)
        content = "".join(lines).encode()[:raw_size]
    encoded = base64.encodebytes(content).replace(b"\n", b"\r\n")
    head = (f"From: meters@supplier.example\r\nTo: feed@datafeeds.example.org\r\nSubject: readings\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\n"
            f"Content-Type: text/plain\r\n\r\nReadings attached.\r\n--b1\r\nContent-Type: {kind}\r\n"
            f"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"{name}\"\r\n\r\n").encode()
    return head + encoded + b"--b1--\r\n"


def wire(msg: bytes) -> bytes:
    """The message as sent after DATA: dot-stuffed and terminated."""
    return (b"\r\n" + msg).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


# --- the load client ------------------------------------------------------------

async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return line


async def _session(port: int, payload: bytes, deadline: float, latencies: list[float], errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader)
    writer.write(b"EHLO bench.example\r\n")
    await _reply(reader)
    while time.monotonic() < deadline:
        started = time.perf_counter()
        for command, expected in ((b"MAIL FROM:<bench@supplier.example>\r\n", b"250"),
                                  (b"RCPT TO:<feed@datafeeds.example.org>\r\n", b"250"), (b"DATA\r\n", b"354"),
                                  (payload, b"250")):
            writer.write(command)
            reply = await _reply(reader)
            if not reply.startswith(expected):
                errors.append(reply.decode(errors="replace").strip())
                writer.write(b"RSET\r\n")
                await _reply(reader)
                break
        else:
            latencies.append(time.perf_counter() - started)
    writer.write(b"QUIT\r\n")
    writer.close()


async def _load(port: int, size: int, sessions: int, seconds: float) -> dict:
    payload = wire(message(size))
    latencies: list[float] = []
    errors: list[str] = []
    started = time.monotonic()
    await asyncio.gather(*(_session(port, payload, started + seconds, latencies, errors) for _ in range(sessions)))
    elapsed = time.monotonic() - started
    latencies.sort()
    return {"messages": len(latencies), "seconds": elapsed, "rate": len(latencies) / elapsed, "errors": errors[:3],
            "p99": latencies[int(len(latencies) * 0.99)] if latencies else None, "size": len(payload)}


def rate(port: int, size: int, sessions: int, seconds: float) -> float:
    """Messages per second: Postfix's smtp-source when installed (a new connection per message, as DESIGN
    §10 measured), else this script's own client (sessions kept open)."""
    if not shutil.which("smtp-source"):
        return load(port, size, sessions, seconds)["rate"]
    count = max(int(seconds * (1500 if size < 100_000 else 40)), 100)
    started = time.monotonic()
    subprocess.run(["smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(count), "-f", "bench@supplier.example",
                    "-t", "feed@datafeeds.example.org", f"127.0.0.1:{port}"], check=True, timeout=600)
    return count / (time.monotonic() - started)


def load(port: int, size: int, sessions: int, seconds: float) -> dict:
    """Run the load client in a process of its own and return its figures."""
    out = subprocess.run([sys.executable, str(HERE), "_load", str(port), str(size), str(sessions), str(seconds)],
                         capture_output=True, text=True, check=True, timeout=seconds + 120)
    return json.loads(out.stdout)


# --- the servers ----------------------------------------------------------------

class _Discard:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"


async def _serve_bare(port: int) -> None:
    from aiosmtpd.smtp import SMTP

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(_Discard(), hostname="bench", data_size_limit=50_000_000), "127.0.0.1", port)
    print("ready", flush=True)
    await server.serve_forever()


class _Canned(asyncio.Protocol):
    """Python's floor for receiving mail: the SMTP exchange answered with fixed replies, no parsing, nothing kept."""

    def connection_made(self, transport) -> None:
        self.transport, self.buffer, self.in_data = transport, b"", False
        transport.write(b"220 bench ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    self.buffer = self.buffer[-4:]
                    return
                self.buffer, self.in_data = self.buffer[end + 5:], False
                self.transport.write(b"250 2.0.0 Ok: queued\r\n")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            command, self.buffer = self.buffer[:4].upper(), self.buffer[end + 2:]
            if command == b"DATA":
                self.buffer, self.in_data = b"\r\n" + self.buffer, True
                self.transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif command == b"QUIT":
                self.transport.write(b"221 2.0.0 Bye\r\n")
                self.transport.close()
                return
            else:
                self.transport.write(b"250 Ok\r\n")


async def _serve_canned(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Canned, "127.0.0.1", port, reuse_port=True)
    await server.serve_forever()


def canned_server(processes: int = 2) -> Server:
    """`processes` canned responders on one port (SO_REUSEPORT), as esmail's [smtp] processes; the first starts the others."""
    port = free_port()
    return Server([sys.executable, str(HERE), "_serve_canned", str(port), str(processes)], port)


async def _serve_accept(port: int, spool_path: str) -> None:
    """esmail's receiving side as the daemon builds it (smtp + spool + group commit), without the worker."""
    from esmail.config import Address, SmtpConfig
    from esmail.smtp import Receiver, SmtpServer
    from esmail.group_commit import GroupCommit
    from esmail.spool import Spool

    config = SmtpConfig(listen=Address("127.0.0.1", port), hostname="bench", max_message_size=50_000_000)
    server = SmtpServer(config, Receiver(config, GroupCommit(Spool(Path(spool_path), min_free=0)), lambda entry_id: None))
    await server.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, argv: list[str], port: int, cwd: Path | None = None, env: dict | None = None):
        self.port = port
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd, env=env)
        self.wait_for(port, self._check)

    def _check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(self.process.stderr.read().decode())

    @staticmethod
    def wait_for(port: int, check) -> None:
        """Until something listens on `port` (a minute at most); `check` raises if the server died meanwhile."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                check()
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def bare_server() -> Server:
    port = free_port()
    return Server([sys.executable, str(HERE), "_serve_bare", str(port)], port)


def accept_server(spool: Path) -> Server:
    port = free_port()
    return Server([sys.executable, str(HERE), "_serve_accept", str(port), str(spool)], port)


def daemon(work: Path, more: str = "", tree: Path | None = None, processes: int = 1, storage: str = "") -> Server:
    """`esmail serve` on a fresh spool; `tree`: the esmail of another checkout (`git worktree add DIR REV`);
    `processes`: [smtp] processes (receiver processes on the port); `storage`: the [storage] keys (default: a local folder)."""
    port = free_port()
    receivers = f"processes = {processes}\n" if processes != 1 else ""
    storage = storage or f'path = "{work / "data"}"\n'
    (work / "esmail.toml").write_text(
        f'[smtp]\nlisten = "127.0.0.1:{port}"\nhostname = "bench"\n{receivers}[storage]\n{storage}'
        f'[spool]\npath = "{work / "spool"}"\nmin_free = 0\n{more}')
    env = {**os.environ, **FAKE_AWS, **({"PYTHONPATH": str(tree)} if tree else {})}
    # cwd: `python -m` puts the working folder first on sys.path, before PYTHONPATH (it would import this tree's esmail)
    return Server([sys.executable, "-m", "esmail", "--config", str(work / "esmail.toml"), "--log-level", "warning", "serve"], port,
                  cwd=work, env=env)


POSTFIX_MASTER = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
virtual   unix  - n n -     - virtual
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class Postfix:
    """A private Postfix instance, the peer an operator trusts for this job: its own main.cf and master.cf, queue
    (fsync'd before 250) and a Maildir it delivers every message into (fsync'd), in `work`, on a free port.

    Postfix's defaults otherwise (Debian's 3.7: up to 100 smtpd processes, 20 deliveries at once), but for `max_use`:
    its processes live through the run (not 100 messages), so that the CPU of each of its programs can be read.
    The master runs as root and drops to `postfix`; deliveries run as `nobody`. `postfix -c DIR` for a DIR outside /etc/postfix
    needs root, or DIR in the default instance's alternate_config_directories (`unavailable` says which).
    """

    def __init__(self, work: Path):
        self.work = work
        self.port = free_port()
        self.maildir = work / "mail" / "Maildir" / "new"
        self.config = work / "etc"

    @staticmethod
    def unavailable() -> str | None:
        """Why there can be no Postfix rows here, or None."""
        if not (shutil.which("postfix") and shutil.which("smtp-source")):
            return "Postfix is not installed (apt-get install postfix)"
        if os.geteuid() != 0:
            return "Postfix's master runs as root: run the benchmark as root for the Postfix rows"
        return None

    def start(self) -> "Postfix":
        import pwd

        nobody = pwd.getpwnam("nobody")
        work = self.work
        for folder in ("etc", "queue", "data", "mail"):
            (work / folder).mkdir(parents=True, exist_ok=True)
        for folder in (work, *work.parents):  # mkdtemp makes 0700 folders: Postfix's users must get through
            if folder == Path(folder.anchor):
                break
            folder.chmod(folder.stat().st_mode | 0o111)
        shutil.chown(work / "data", "postfix")
        os.chown(work / "mail", nobody.pw_uid, nobody.pw_gid)
        (self.config / "main.cf").write_text(f"""compatibility_level = 3.6
queue_directory = {work / "queue"}
data_directory = {work / "data"}
maillog_file = {work / "postfix.log"}
maillog_file_prefixes = {work}
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.example
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
message_size_limit = 50000000
max_use = 1000000
virtual_mailbox_domains = datafeeds.example.org
virtual_mailbox_base = {work / "mail"}
virtual_mailbox_maps = static:Maildir/
virtual_mailbox_limit = 0
virtual_uid_maps = static:{nobody.pw_uid}
virtual_gid_maps = static:{nobody.pw_gid}
""")
        (self.config / "master.cf").write_text(POSTFIX_MASTER.format(port=self.port))
        started = subprocess.run(["postfix", "-c", str(self.config), "start"], capture_output=True, text=True)
        if started.returncode != 0:
            log = (work / "postfix.log").read_text() if (work / "postfix.log").exists() else ""
            hint = ""
            if "alternate_config_directories" in log + started.stderr:
                hint = f"; list the folder in the default instance: postconf -e 'alternate_config_directories = {self.config}'"
            raise RuntimeError(f"postfix -c {self.config} start failed: {started.stderr.strip()} {log[-500:]}{hint}")
        Server.wait_for(self.port, lambda: None)
        return self

    def delivered(self) -> int:
        """Messages delivered into the Maildir so far."""
        try:
            return len(os.listdir(self.maildir))
        except FileNotFoundError:
            return 0

    def master(self) -> int:
        return int((self.work / "queue" / "pid" / "master.pid").read_text())

    def stop(self) -> None:
        master = Path(f"/proc/{self.master()}")
        subprocess.run(["postfix", "-c", str(self.config), "stop"], capture_output=True)
        deadline = time.monotonic() + 30
        while master.exists() and time.monotonic() < deadline:  # its children stop with it
            time.sleep(0.1)


def dns_server():
    """A DNS server on loopback (dnslib, in a thread) that gives supplier.example an SPF record passing 127.0.0.1."""
    from dnslib import QTYPE, RR, TXT
    from dnslib.server import BaseResolver, DNSLogger, DNSServer

    class Zone(BaseResolver):
        def resolve(self, request, handler):
            reply = request.reply()
            if str(request.q.qname).rstrip(".").lower() == "supplier.example" and QTYPE[request.q.qtype] == "TXT":
                reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT("v=spf1 ip4:127.0.0.1 -all"), ttl=60))
            return reply

    server = DNSServer(Zone(), address="127.0.0.1", port=free_port(), logger=DNSLogger(logf=lambda _: None))
    server.start_thread()
    return server


def feeds_daemon(work: Path, dns_port: int, processes: int = 1) -> Server:
    """`esmail serve` with a feed declared: every message is authenticated (SPF, DKIM, DMARC) in the worker."""
    return daemon(work, f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n'
                        '[[feed]]\nprefix = "feed"\nsenders = ["*@supplier.example"]\nauthenticated = true\n', processes=processes)


def format_daemon(work: Path) -> Server:
    """`esmail serve` with the importer's format for the prefix (DESIGN §16): every CSV is checked in the conversion."""
    times = [f"{h:02d}:{m:02d}" for h in range(24) for m in (0, 30)]
    (work / "feed-formats.json").write_text(json.dumps([{
        "identifier": "feed", "header_example": "MPAN,Date," + ",".join(times), "date_format": "%Y-%m-%d", "mpan_mprn_field": "MPAN",
        "reading_date_field": "Date", "reading_fields": times, "number_of_header_rows": 0, "process_type": "s3_folder"}]))
    return daemon(work, f'[formats]\npath = "{work / "feed-formats.json"}"\n')


def create_cost_us(folder: Path, count: int = 300) -> float:
    """Microseconds to create an empty file in `folder`: kernel work that varies with the filesystem's state
    (on this project's VM, 16–840 µs from one folder to the next). The receiver creates one per message."""
    folder.mkdir(parents=True, exist_ok=True)
    probes = [folder / f"probe-{n}" for n in range(count)]
    started = time.perf_counter()
    for probe in probes:
        probe.touch(exist_ok=False)
    elapsed = time.perf_counter() - started
    for probe in probes:
        probe.unlink()
    return elapsed / count * 1e6


# --- memory ---------------------------------------------------------------------

def peak_rss_mb(pid: int, field: str = "VmHWM") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:  # ended meanwhile
        pass
    return 0.0


def rss_mb(pid: int) -> float:
    return peak_rss_mb(pid, "VmRSS")


def children(pid: int) -> list[int]:
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except FileNotFoundError:  # it ended meanwhile
        pass
    return found + [g for c in found for g in children(c)]


def big_xlsx() -> Path:
    """An xlsx of ~1.9M cells of full-precision floats (~24 MB): big_message adds a CSV to make it a ~39 MB message."""
    path = CORPUS / "big-28mb.xlsx"
    if not path.exists():
        import openpyxl

        CORPUS.mkdir(exist_ok=True)
        rng = random.Random(3)
        wb = openpyxl.Workbook(write_only=True)
        ws = wb.create_sheet()
        for r in range(38_000):
            ws.append([2200013680374 + r] + [rng.random() * 40 for _ in range(49)])
        wb.save(path)
    return path


def big_message(xlsx: Path, size: int = 39_000_000) -> bytes:
    """A message of about `size` bytes (the default limit is 40 MB): the big xlsx, and a CSV that fills the rest."""
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "meters@supplier.example", "big@datafeeds.example.org", "readings"
    msg.set_content("Readings attached.")
    msg.add_attachment(xlsx.read_bytes(), maintype="application", subtype="vnd.openxmlformats-officedocument.spreadsheetml.sheet", filename="big.xlsx")
    line = b"2200013680374,2026-03-01," + b",".join(b"%.3f" % (i * 0.7) for i in range(48)) + b"\r\n"
    rest = size - len(bytes(msg).replace(b"\n", b"\r\n")) - 1000
    msg.add_attachment(line * (rest * 3 // 4 // len(line)), maintype="text", subtype="csv", filename="readings.csv")
    return bytes(msg).replace(b"\n", b"\r\n")


def send(port: int, msg: bytes) -> str:
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=300) as client:
        client.ehlo("bench")
        client.mail("bench@supplier.example")
        client.rcpt("big@datafeeds.example.org")
        return client.data(msg)[1].decode()


# --- the run ----------------------------------------------------------------------

SECTIONS = ("acceptance", "postfix", "big", "burst", "outage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="load per measurement (default 8)")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--against", type=Path, metavar="DIR",
                        help="also measure the 5 KB serve row of the esmail in another checkout (git worktree add DIR REV)")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="only this part (may be repeated); default: all")
    parser.add_argument("--outage", type=float, default=150.0, help="seconds the store is down in the outage part (default 150)")
    parser.add_argument("--history-url", metavar="URL", help="postgresql://USER@HOST/DB (password in PGPASSWORD): "
                        "a 5 KB end-to-end row with the history there instead of in SQLite")
    parser.add_argument("--rounds", type=int, default=1, help="postfix part: the 5 KB esmail rows measured this many times, "
                        "in turns, the order reversed each round (the rows with a feed or PostgreSQL against the plain one)")
    args = parser.parse_args()
    args.against = args.against.resolve() if args.against else None
    work = Path(tempfile.mkdtemp(prefix="esmail-bench-"))
    try:
        client = "Postfix smtp-source, a connection per message" if shutil.which("smtp-source") else "the script's client, sessions kept open"
        print(f"{args.sessions} concurrent sessions ({client}), ~{args.seconds:.0f} s per measurement, {os.cpu_count()} cores")
        print(f"spool in {work} (TMPDIR chooses); creating a file there takes {create_cost_us(work / 'spool-5000' / 'tmp'):.0f} µs")
        dns = dns_server()
        for section in args.only or SECTIONS:
            print()
            {"acceptance": acceptance, "postfix": versus_postfix, "big": big_message_while_busy, "burst": burst,
             "outage": outage}[section](args, work, dns)
        dns.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def acceptance(args, work: Path, dns) -> None:
    """Messages per second taken (250) by bare aiosmtpd, esmail's receiver, and the whole daemon."""
    print(f"{'server':48} {'msg/s':>8}   ratio (target)")
    rates = {}
    serve = "esmail serve (also converts and stores)"
    serve2 = "esmail serve, [smtp] processes = 2"
    for size, label, target in ((5_000, "5 KB", 0.8), (1_000_000, "1 MB", 3.0)):
        servers = [("bare aiosmtpd, discards", bare_server),
                   ("esmail receiver + fsync'd spool", lambda: accept_server(work / f"spool-{size}")),
                   (serve, lambda: daemon(_fresh(work / f"daemon-{size}"))),
                   (serve2, lambda: daemon(_fresh(work / f"daemon2-{size}"), processes=2))]
        if size == 5_000:
            servers.append(("esmail serve, a [[feed]] declared", lambda: feeds_daemon(_fresh(work / "feeds"), dns.server.server_address[1])))
            servers.append(("esmail serve, the feed's format checked", lambda: format_daemon(_fresh(work / "format"))))
            if args.against:
                servers.append((f"esmail serve of {args.against.name}", lambda: daemon(_fresh(work / "against"), tree=args.against)))
        for name, start in servers:
            server = start()
            try:
                rates[(size, name)] = rate(server.port, size, args.sessions, args.seconds)
            finally:
                server.stop()
            bare = rates[(size, "bare aiosmtpd, discards")]
            measured = rates[(size, name)]
            ratio = "" if name.startswith("bare") else f"{measured / bare:.2f}× bare" + (f" (≥ {target}×)" if "spool" in name else "")
            if "[[feed]]" in name:
                ratio += f", {measured / rates[(size, serve)]:.2f}× without feeds (≥ 0.9×)"
            if "format" in name:
                ratio += f", {measured / rates[(size, serve)]:.2f}× without a format (≥ 0.95×)"
            if args.against and name.endswith(args.against.name):
                ratio += f"; this tree's serve is {rates[(size, serve)] / measured:.2f}× it"
            print(f"{label + ' · ' + name:48} {measured:8.1f}   {ratio}", flush=True)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and all its descendants, the ended ones they waited for included."""
    total = 0
    for each in (pid, *children(pid)):
        try:
            total += _ticks(Path(f"/proc/{each}/stat"), waited_for=True)
        except FileNotFoundError:  # ended meanwhile
            continue
    return total / os.sysconf("SC_CLK_TCK")


def _ticks(stat: Path, waited_for: bool = False) -> int:
    """User + system clock ticks of one process or thread (`/proc/…/stat`); `waited_for`: with its ended children's."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return sum(int(field) for field in fields[11:15 if waited_for else 13])


def cpu_by_stage(pid: int, stage) -> Counter:
    """CPU seconds of `pid` and its descendants by `stage(process, thread)` (a name), per live thread; what ended
    threads and processes used is under "ended" (the difference from `cpu_seconds`)."""
    found: Counter = Counter()
    for each in (pid, *children(pid)):
        try:
            threads = os.listdir(f"/proc/{each}/task")
        except FileNotFoundError:
            continue
        for thread in threads:
            try:
                found[stage(each, int(thread))] += _ticks(Path(f"/proc/{each}/task/{thread}/stat")) / os.sysconf("SC_CLK_TCK")
            except FileNotFoundError:
                continue
    found["ended"] = cpu_seconds(pid) - sum(found.values())
    return found


def by_program(process: int, thread: int) -> str:
    """Postfix's stages: the program each process runs (smtpd, cleanup, qmgr, virtual, …)."""
    try:
        return Path(f"/proc/{process}/comm").read_text().strip()
    except FileNotFoundError:
        return "ended"


def esmail_stages(server: "Server"):
    """esmail's stages: the receivers (the processes listening on its port, once all listen) and the daemon, each its
    event loop (the main thread) and its other threads; and the conversion processes (the daemon's other children)."""
    daemon_pid = server.process.pid
    receivers: set[int] = set()

    def stage(process: int, thread: int) -> str:
        if not receivers:  # first asked after the warm-up: every receiver listens by then
            out = subprocess.run(["ss", "-Hltnp", f"sport = :{server.port}"], capture_output=True, text=True).stdout
            receivers.update({int(pid) for pid in re.findall(r"pid=(\d+)", out)} - {daemon_pid})
        if process in receivers:
            return "receivers' event loops" if thread == process else "receivers' group commits (threads)"
        if process == daemon_pid:
            return "worker's event loop" if thread == process else "worker's threads (store, spool, history)"
        return "conversion processes"
    return stage


WARM_UP = 64  # messages each server takes before end_to_end's clock starts


def end_to_end(port: int, size: int, count: int, sessions: int, finished, pid: int, stage=by_program) -> tuple[float, float, float, dict]:
    """(accepted, end to end) in messages per second, the server's CPU ms a message (`pid` and its descendants), and
    that CPU by `stage` (`cpu_by_stage`), ms a message:
    smtp-source sends `count` messages of `size` bytes (a connection each); accepted when it has its last 250, end to
    end when `finished(sent)` (how many of the `sent` messages are delivered or stored) reaches them all.

    WARM_UP messages go first, at the same concurrency, and are finished before the clock starts: a running server
    has started its processes and imported its modules long before (a conversion process with feeds declared spends
    0.26 s of CPU on its imports: 0.35 ms a message over a run of 1,500); each server, Postfix too, is measured at work.
    Then the disks are flushed, so that no row's `syncfs` writes out what the rows before left (a removed folder of
    thousands of files). On a filesystem mounted with `discard` the removals still cost the rows after them (up to
    twice the CPU in the store's threads): measure on one without (docs/speed.md, "Measuring it")."""
    def source(number: int, concurrent: int) -> None:
        subprocess.run(["smtp-source", "-s", str(concurrent), "-l", str(size), "-m", str(number), "-f", "bench@supplier.example",
                        "-t", "feed@datafeeds.example.org", f"127.0.0.1:{port}"], check=True, timeout=1200)

    def wait(sent: int, deadline: float) -> None:
        while finished(sent) < sent and time.monotonic() < deadline:
            time.sleep(0.02)
        if finished(sent) < sent:
            raise RuntimeError(f"only {finished(sent)} of {sent} messages were delivered or stored")

    source(WARM_UP, sessions)
    wait(WARM_UP, time.monotonic() + 120)
    os.sync()  # what the rows before left to write is not this row's to flush
    cpu, stages = cpu_seconds(pid), cpu_by_stage(pid, stage)
    started = time.monotonic()
    source(count, sessions)
    accepted = time.monotonic() - started
    wait(WARM_UP + count, started + 1800)
    finished_at = time.monotonic()
    stages = {name: ms / count * 1000 for name, ms in (cpu_by_stage(pid, stage) - stages).items()}  # a Counter drops ≤ 0
    return count / accepted, count / (finished_at - started), (cpu_seconds(pid) - cpu) / count * 1000, stages


def esmail_finished(work: Path):
    """For `end_to_end`: how many of the `sent` messages esmail accepted are no longer queued (stored, or failed: checked after)."""
    queue = work / "spool" / "queue"
    return lambda sent: sent - sum(1 for name in os.listdir(queue) if name.endswith(".msg"))


def inbox_objects(work: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(work / "data" / "es-development-data-inbox"))


def versus_postfix(args, work: Path, dns) -> None:
    """End to end against Postfix, in the same run: from the first connection until the last message is delivered
    (Postfix: into its Maildir, fsync'd) or stored (esmail: its objects stored, the spool entry removed)."""
    missing = Postfix.unavailable()
    if missing:
        print(f"(no Postfix rows: {missing})")
        return
    print(f"end to end against Postfix {postfix_version()}: smtp-source, {args.sessions} sessions, a connection per message, "
          "plain text (no attachments)")
    print(f"{'server':50} {'accepts msg/s':>14} {'end to end msg/s':>17}   {'CPU ms/msg':>10}")
    for size, label, count in ((5_000, "5 KB", int(args.seconds * 375)), (1_000_000, "1 MB", int(args.seconds * 36))):
        postfix = Postfix(_fresh(work / f"postfix-{size}")).start()
        try:
            peer = end_to_end(postfix.port, size, count, args.sessions, lambda sent: postfix.delivered(), postfix.master())
        finally:
            postfix.stop()
        print(f"{f'{label} × {count:,} · Postfix (queue + Maildir)':50} {peer[0]:14.1f} {peer[1]:17.1f}   {peer[2]:10.2f}", flush=True)
        print_stages(peer[3])
        if size == 5_000:  # Python's floor: what any receiver written in Python pays for the connections alone
            floor = canned_server()
            try:
                canned = end_to_end(floor.port, size, count, args.sessions, lambda sent: sent, floor.process.pid)
            finally:
                floor.stop()
            print(f"{f'{label} × {count:,} · canned Python replies (the floor)':50} {canned[0]:8.1f} {canned[0] / peer[0]:4.2f}× "
                  f"{'(discards)':>17}   {canned[2]:10.2f}", flush=True)
        plain = "esmail serve, [smtp] processes = 2"
        esmails = [(plain, lambda folder: daemon(folder, processes=2))]
        if size == 5_000:
            esmails.append(("the same, a [[feed]] declared", lambda folder: feeds_daemon(folder, dns.server.server_address[1], processes=2)))
            if args.history_url:
                esmails.append(("the same, the history in PostgreSQL",
                                lambda folder: daemon(folder, f'[history]\nurl = "{args.history_url}"\n', processes=2)))
        for round_ in range(args.rounds if len(esmails) > 1 else 1):  # the rows in turns, the order reversed each round
            rates = {}
            for name, start in esmails if round_ % 2 == 0 else esmails[::-1]:
                folder = _fresh(work / f"e2e-{size}-{len(name)}-{round_}")
                server = start(folder)
                try:
                    ours = rates[name] = end_to_end(server.port, size, count, args.sessions, esmail_finished(folder), server.process.pid,
                                                    esmail_stages(server))
                finally:
                    server.stop()
                failed = len(os.listdir(folder / "spool" / "failed"))
                stored = inbox_objects(folder)
                shutil.rmtree(folder, ignore_errors=True)
                check = "" if stored == WARM_UP + count and not failed else f"  (!! {stored} inbox objects, {failed} failed)"
                print(f"{f'{label} × {count:,} · {name}':50} {ours[0]:8.1f} {ours[0] / peer[0]:4.2f}× {ours[1]:11.1f} "
                      f"{ours[1] / peer[1]:4.2f}×   {ours[2]:10.2f} (end to end ≥ 1.0×){check}", flush=True)
                print_stages(ours[3])
            if len(rates) > 1:
                print(f"  end to end against the first esmail row (≥ 0.9×): " + "; ".join(
                    f"{other[len('the same, '):]} {rates[other][1] / rates[plain][1]:.2f}×" for other in rates if other != plain), flush=True)


def print_stages(stages: dict) -> None:
    """The CPU ms a message of each stage, the largest first (0.01 ms and more)."""
    print("    CPU ms/msg by stage: " + " · ".join(f"{name} {ms:.2f}" for name, ms in sorted(stages.items(), key=lambda item: -item[1])
                                                   if ms >= 0.01), flush=True)


def postfix_version() -> str:
    return subprocess.run(["postconf", "-h", "mail_version"], capture_output=True, text=True).stdout.strip()


def big_message_while_busy(args, work: Path, dns) -> None:
    """The 39 MB message: accepted and converted while small messages keep coming; p99 reply, peak RSS."""
    xlsx = big_xlsx()
    big = big_message(xlsx)
    dir_ = _fresh(work / "p99")
    server = daemon(dir_)
    try:
        quiet = load(server.port, 5_000, 4, args.seconds)
        started = time.monotonic()
        with subprocess.Popen([sys.executable, str(HERE), "_load", str(server.port), "5000", "4", str(args.seconds * 3)],
                              stdout=subprocess.PIPE, text=True) as loader:
            reply = send(server.port, big)
            accepted = time.monotonic() - started
            target = dir_ / "data" / "es-development-data-amr-data" / "big"
            while len(list(target.glob("*/*.csv"))) < 2 and time.monotonic() - started < 600:
                time.sleep(0.1)
            converted = time.monotonic() - started
            busy = json.loads(loader.communicate()[0])
        pids = [server.process.pid, *children(server.process.pid)]
        peaks = {pid: peak_rss_mb(pid) for pid in pids}
    finally:
        server.stop()
    print(f"big message: {len(big) / 1e6:.1f} MB ({xlsx.stat().st_size / 1e6:.1f} MB xlsx of 1.9M cells, and a CSV): "
          f"accepted in {accepted:.1f} s ({reply.split()[0]}), converted and stored {converted:.1f} s after it was sent")
    print(f"p99 reply, 5 KB messages, 4 sessions: {quiet['p99'] * 1000:.0f} ms idle, "
          f"{busy['p99'] * 1000:.0f} ms while the big one is taken and converted "
          f"({busy['p99'] / quiet['p99']:.1f}× idle; target ≤ 1000 ms)")
    main_pid = server.process.pid
    others = " + ".join(f"{mb:.0f}" for pid, mb in peaks.items() if pid != main_pid)
    print(f"peak RSS of esmail serve: {peaks[main_pid]:.0f} MB (daemon) + {others} MB (conversion processes) "
          f"= {sum(peaks.values()):.0f} MB (target ≤ 400 MB)")


def burst(args, work: Path, dns) -> None:
    """A burst of 1 MB messages that the worker cannot keep up with: the replies to small messages sent meanwhile
    (p99) and the daemon's memory (its processes' RSS together, sampled) while the spool's backlog grows."""
    folder = _fresh(work / "burst")
    server = daemon(folder, processes=2)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            pids = [server.process.pid, *children(server.process.pid)]
            queued = sum(1 for name in os.listdir(folder / "spool" / "queue") if name.endswith(".msg"))
            samples.append((sum(rss_mb(pid) for pid in pids), queued))

    try:
        quiet = load(server.port, 5_000, 4, args.seconds)
        sampler = threading.Thread(target=sample)
        sampler.start()
        with subprocess.Popen([sys.executable, str(HERE), "_load", str(server.port), "5000", "4", str(args.seconds * 3)],
                              stdout=subprocess.PIPE, text=True) as small:
            big = load(server.port, 1_000_000, args.sessions, args.seconds * 3)
            busy = json.loads(small.communicate()[0])
        stop.set()
        sampler.join()
    finally:
        server.stop()
    rss = [mb for mb, _ in samples]
    print(f"burst: {big['messages']} × 1 MB in {big['seconds']:.0f} s ({big['rate']:.0f} msg/s, {args.sessions} sessions), "
          f"{samples[-1][1]} messages still queued at its end (the worker behind)")
    print(f"  p99 reply to 5 KB messages sent meanwhile: {busy['p99'] * 1000:.0f} ms ({quiet['p99'] * 1000:.0f} ms idle; target ≤ 1000 ms)")
    print(f"  RSS of esmail serve (all its processes): {rss[0]:.0f} MB at the start, {max(rss):.0f} MB at most, "
          f"{rss[-1]:.0f} MB at the end (flat: the backlog waits on disk)")


class Proxy:
    """A TCP proxy (asyncio, in a thread of its own) in front of a server: `stop` closes its port and every connection
    through it, as an outage would; `start` opens it again on the same port."""

    def __init__(self, target: int):
        self.target = target
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self._server = None
        self._open: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port, reuse_address=True)

    async def _stop(self) -> None:
        self._server.close()
        for writer in list(self._open):
            writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._open |= {writer, upstream}

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(1 << 16):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()

        await asyncio.gather(copy(reader, upstream), copy(upstream_reader, writer))
        self._open -= {writer, upstream}


def outage(args, work: Path, dns, count: int = 40) -> None:
    """S3 (moto's server) behind a proxy that is stopped for --outage seconds while `count` messages arrive, one
    every so often; then started again: the time from the store's return until the last message's objects are stored."""
    for tree in (None, args.against) if args.against else (None,):
        drained = outage_drain(work / f"outage-{tree.name if tree else 'this'}", args.outage, count, tree)
        print(f"storage outage: {count} messages arrived during a {args.outage:.0f}-s outage of S3 (moto behind a proxy); "
              f"{f'the esmail of {tree.name}: ' if tree else ''}all stored {drained:.1f} s after it came back (target ≤ 15 s)", flush=True)


def outage_drain(folder: Path, seconds: float, count: int, tree: Path | None) -> float:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request

    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    proxy = Proxy(moto_port)
    proxy.start()
    url = f"http://127.0.0.1:{proxy.port}"
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="eu-west-2",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    for bucket in ("inbox", "amr-data", "unprocessable"):
        try:
            s3.create_bucket(Bucket=f"es-development-data-{bucket}", CreateBucketConfiguration={"LocationConstraint": "eu-west-2"})
        except s3.exceptions.BucketAlreadyOwnedByYou:  # moto keeps its buckets in this process: made by the run before
            pass
    server = daemon(_fresh(folder), tree=tree, storage=f'backend = "s3"\nendpoint_url = "{url}"\nregion = "eu-west-2"\n')
    try:
        proxy.stop()
        down = time.monotonic()
        for n in range(count):
            time.sleep(max(down + n * seconds / count - time.monotonic(), 0))
            send(server.port, message(5_000))
        time.sleep(max(down + seconds - time.monotonic(), 0))
        proxy.start()
        back = time.monotonic()
        finished = esmail_finished(folder)
        while finished(count) < count and time.monotonic() - back < 1200:
            time.sleep(0.05)
        drained = time.monotonic() - back
    finally:
        server.stop()
        proxy.stop()
        moto.stop()
    return drained


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        command, *rest = sys.argv[1:]
        if command == "_load":
            print(json.dumps(asyncio.run(_load(int(rest[0]), int(rest[1]), int(rest[2]), float(rest[3])))))
        elif command == "_serve_bare":
            asyncio.run(_serve_bare(int(rest[0])))
        elif command == "_serve_accept":
            asyncio.run(_serve_accept(int(rest[0]), rest[1]))
        elif command == "_serve_canned":
            others = [subprocess.Popen([sys.executable, str(HERE), command, rest[0], "1"]) for _ in range(int(rest[1]) - 1)]

            def stop(*_) -> None:
                for other in others:
                    other.terminate()
                sys.exit(0)
            signal.signal(signal.SIGTERM, stop)
            asyncio.run(_serve_canned(int(rest[0])))
    else:
        main()
