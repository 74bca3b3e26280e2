"""Running esmail as a service: the systemd unit and the notify protocol, as systemd would see them."""

import errno
import http.server
import json
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import RunningDaemon, Server, free_port, self_signed
from esmail.config import Address, Config, HttpConfig, SpoolConfig, StorageConfig, WorkerConfig
from test_smtp import feed, reply_to

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
    http = free_port()
    server = Server(config, tmp_path, smtp=f'tls_cert = "{cert}"\ntls_key = "{key}"', tables=f'[http]\nlisten = "127.0.0.1:{http}"')
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
        expiry = scrape(f"http://127.0.0.1:{http}")[("esmail_tls_certificate_expiry_timestamp_seconds", ())]
        assert 0 < expiry - time.time() <= 86400  # the test certificate is valid for a day
        key.write_text("not a key")  # a broken renewal: the old certificate stays, the server stays up, /healthz says so
        server.process.send_signal(signal.SIGHUP)
        time.sleep(0.2)
        assert served_certificate() == ssl.PEM_cert_to_DER_cert(cert.read_text()) and server.process.poll() is None
        status, body = get(f"http://127.0.0.1:{http}/healthz")
        assert status == 503 and "the TLS certificate could not be reloaded" in body
    finally:
        assert server.terminate() == 0
    assert "SIGHUP: reloaded the TLS certificate" in server.log.read_text()
    assert "cannot load the certificate and key" in server.log.read_text()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    status, text = get(f"{base}/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def with_http(config: Config) -> Config:
    return replace(config, http=HttpConfig(listen=Address("127.0.0.1", 0)))


@pytest.mark.parametrize("config", ["local"], indirect=True)
def test_metrics_move_after_a_message_and_healthz_says_ok(config):
    with RunningDaemon(with_http(config)) as server:
        base = f"http://127.0.0.1:{server.daemon.monitor.port}"
        assert get(f"{base}/healthz") == (200, '{"status": "ok"}')
        before = scrape(base)
        with server.smtp() as client:
            client.sendmail("a@b.org", ["sheffield@datafeeds.example.org"], feed())
            assert reply_to(client, "MAIL FROM:<a@b.org>")[0] == 250
            assert reply_to(client, "RCPT TO:<bad!name@datafeeds.example.org>")[0] == 550
        eventually_true = time.monotonic() + 30
        while scrape(base).get(("esmail_messages_total", (("outcome", "stored"),)), 0) == before.get(("esmail_messages_total", (("outcome", "stored"),)), 0):
            assert time.monotonic() < eventually_true, "the message was not processed"
            time.sleep(0.05)
        after = scrape(base)

    def moved(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("esmail_smtp_replies_total", command="DATA", code="250") == 1
    assert moved("esmail_smtp_replies_total", command="RCPT", code="550") == 1
    assert moved("esmail_objects_stored_total", bucket="amr_data") == 1
    assert moved("esmail_objects_stored_total", bucket="inbox") == 1
    assert moved("esmail_stored_bytes_total", bucket="amr_data") == len(b"MPAN,00:30\n2200013680374,1.5\n")
    assert moved("esmail_conversion_seconds_count") == 1
    assert after[("esmail_spool_depth", ())] == 0 and after[("esmail_spool_oldest_seconds", ())] == 0


@pytest.mark.parametrize("config", ["local"], indirect=True)
def test_healthz_is_503_with_the_reason_when_the_spool_cannot_take_mail(config):
    with RunningDaemon(with_http(config)) as server:
        base = f"http://127.0.0.1:{server.daemon.monitor.port}"
        server.daemon.spool.min_free = 10**18  # as if the disk had filled up
        status, body = get(f"{base}/healthz")
        assert status == 503
        [problem] = json.loads(body)["problems"]
        assert "under [spool] min_free (1,000,000,000,000,000,000)" in problem


def test_healthz_is_503_after_a_failed_store_write(tmp_path):
    config = Config(storage=StorageConfig(backend="s3", endpoint_url=f"http://127.0.0.1:{free_port()}", region="eu-west-2"),
                    spool=SpoolConfig(path=tmp_path / "spool", min_free=0), worker=WorkerConfig(processes=1),
                    secrets={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    with RunningDaemon(with_http(config)) as server:
        base = f"http://127.0.0.1:{server.daemon.monitor.port}"
        with server.smtp() as client:
            client.sendmail("a@b.org", ["sheffield@datafeeds.example.org"], feed())
        deadline = time.monotonic() + 60
        while (status := get(f"{base}/healthz"))[0] == 200:
            assert time.monotonic() < deadline, "the store failure never showed"
            time.sleep(0.1)
        assert status[0] == 503 and "the last store write failed" in json.loads(status[1])["problems"][0]
        assert scrape(base)[("esmail_spool_depth", ())] == 1  # the message waits in the spool


@pytest.mark.parametrize("key", ["smtp", "http"])
def test_a_port_that_cannot_be_bound_names_its_key(tmp_path, key):
    other = "http" if key == "smtp" else "smtp"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        toml = tmp_path / "esmail.toml"
        toml.write_text(f'[storage]\npath = "{tmp_path / "data"}"\n[spool]\npath = "{tmp_path / "spool"}"\nmin_free = 0\n'
                        f'[{key}]\nlisten = "127.0.0.1:{port}"\n[{other}]\nlisten = "127.0.0.1:{free_port()}"\n')
        result = subprocess.run([sys.executable, "-m", "esmail", "--config", str(toml), "serve"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"esmail serve: cannot listen on 127.0.0.1:{port} ([{key}] listen): Address already in use (another program holds it: " \
           f"ss -ltnp 'sport = :{port}' shows which)" in result.stderr


@pytest.mark.parametrize("error, says", [
    (errno.EADDRINUSE, "cannot listen on 0.0.0.0:25 ([smtp] listen): Address already in use (another program holds it: "
                       "ss -ltnp 'sport = :25' shows which; on port 25 usually the system's own mail server (exim4, postfix: "
                       "systemctl disable --now exim4), or an esmail already running)"),
    (errno.EACCES, "cannot listen on 0.0.0.0:25 ([smtp] listen): Permission denied (ports below 1024 need root or "
                   "CAP_NET_BIND_SERVICE, which the systemd unit grants)"),
])
def test_port_25_taken_or_forbidden_says_which_and_what_to_do(error, says):
    """In use: another MTA, and how to see it; refused: the capability. Each hint only where it applies."""
    from esmail.config import Address
    from esmail.errors import CannotListen

    assert str(CannotListen("[smtp] listen", Address("0.0.0.0", 25), OSError(error, os.strerror(error)))) == says


class Recorder(http.server.ThreadingHTTPServer):
    """A stand-in for Rollbar's API (and a portal whose links are gone): records every JSON body POSTed."""

    def __init__(self):
        self.items: list[dict] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                recorder.items.append({"path": self.path, "token": self.headers.get("X-Rollbar-Access-Token"), "json": json.loads(body)})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"err": 0, "result": {"uuid": "0"}}')

            def do_GET(self):
                self.send_error(404)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def reports(self, timeout: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.items:
            time.sleep(0.05)
        return self.items


def test_problems_are_reported_to_rollbar_without_bodies(tmp_path):
    recorder = Recorder()
    port = free_port()
    toml = tmp_path / "esmail.toml"
    toml.write_text(f'stage = "staging"\n[storage]\npath = "{tmp_path / "data"}"\n[spool]\npath = "{tmp_path / "spool"}"\nmin_free = 0\n'
                    f'[smtp]\nlisten = "127.0.0.1:{port}"\n[worker]\nprocesses = 1\n[rollbar]\nendpoint = "{recorder.url}/api/1/"\n'
                    f"[links]\npatterns = ['http://127\\.0\\.0\\.1:{recorder.server_address[1]}/[a-z]+']\n")
    serve = subprocess.Popen([sys.executable, "-m", "esmail", "--config", str(toml), "--log-format", "json", "serve"],
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "ROLLBAR_ACCESS_TOKEN": "7e57700007e57700007e57700007e577"})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client = smtplib.SMTP("127.0.0.1", port, timeout=30)
                break
            except OSError:
                assert time.monotonic() < deadline and serve.poll() is None, f"esmail serve did not start: {serve.stderr.read()}"
                time.sleep(0.05)
        with client:
            client.sendmail("a@b.org", ["sheffield@x.org"], feed(csv=b"SECRET-ATTACHMENT-BYTES", name="photo.jpg"))
            link = EmailMessage()
            link["To"] = "npower@x.org"
            link.set_content(f"SECRET-BODY-TEXT {recorder.url}/gone")
            client.sendmail("a@b.org", ["npower@x.org"], bytes(link))
        deadline = time.monotonic() + 30
        while len(recorder.items) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        serve.terminate()
        _, stderr = serve.communicate(timeout=60)
    items = recorder.items
    assert {item["path"] for item in items} == {"/api/1/item/"} and {item["token"] for item in items} == {"7e57700007e57700007e57700007e577"}
    data = {item["json"]["data"]["body"]["message"]["body"]: item["json"]["data"] for item in items}
    unprocessable = data["a file went to unprocessable"]
    assert unprocessable["environment"] == "staging" and unprocessable["level"] == "warning"
    assert unprocessable["body"]["message"]["prefix"] == "sheffield"
    assert unprocessable["body"]["message"]["key"].startswith("sheffield/") and unprocessable["body"]["message"]["key"].endswith("/photo.jpg")
    assert unprocessable["body"]["message"]["reason"] == "no conversion for .jpg"
    failed_link = data["a link download failed"]
    assert failed_link["level"] == "error" and failed_link["body"]["message"]["link"] == f"{recorder.url}/gone"
    assert failed_link["body"]["message"]["prefix"] == "npower"
    sent = json.dumps([item["json"] for item in items])
    assert "SECRET-BODY-TEXT" not in sent and "SECRET-ATTACHMENT-BYTES" not in sent
    # --log-format json: one object per line, the message line with its fields
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert len(lines) == len(stderr.splitlines())
    [stored] = [line for line in lines if line.get("outcome") == "stored" and line.get("prefixes") == ["sheffield"]]
    assert stored["sender"] == "a@b.org" and stored["client"] == "127.0.0.1" and stored["objects"] == 2 and stored["size"] > 0
    [inbox] = [line for line in lines if line.get("bucket") == "es-staging-data-inbox" and line["key"].startswith("npower/")]
    assert inbox["spool_id"] in inbox["key"] and inbox["bytes"] > 0


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chattr") is None, reason="an immutable folder (chattr +i) stands in for one owned by another user")
def test_a_storage_folder_esmail_may_not_write_is_an_error_for_a_human_and_still_retried(tmp_path):
    """Folders esmail may not write (made by a command run as root): ERROR naming `chown -R`, one Rollbar report, retried until fixed."""
    recorder = Recorder()
    config = Config(storage=StorageConfig(path=tmp_path / "data"), spool=SpoolConfig(path=tmp_path / "spool"))
    locked, amr_data = tmp_path / "data" / "es-development-data-inbox", tmp_path / "data" / "es-development-data-amr-data"
    locked.mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode:
        pytest.skip("this file system has no immutable flag")
    server = Server(config, tmp_path, tables=f'[rollbar]\nendpoint = "{recorder.url}/api/1/"\n')
    try:
        server.start(ROLLBAR_ACCESS_TOKEN="7e57700007e57700007e57700007e577")
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            client.sendmail("a@b.org", ["sheffield@x.org"], feed())
            client.sendmail("a@b.org", ["leeds@x.org"], feed())
        deadline = time.monotonic() + 30
        while server.log.read_text().count(": attempt 2 of ") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        subprocess.run(["chattr", "-i", str(locked)], check=True)
        deadline = time.monotonic() + 30
        while len(list(amr_data.rglob("*.csv"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        subprocess.run(["chattr", "-i", str(locked)])
        assert server.terminate() == 0
    log = server.log.read_text()
    errors = [line for line in log.splitlines() if ": attempt 1 of 100 failed (cannot write " in line]
    assert len(errors) == 2 and all(line.startswith("esmail: ERROR esmail.worker: ") for line in errors), log
    assert f"(esmail runs as root; folders made by another user, e.g. by a command run as root, need: chown -R root: {tmp_path / 'data'})" in errors[0]
    [item] = recorder.items
    assert item["json"]["data"]["body"]["message"]["body"] == "esmail cannot write to its storage: a human must fix it"
    assert len(list(amr_data.rglob("*.csv"))) == 2


def test_a_message_out_of_retries_is_reported(tmp_path):
    recorder = Recorder()
    config = Config(storage=StorageConfig(backend="s3", endpoint_url=f"http://127.0.0.1:{free_port()}", region="eu-west-2"),
                    spool=SpoolConfig(path=tmp_path / "spool"))
    server = Server(config, tmp_path, tables=f'max_attempts = 1\n[rollbar]\nendpoint = "{recorder.url}/api/1/"\n')
    server.start(ROLLBAR_ACCESS_TOKEN="7e57700007e57700007e57700007e577")
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            client.sendmail("a@b.org", ["sheffield@x.org"], feed())
        [item] = recorder.reports()
    finally:
        assert server.terminate() == 0
    data = item["json"]["data"]
    assert data["level"] == "error" and data["environment"] == "development"
    assert data["body"]["message"]["body"] == "a message failed for good: its raw copy went to unprocessable, its entry to failed/"
    assert data["body"]["message"]["prefix"] == "sheffield"
    assert data["body"]["message"]["reason"].startswith("gave up after 1 attempt; the last error: ")
    spool_id = data["body"]["message"]["spool_id"]
    assert (tmp_path / "spool" / "failed" / f"{spool_id}.msg").exists()
