"""SMTP acceptance speed, reply time under load, and peak memory (DESIGN §10), as ratios measured in one run.

    python benchmarks/smtp.py [--seconds 8] [--sessions 16]

1. Messages per second at --sessions concurrent senders, for 5 KB and 1 MB
   messages, against (a) a bare aiosmtpd handler that discards and (b) esmail's
   receiver with its durable spool (fsync'd before 250; the worker not running,
   so that both sides do the same job: take the message). (c) is the whole
   `esmail serve`, whose worker converts and stores what it takes, on the same
   machine. Each server runs in its own process; the load client is one asyncio
   process that keeps every session busy (MAIL, RCPT, DATA, wait for the reply).
2. The p99 reply time of small messages while `esmail serve` converts a big
   xlsx (a ~39 MB message), against the p99 with nothing to convert.
3. The peak RSS of `esmail serve` (its own process, and its conversion process)
   after it took and processed that message.
Targets: 5 KB ≥ 0.8× bare, 1 MB ≥ 3× bare, p99 ≤ 1 s, peak RSS ≤ 400 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CORPUS = Path(__file__).parent / "corpus"
HERE = Path(__file__).resolve()


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
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(self.process.stderr.read().decode())
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


def daemon(work: Path, more: str = "", tree: Path | None = None, processes: int = 1) -> Server:
    """`esmail serve` on a fresh spool; `tree`: the esmail of another checkout (`git worktree add DIR REV`);
    `processes`: [smtp] processes (receiver processes on the port)."""
    port = free_port()
    receivers = f"processes = {processes}\n" if processes != 1 else ""
    (work / "esmail.toml").write_text(
        f'[smtp]\nlisten = "127.0.0.1:{port}"\nhostname = "bench"\n{receivers}[storage]\npath = "{work / "data"}"\n'
        f'[spool]\npath = "{work / "spool"}"\nmin_free = 0\n{more}')
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None
    return Server([sys.executable, "-m", "esmail", "--config", str(work / "esmail.toml"), "--log-level", "warning", "serve"], port, env=env)


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


def feeds_daemon(work: Path, dns_port: int) -> Server:
    """`esmail serve` with a feed declared: every message is authenticated (SPF, DKIM, DMARC) in the worker."""
    return daemon(work, f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n'
                        '[[feed]]\nprefix = "feed"\nsenders = ["*@supplier.example"]\nauthenticated = true\n')


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

def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
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

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="load per measurement (default 8)")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--against", type=Path, metavar="DIR",
                        help="also measure the 5 KB serve row of the esmail in another checkout (git worktree add DIR REV)")
    args = parser.parse_args()
    args.against = args.against.resolve() if args.against else None
    work = Path(tempfile.mkdtemp(prefix="esmail-bench-"))
    try:
        client = "Postfix smtp-source, a connection per message" if shutil.which("smtp-source") else "the script's client, sessions kept open"
        print(f"{args.sessions} concurrent sessions ({client}), ~{args.seconds:.0f} s per measurement, {os.cpu_count()} cores")
        print(f"spool in {work} (TMPDIR chooses); creating a file there takes {create_cost_us(work / 'spool-5000' / 'tmp'):.0f} µs\n")
        print(f"{'server':48} {'msg/s':>8}   ratio (target)")
        rates = {}
        dns = dns_server()
        serve = "esmail serve (also converts and stores)"
        serve2 = "esmail serve, [smtp] processes = 2"
        for size, label, target in ((5_000, "5 KB", 0.8), (1_000_000, "1 MB", 3.0)):
            servers = [("bare aiosmtpd, discards", bare_server),
                       ("esmail receiver + fsync'd spool", lambda: accept_server(work / f"spool-{size}")),
                       (serve, lambda: daemon(_fresh(work / f"daemon-{size}"))),
                       (serve2, lambda: daemon(_fresh(work / f"daemon2-{size}"), processes=2))]
            if size == 5_000:
                servers.append(("esmail serve, a [[feed]] declared", lambda: feeds_daemon(_fresh(work / "feeds"), dns.server.server_address[1])))
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
                if "feed" in name:
                    ratio += f", {measured / rates[(size, serve)]:.2f}× without feeds (≥ 0.9×)"
                if args.against and name.endswith(args.against.name):
                    ratio += f"; this tree's serve is {rates[(size, serve)] / measured:.2f}× it"
                print(f"{label + ' · ' + name:48} {measured:8.1f}   {ratio}", flush=True)
        dns.stop()

        print()
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
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
    else:
        main()
