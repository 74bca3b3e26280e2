"""Running esmail as a service: the systemd unit and the notify protocol, as systemd would see them."""

import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Server
from esmail.config import Config, SpoolConfig, StorageConfig
from test_smtp import feed, self_signed

UNIT = Path(__file__).parents[1] / "systemd" / "esmail.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (Debian package systemd)")
def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    """Everything but the install path is checked as written (verify insists that ExecStart exists)."""
    unit = tmp_path / "esmail.service"
    unit.write_text(UNIT.read_text().replace("/opt/esmail/bin/esmail", shutil.which("esmail") or "/bin/true"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def datagrams(sock: socket.socket, until: str, timeout: float = 30) -> list[str]:
    """Notify messages received until one holds the line `until`."""
    received = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            received.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if until in received[-1].splitlines():
            return received
    raise AssertionError(f"no {until} within {timeout}s; got {received}")


def test_serve_tells_systemd_ready_watchdog_status_and_stopping(tmp_path):
    config = Config(storage=StorageConfig(path=tmp_path / "data"), spool=SpoolConfig(path=tmp_path / "spool"))
    server = Server(config, tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        server.start(NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="200000")
        ready = datagrams(sock, "READY=1")[-1].splitlines()
        assert f"STATUS=0 queued, 0 failed; listening on 127.0.0.1:{server.port}" in ready
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            client.sendmail("a@b.org", ["sheffield@datafeeds.example.org"], feed(csv=b"a,b\n", name="a.csv"))
        assert datagrams(sock, "WATCHDOG=1", timeout=5)  # every 0.1 s: half of WATCHDOG_USEC
        deadline = time.monotonic() + 30
        while not list((tmp_path / "data").rglob("a.csv")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.terminate() == 0
        stopping = datagrams(sock, "STOPPING=1", timeout=5)
    assert "STATUS=stopping: sessions finish their message" in stopping[-1].splitlines()
    assert list((tmp_path / "data").rglob("a.csv"))


def test_sighup_reloads_the_tls_certificate(tmp_path):
    """A renewed certificate (same paths, as certbot leaves them) is served to new sessions after SIGHUP."""
    cert, key = self_signed(tmp_path)
    config = Config(storage=StorageConfig(path=tmp_path / "data"), spool=SpoolConfig(path=tmp_path / "spool"))
    server = Server(config, tmp_path, smtp=f'tls_cert = "{cert}"\ntls_key = "{key}"')
    server.start()

    def served_certificate() -> bytes:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            client.starttls(context=ssl._create_unverified_context())
            return client.sock.getpeercert(binary_form=True)

    try:
        first = served_certificate()
        assert first == ssl.PEM_cert_to_DER_cert(cert.read_text())
        self_signed(tmp_path)  # renewed in place
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while served_certificate() == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served_certificate() == ssl.PEM_cert_to_DER_cert(cert.read_text())
        key.write_text("not a key")  # a broken renewal: the old certificate stays, the server stays up
        server.process.send_signal(signal.SIGHUP)
        time.sleep(0.2)
        assert served_certificate() == ssl.PEM_cert_to_DER_cert(cert.read_text()) and server.process.poll() is None
    finally:
        assert server.terminate() == 0
    assert "SIGHUP: reloaded the TLS certificate" in server.log.read_text()
    assert "cannot load the certificate and key" in server.log.read_text()
