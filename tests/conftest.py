"""Shared fixtures: a real S3 API (moto's server mode over HTTP) and configs that point at it."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from esmail.config import Address, Buckets, Config, SpoolConfig, StorageConfig, WorkerConfig
from esmail.spool import Spool
from esmail.store import open_store
from esmail.worker import Worker

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed-samples"  # ../shared beside the checkout

FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
REGION = "eu-west-2"


@pytest.fixture(scope="session")
def moto_url():
    """A moto S3 server on a free loopback port, for the whole session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def make_buckets(url: str, buckets: Buckets) -> None:
    s3 = boto3.client("s3", endpoint_url=url, region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing")
    for name in vars(buckets).values():
        s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})


_counter = iter(range(1_000_000))


@pytest.fixture(params=["local", "s3"])
def config(request, tmp_path) -> Config:
    """A config for each backend, with buckets of its own (fresh names per test on S3)."""
    n = next(_counter)
    buckets = Buckets(inbox=f"t{n}-inbox", amr_data=f"t{n}-amr-data", unprocessable=f"t{n}-unprocessable")
    spool = SpoolConfig(path=tmp_path / "spool", min_free=0)
    worker = WorkerConfig(processes=1)
    if request.param == "local":
        return Config(storage=StorageConfig(path=tmp_path / "data"), buckets=buckets, spool=spool, worker=worker)
    url = request.getfixturevalue("moto_url")
    make_buckets(url, buckets)
    storage = StorageConfig(backend="s3", endpoint_url=url, region=REGION)
    return Config(storage=storage, buckets=buckets, spool=spool, worker=worker, secrets=dict(FAKE_AWS))


@pytest.fixture
async def store(config):
    store = open_store(config)
    yield store
    await store.close()


RECEIVED = datetime(2025, 3, 23, 10, 11, 12, tzinfo=timezone.utc)


async def ingest(config, store, raw: bytes, prefixes: list[str], received=RECEIVED):
    """Spool a message and run the worker on it once, as `esmail ingest` does."""
    spool = Spool(config.spool.path)
    envelope = spool.accept(raw, prefixes, received=received, origin="ingest")
    stored = await Worker(config, spool, store).process(envelope.id)
    return envelope, stored, spool


async def bucket_contents(store, bucket: str) -> dict[str, bytes]:
    """Every object in a bucket: key → bytes."""
    return {key: await store.get(bucket, key) for key in await store.keys(bucket)}


def config_toml(config: Config) -> str:
    """The same config as a TOML file, for tests that run the CLI in a subprocess."""
    lines = [
        "[storage]",
        f'backend = "{config.storage.backend}"',
        f'path = "{config.storage.path}"',
    ]
    if config.storage.endpoint_url:
        lines += [f'endpoint_url = "{config.storage.endpoint_url}"', f'region = "{config.storage.region}"']
    lines += ["[buckets]"] + [f'{k} = "{v}"' for k, v in vars(config.buckets).items()]
    lines += ["[spool]", f'path = "{config.spool.path}"']
    return "\n".join(lines) + "\n"


class RunningDaemon:
    """`esmail serve` in a thread with its own event loop, on a free port; the test talks to it over real sockets."""

    def __init__(self, config: Config, **smtp):
        from esmail.daemon import Daemon

        config = replace(config, smtp=replace(config.smtp, listen=Address("127.0.0.1", 0), **smtp))
        self.config = config
        self.daemon = Daemon(config)
        self.spool = self.daemon.spool
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main():
            self.loop = asyncio.get_running_loop()
            self.exit_code = await self.daemon.run(self._ready.set)

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self._error = exc
            self._ready.set()

    def __enter__(self) -> "RunningDaemon":
        self._thread.start()
        assert self._ready.wait(20), "the daemon did not start"
        if self._error:
            raise self._error
        return self

    @property
    def port(self) -> int:
        return self.daemon.smtp.port

    def smtp(self, timeout: float = 30) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, timeout=timeout)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.daemon.stop)
            self._thread.join(60)
        assert not self._thread.is_alive(), "the daemon did not stop"

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._error and not exc[0]:
            raise self._error


async def eventually(check, timeout: float = 30.0, interval: float = 0.05):
    """Poll an (async or plain) check until it returns something truthy; its last result otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(interval)


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never given before in this run: the kernel may offer one just closed again
    (a host's page and its SMTP port were once the same)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


class Server:
    """`esmail serve` as its own process, as systemd would run it."""

    def __init__(self, config: Config, tmp_path, smtp: str = "", tables: str = ""):
        """`smtp`: more [smtp] keys; `tables`: appended after [worker] (so bare keys land in it), then more tables."""
        self.port = free_port()
        self.toml = tmp_path / "esmail.toml"
        self.toml.write_text(config_toml(config) + f'min_free = 0\n[smtp]\nlisten = "127.0.0.1:{self.port}"\n{smtp}\n'
                             f'[worker]\nprocesses = 1\n{tables}\n')
        self.log = tmp_path / "serve.log"
        self.process = None

    def start(self, *ports: int, **env: str) -> None:
        """Started once it listens on its SMTP port and on `ports` (a page's: it listens after the SMTP port)."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "esmail", "--config", str(self.toml), "serve"],
                                            stdout=log, stderr=log, env={**os.environ, **FAKE_AWS, **env})
        deadline = time.monotonic() + 30
        waiting = [self.port, *ports]
        while waiting and time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                socket.create_connection(("127.0.0.1", waiting[0]), timeout=1).close()
                waiting.pop(0)
            except OSError:
                time.sleep(0.05)
        if waiting:
            raise AssertionError(f"esmail serve did not start (nothing listens on port {waiting[0]}): " + self.log.read_text())

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


def self_signed(tmp_path):
    """A certificate and key for localhost, valid for a day: for STARTTLS and IMAP over TLS."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (tests/postgres.py); skipped where it is not installed, but never in CI."""
    import postgres

    if not postgres.available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed, and CI is set: .ci/run must install the Debian package postgresql")
        pytest.skip("PostgreSQL is not installed: apt-get install postgresql (the shared history is tested against a real server)")
    server = postgres.Postgres()
    server.start()
    yield server
    server.remove()


_databases = iter(range(1_000_000))
HISTORY_PASSWORD_ENV = "ESMAIL_HISTORY_PASSWORD"


@pytest.fixture
def history_url(postgres_server) -> str:
    """A new, empty database on the session's server, owned by the esmail role; its URL (no password in it)."""
    return postgres_server.new_database(f"history_{os.getpid()}_{next(_databases)}")


def with_history(config: Config, url: str) -> Config:
    """`config` with its history in PostgreSQL at `url`, the password in the environment variable password_env names."""
    import postgres

    return replace(config, history=replace(config.history, url=url, password_env=HISTORY_PASSWORD_ENV),
                   secrets={**config.secrets, HISTORY_PASSWORD_ENV: postgres.PASSWORD})


@pytest.fixture
def dovecot(tmp_path):
    """A real Dovecot on loopback (tests/dovecot.py); skipped where it is not installed, but never in CI."""
    import dovecot as dovecot_server

    if not dovecot_server.available():
        if os.environ.get("CI"):
            pytest.fail("Dovecot is not installed, and CI is set: .ci/run must install the Debian package dovecot-imapd")
        pytest.skip("Dovecot is not installed: apt-get install dovecot-imapd (the IMAP tests run against a real one)")
    cert, key = self_signed(tmp_path)
    server = dovecot_server.Dovecot(tmp_path / "dovecot", cert, key)
    server.cert = cert
    server.start()
    yield server
    server.stop()
