"""`[[imap]]` mailboxes against a real Dovecot: messages land as CSV and move to Processed, once, whatever happens."""

import imaplib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from datetime import datetime, timezone
from email.message import EmailMessage

import pytest

import dovecot as dovecot_server
from conftest import RunningDaemon, bucket_contents, config_toml, eventually, free_port
from esmail.config import Address, Config, HttpConfig, ImapConfig
from esmail.imap import identity
from esmail.spool import Spool

PASSWORD_ENV = "IMAP_PASSWORD"
CSV = b"MPAN,kWh\r\n2200013680374,1.5\r\n"
pytestmark = pytest.mark.parametrize("config", ["local"], indirect=True)


def client(server) -> imaplib.IMAP4:
    conn = imaplib.IMAP4("127.0.0.1", server.port, timeout=30)
    conn.login(dovecot_server.USER, dovecot_server.PASSWORD)
    return conn


def append(server, *messages: bytes) -> None:
    with client(server) as conn:
        for raw in messages:
            assert conn.append("INBOX", None, None, raw)[0] == "OK"


def count(server, folder: str) -> int:
    with client(server) as conn:
        typ, data = conn.select(f'"{folder}"', readonly=True)
        return int(data[0]) if typ == "OK" else 0


def feed(name: str = "export.csv", csv: bytes = CSV, to: str = "sheffield@datafeeds.example.org") -> bytes:
    msg = EmailMessage()
    msg["To"], msg["From"], msg["Subject"] = to, "meters@supplier.example", "readings"
    msg["Message-ID"] = f"<{name}.{time.monotonic_ns()}@supplier.example>"
    msg.set_content("attached")
    msg.add_attachment(csv, maintype="text", subtype="csv", filename=name)
    return bytes(msg).replace(b"\n", b"\r\n")


def with_mailbox(config: Config, server, password: str = dovecot_server.PASSWORD, **mailbox) -> Config:
    box = ImapConfig(**{"host": "127.0.0.1", "port": server.port, "tls": "none", "username": dovecot_server.USER,
                        "password_env": PASSWORD_ENV, "poll_interval": 5.0, **mailbox})
    return replace(config, imap=(box,), secrets={**config.secrets, PASSWORD_ENV: password})


def amr_keys(config) -> list[str]:
    root = config.storage.path / config.buckets.amr_data
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


async def test_a_message_lands_as_csv_within_poll_interval_and_moves_to_processed(config, store, dovecot):
    config = with_mailbox(config, dovecot)
    with RunningDaemon(config):
        time.sleep(0.5)  # watching (IDLE) before the message arrives
        started = time.monotonic()
        append(dovecot, feed())
        await eventually(lambda: amr_keys(config), timeout=config.imap[0].poll_interval)
        landed = time.monotonic() - started
        await eventually(lambda: count(dovecot, "Processed") == 1, timeout=10)
    assert landed < config.imap[0].poll_interval
    [key] = amr_keys(config)
    assert key.startswith("sheffield/") and key.endswith("/export.csv")
    assert (await bucket_contents(store, config.buckets.amr_data))[key] == b"MPAN,kWh\n2200013680374,1.5\n"
    assert count(dovecot, "INBOX") == 0
    assert not list(config.spool.path.joinpath("taken").iterdir())  # marks are released once moved


async def test_ten_messages_in_one_poll_with_a_fixed_prefix(config, store, dovecot):
    append(dovecot, *[feed(f"m{n}.csv", to="someone@elsewhere.example") for n in range(10)])
    config = with_mailbox(config, dovecot, prefix="npower")
    with RunningDaemon(config):
        await eventually(lambda: len(amr_keys(config)) == 10, timeout=30)
    keys = amr_keys(config)
    assert sorted(key.rsplit("/", 1)[1] for key in keys) == sorted(f"m{n}.csv" for n in range(10))
    assert all(key.startswith("npower/") for key in keys)
    assert count(dovecot, "INBOX") == 0 and count(dovecot, "Processed") == 10


async def test_the_server_restarted_mid_session_loses_nothing_and_duplicates_nothing(config, store, dovecot, caplog):
    config = with_mailbox(config, dovecot, poll_interval=1.0)
    caplog.set_level("INFO", logger="esmail.imap")
    with RunningDaemon(config):
        append(dovecot, feed("before.csv"))
        await eventually(lambda: len(amr_keys(config)) == 1, timeout=15)
        dovecot.crash()  # every session dies with it
        time.sleep(2.5)  # the watcher notices, and retries (1 s, 2 s)
        dovecot.start()
        append(dovecot, feed("after.csv"))
        await eventually(lambda: len(amr_keys(config)) == 2, timeout=60)  # a restarted Dovecot, reached with backoff
        await eventually(lambda: count(dovecot, "Processed") == 2, timeout=10)
        time.sleep(1.5)  # another poll: nothing more
    assert sorted(key.rsplit("/", 1)[1] for key in amr_keys(config)) == ["after.csv", "before.csv"]
    assert count(dovecot, "INBOX") == 0
    outage = [r for r in caplog.records if r.name == "esmail.imap" and r.levelname == "WARNING"]
    assert len(outage) == 1  # once per outage, not once per attempt
    assert "connected again after" in caplog.text


@pytest.mark.parametrize("marked", [True, False])
async def test_a_message_spooled_before_a_crash_is_only_moved(config, store, dovecot, marked):
    """The disk as kill -9 leaves it between spooling and moving: the entry queued (marked, or not yet), the message still in INBOX."""
    raw = feed("crash.csv")
    append(dovecot, raw)
    with client(dovecot) as conn:
        conn.select("INBOX")
        head = conn.uid("FETCH", "1", "(INTERNALDATE)")[1][0]
    received = datetime.fromtimestamp(time.mktime(imaplib.Internaldate2tuple(head)), timezone.utc)
    spool = Spool(config.spool.path)
    key = identity(raw)
    if marked:
        spool.accept_once(raw, ["sheffield"], key, received, origin="imap")
    else:  # killed after the entry was queued, before its mark was written
        spool.accept(raw, ["sheffield"], received=received, entry_id=f"{received:%Y%m%d-%H%M%S}-{key[:12]}", origin="imap")
    config = with_mailbox(config, dovecot)
    with RunningDaemon(config):
        await eventually(lambda: count(dovecot, "Processed") == 1, timeout=15)
        await eventually(lambda: not Spool(config.spool.path).pending(), timeout=15)
    inbox = await bucket_contents(store, config.buckets.inbox)
    assert len(inbox) == 1 and list(inbox.values()) == [raw]
    assert len(amr_keys(config)) == 1


async def test_kill_9_while_messages_flow_duplicates_nothing(config, store, dovecot, tmp_path):
    """esmail serve killed at random moments while 20 messages are fetched: after a restart each lands once."""
    messages = [feed(f"k{n}.csv") for n in range(20)]
    append(dovecot, *messages)
    toml = tmp_path / "esmail.toml"
    toml.write_text(config_toml(config) + f'min_free = 0\n[smtp]\nlisten = "127.0.0.1:{free_port()}"\n[worker]\nprocesses = 1\n'
                    f'[[imap]]\nhost = "127.0.0.1"\nport = {dovecot.port}\ntls = "none"\nusername = "{dovecot_server.USER}"\n'
                    f'password_env = "{PASSWORD_ENV}"\npoll_interval = 1\n')
    env = {**os.environ, PASSWORD_ENV: dovecot_server.PASSWORD}
    for delay in (0.6, 0.9, 1.2):
        serve = subprocess.Popen([sys.executable, "-m", "esmail", "--config", str(toml), "serve"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        serve.send_signal(signal.SIGKILL)
        serve.wait(10)
    serve = subprocess.Popen([sys.executable, "-m", "esmail", "--config", str(toml), "serve"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await eventually(lambda: count(dovecot, "Processed") == 20 and len(amr_keys(config)) >= 20, timeout=60)
        await eventually(lambda: not Spool(config.spool.path).pending(), timeout=30)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
    assert sorted(key.rsplit("/", 1)[1] for key in amr_keys(config)) == sorted(f"k{n}.csv" for n in range(20))
    assert len(await bucket_contents(store, config.buckets.inbox)) == 20
    assert count(dovecot, "INBOX") == 0


async def test_a_wrong_password_is_logged_once_and_retried_without_a_crash(config, store, dovecot, caplog):
    config = replace(with_mailbox(config, dovecot, password="wrong"), http=HttpConfig(listen=Address("127.0.0.1", 0)))
    with RunningDaemon(config) as server:
        deadline = time.monotonic() + 60
        while dovecot.log().count("auth failed") < 3 and time.monotonic() < deadline:  # Dovecot delays each refusal 2 s
            time.sleep(0.2)
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.daemon.monitor.port}/healthz", timeout=10)
            raise AssertionError("/healthz said 200")
        except urllib.error.HTTPError as unhealthy:
            status, [problem] = unhealthy.code, json.loads(unhealthy.read())["problems"]
    assert status == 503 and problem.startswith(f"the mailbox {config.imap[0]} cannot be read: login refused")
    assert dovecot.log().count("auth failed") >= 3  # it kept trying, and stopped cleanly
    failures = [r for r in caplog.records if r.name == "esmail.imap" and "login refused" in r.getMessage()]
    assert len(failures) == 1 and "check username and the password in password_env" in failures[0].getMessage()


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
async def test_tls_implicit_and_starttls_with_a_checked_certificate(config, store, dovecot, monkeypatch, tls):
    monkeypatch.setenv("SSL_CERT_FILE", str(dovecot.cert))  # trust the test certificate; its name is localhost
    config = with_mailbox(config, dovecot, tls=tls)
    box = replace(config.imap[0], host="localhost", port=dovecot.tls_port if tls == "implicit" else dovecot.port)
    config = replace(config, imap=(box,))
    append(dovecot, feed("tls.csv"))
    with RunningDaemon(config):
        await eventually(lambda: amr_keys(config), timeout=15)
    assert amr_keys(config)[0].endswith("/tls.csv")


def test_an_untrusted_certificate_names_ssl_cert_file(config, dovecot, tmp_path):
    """A mailbox whose certificate esmail does not trust: check-config says how to trust its CA, as `esmail send` does."""
    toml = tmp_path / "esmail.toml"
    toml.write_text(config_toml(config) + f'[[imap]]\nhost = "localhost"\nport = {dovecot.tls_port}\n'
                    f'username = "{dovecot_server.USER}"\npassword_env = "{PASSWORD_ENV}"\n')
    env = {k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}
    result = subprocess.run([sys.executable, "-m", "esmail", "--config", str(toml), "check-config"], capture_output=True, text=True,
                            env={**env, PASSWORD_ENV: dovecot_server.PASSWORD}, timeout=60)
    assert result.returncode == 1
    assert (f"FAILED  imap {dovecot_server.USER}@localhost:{dovecot.tls_port}/INBOX: its TLS certificate is not trusted "
            "(self-signed certificate): check the host name; for a server with a private CA or a self-signed certificate, "
            "put SSL_CERT_FILE=/path/to/its-ca.pem in the service's environment (/etc/esmail/env)") in result.stdout


def test_check_config_logs_in_and_counts_the_messages(config, dovecot, tmp_path):
    append(dovecot, feed("a.csv"), feed("b.csv"))
    toml = tmp_path / "esmail.toml"
    toml.write_text(config_toml(config) + f'[[imap]]\nhost = "127.0.0.1"\nport = {dovecot.port}\ntls = "none"\n'
                    f'username = "{dovecot_server.USER}"\npassword_env = "{PASSWORD_ENV}"\n')
    ok = subprocess.run([sys.executable, "-m", "esmail", "--config", str(toml), "check-config"], capture_output=True, text=True,
                        env={**os.environ, PASSWORD_ENV: dovecot_server.PASSWORD}, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"ok      imap {dovecot_server.USER}@127.0.0.1:{dovecot.port}/INBOX: 2 messages in INBOX" in ok.stdout
    wrong = subprocess.run([sys.executable, "-m", "esmail", "--config", str(toml), "check-config"], capture_output=True, text=True,
                           env={**os.environ, PASSWORD_ENV: "wrong"}, timeout=60)
    assert wrong.returncode == 1 and f"FAILED  imap {dovecot_server.USER}@127.0.0.1:{dovecot.port}/INBOX: login refused" in wrong.stdout


def test_esmail_poll_fetches_without_an_smtp_server_and_stops_cleanly(config, dovecot, tmp_path):
    toml = tmp_path / "esmail.toml"
    smtp_port = free_port()
    toml.write_text(config_toml(config) + f'min_free = 0\n[smtp]\nlisten = "127.0.0.1:{smtp_port}"\n[worker]\nprocesses = 1\n'
                    f'[[imap]]\nhost = "127.0.0.1"\nport = {dovecot.port}\ntls = "none"\nusername = "{dovecot_server.USER}"\n'
                    f'password_env = "{PASSWORD_ENV}"\n')
    append(dovecot, feed("polled.csv"))
    log = tmp_path / "poll.log"
    with open(log, "wb") as out:
        poll = subprocess.Popen([sys.executable, "-m", "esmail", "--config", str(toml), "poll"], stdout=out, stderr=out,
                                env={**os.environ, PASSWORD_ENV: dovecot_server.PASSWORD})
    try:
        deadline = time.monotonic() + 30
        while not amr_keys(config) and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(OSError):  # no SMTP server
            socket.create_connection(("127.0.0.1", smtp_port), timeout=1)
    finally:
        poll.send_signal(signal.SIGTERM)
        assert poll.wait(30) == 0, log.read_text()
    assert amr_keys(config)[0].endswith("/polled.csv") and count(dovecot, "Processed") == 1
    toml.write_text(config_toml(config))
    nothing = subprocess.run([sys.executable, "-m", "esmail", "--config", str(toml), "poll"], capture_output=True, text=True, timeout=60)
    assert nothing.returncode == 2 and "no [[imap]] mailbox in the config" in nothing.stderr
