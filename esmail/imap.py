"""IMAP mailboxes (`[[imap]]`): fetch each message, spool it (fsync'd), and only then move it out of the folder.

For operators who cannot point an MX record at esmail. Each mailbox is
watched by one thread running the standard library's imaplib: blocking I/O
off the event loop, bounded by socket timeouts. IDLE (RFC 2177) wakes it
when mail arrives, re-issued well within the 29 minutes the RFC allows;
polling every `poll_interval` catches what IDLE misses after a silent
disconnect. A message is identified by its Message-ID plus a SHA-256 of
its bytes: one spooled before a crash, but not yet moved, is only moved.
"""

from __future__ import annotations

import hashlib
import imaplib
import logging
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from email.message import EmailMessage

from esmail import mail, report
from esmail.logs import counted
from esmail.config import ImapConfig
from esmail.errors import TemporaryFailure
from esmail.spool import Spool

log = logging.getLogger(__name__)

IO_TIMEOUT = 60.0  # seconds for any one exchange with the server
IDLE_AT_MOST = 25 * 60.0  # RFC 2177: re-issue IDLE before the server's 30-minute timer
MAX_BACKOFF = 300.0


class Mailbox:
    """One mailbox's watcher: `run()` until `stop()`; every spooled entry id goes to `on_spooled`."""

    def __init__(self, config: ImapConfig, login: Login, spool: Spool, on_spooled: Callable[[str], None],
                 domains: tuple[str, ...], max_message_size: int):
        self.config = config
        self.login = login
        self.spool = spool
        self.on_spooled = on_spooled
        self.domains = domains
        self.max_message_size = max_message_size
        self._stopping = threading.Event()
        self._too_big: set[bytes] = set()
        self._conn: imaplib.IMAP4 | None = None
        self.problem: str | None = None  # why the mailbox cannot be read now (/healthz); None when it can

    def stop(self) -> None:
        """Ask the watcher to end, and cut its connection so that no network wait holds it (a message half-taken is safe: see `_take`)."""
        self._stopping.set()
        conn = self._conn
        if conn is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def run(self) -> None:
        """Connect, fetch, wait, fetch…; on any error reconnect with capped backoff, logging once per outage."""
        failures = 0
        while not self._stopping.is_set():
            try:
                with self._connect() as conn:
                    self._conn = conn
                    self._ensure_folder(conn, self.config.processed_folder)
                    while not self._stopping.is_set():
                        self.fetch(conn)
                        if failures:  # a whole round worked: the outage is over
                            log.info("%s: connected again after %s", self.config, counted(failures, "failed attempt"))
                            failures = 0
                        self.problem = None
                        self._wait(conn)
            except (OSError, EOFError, imaplib.IMAP4.error, TemporaryFailure) as exc:
                if self._stopping.is_set():
                    break
                failures += 1
                self.problem = describe(exc, self.config)
                if failures == 1:  # once per outage, not once per attempt
                    log.warning("%s: %s; retrying with backoff up to %.0fs (quiet until it recovers)", self.config, self.problem, MAX_BACKOFF)
                    report.problem("an IMAP mailbox cannot be read", mailbox=str(self.config), reason=self.problem,
                                   code=getattr(exc, "code", ""))
                self._stopping.wait(min(2.0 ** (failures - 1), MAX_BACKOFF))

    # --- one connection ---------------------------------------------------------

    def _connect(self) -> imaplib.IMAP4:
        return connect(self.config, self.login)

    def _ensure_folder(self, conn: imaplib.IMAP4, folder: str) -> None:
        typ, data = conn.list('""', _quoted(folder))
        if typ == "OK" and any(item for item in data if item):
            return
        typ, data = conn.create(_quoted(folder))
        if typ != "OK":
            raise imaplib.IMAP4.error(f"cannot create the folder {folder!r}: {data[0]!r}")
        log.info("%s: created the folder %s", self.config, folder)

    def fetch(self, conn: imaplib.IMAP4) -> int:
        """Spool and move every message in the folder; return how many were spooled."""
        typ, data = conn.select(_quoted(self.config.folder))
        if typ != "OK":
            raise imaplib.IMAP4.error(f"cannot open the folder {self.config.folder!r}: {data[0]!r}")
        typ, data = conn.uid("SEARCH", None, "ALL")
        spooled = 0
        for uid in data[0].split() if typ == "OK" and data[0] else []:
            if self._stopping.is_set():
                break
            spooled += self._take(conn, uid)
        return spooled

    def _take(self, conn: imaplib.IMAP4, uid: bytes) -> int:
        """Spool one message, then move it; killed in between, the next fetch finds it spooled and only moves it."""
        typ, data = conn.uid("FETCH", uid, "(RFC822.SIZE)")
        size = re.search(rb"RFC822\.SIZE (\d+)", b" ".join(d if isinstance(d, bytes) else d[0] for d in data if d))
        if size and int(size.group(1)) > self.max_message_size:
            if uid not in self._too_big:
                self._too_big.add(uid)
                log.error("%s: message UID %s is %s bytes, over [smtp] max_message_size; it stays in the folder",
                          self.config, uid.decode(), size.group(1).decode())
            return 0
        typ, data = conn.uid("FETCH", uid, "(INTERNALDATE BODY.PEEK[])")
        parts = [d for d in data if isinstance(d, tuple)]
        if typ != "OK" or not parts:
            return 0  # expunged meanwhile by another client
        head, raw = parts[0]
        received = _internaldate(head)
        headers = mail.parse_headers(raw)
        key = identity(raw, headers)
        prefixes = [self.config.prefix] if self.config.prefix else [p for p in [mail.header_prefix(headers, self.domains)] if p]
        envelope = self.spool.accept_once(raw, prefixes, key, received, origin="imap", client=self.config.host,
                                          sender=self.config.username, recipients=tuple(prefixes),
                                          trusted_authserv_id=self.config.trusted_authserv_id or "")
        if envelope is not None:
            log.info("%s: queued %d bytes (UID %s) for %s", envelope.id, len(raw), uid.decode(), ",".join(envelope.folders) or "nobody",
                     extra={"spool_id": envelope.id, "client": self.config.host, "prefixes": list(envelope.folders), "size": len(raw)})
            self.on_spooled(envelope.id)
        self._move(conn, uid)
        self.spool.forget_taken(key)
        return envelope is not None

    def _move(self, conn: imaplib.IMAP4, uid: bytes) -> None:
        target = _quoted(self.config.processed_folder)
        if "MOVE" in conn.capabilities:
            typ, data = conn.uid("MOVE", uid, target)
        else:
            typ, data = conn.uid("COPY", uid, target)
            if typ == "OK":
                conn.uid("STORE", uid, "+FLAGS.SILENT", r"(\Deleted)")
                typ, data = conn.uid("EXPUNGE", uid) if "UIDPLUS" in conn.capabilities else conn.expunge()
        if typ != "OK":
            raise imaplib.IMAP4.error(f"cannot move UID {uid.decode()} to {self.config.processed_folder!r}: {data[0]!r}")

    def _wait(self, conn: imaplib.IMAP4) -> None:
        """Until new mail is announced (IDLE) or `poll_interval` has passed."""
        deadline = time.monotonic() + min(self.config.poll_interval, IDLE_AT_MOST)
        if "IDLE" not in conn.capabilities:
            while not self._stopping.is_set() and time.monotonic() < deadline:
                self._stopping.wait(min(1.0, max(deadline - time.monotonic(), 0)))
            return
        tag = conn._new_tag()
        conn.send(tag + b" IDLE\r\n")
        woken = False
        while True:  # untagged news may come before the continuation
            line = conn.readline()
            if not line:
                raise EOFError("the server closed the connection at IDLE")
            if line.startswith(b"+"):
                break
            if line.startswith(tag):
                raise imaplib.IMAP4.error(f"the server refused IDLE: {line.decode(errors='replace').strip()}")
            woken = woken or b"EXISTS" in line
        while not woken and not self._stopping.is_set() and time.monotonic() < deadline:
            if _readable(conn, 1.0):
                line = conn.readline()
                if not line:
                    raise EOFError("the server closed the connection during IDLE")
                if b"EXISTS" in line:
                    break
        conn.send(b"DONE\r\n")
        while True:  # the rest of the untagged lines, then IDLE's own answer
            line = conn.readline()
            if not line:
                raise EOFError("the server closed the connection after IDLE")
            if line.startswith(tag):
                return


class PasswordLogin:
    """LOGIN with the mailbox's password."""

    def __init__(self, password: str):
        self.password = password

    def __call__(self, conn: imaplib.IMAP4, config: ImapConfig) -> None:
        conn.login(config.username, self.password)


Login = Callable[[imaplib.IMAP4, ImapConfig], None]


def login_for(config: ImapConfig, secrets: Mapping[str, str]) -> Login:
    """How a mailbox logs in: its password, or OAuth2 tokens (esmail.oauth)."""
    if config.auth == "oauth2":
        from esmail.oauth import OAuth2Login, Tokens

        return OAuth2Login(Tokens(config, secrets))
    return PasswordLogin(secrets[config.password_env])


def connect(config: ImapConfig, login: Login) -> imaplib.IMAP4:
    """A logged-in connection, TLS as configured (certificates checked)."""
    if config.tls == "implicit":
        conn = imaplib.IMAP4_SSL(config.host, config.port, ssl_context=ssl.create_default_context(), timeout=IO_TIMEOUT)
    else:
        conn = imaplib.IMAP4(config.host, config.port, timeout=IO_TIMEOUT)
        if config.tls == "starttls":
            conn.starttls(ssl.create_default_context())
    try:
        login(conn, config)
    except BaseException:
        conn.shutdown()
        raise
    return conn


def count_messages(config: ImapConfig, login: Login) -> int:
    """Log in and count the folder's messages (`esmail check-config`)."""
    with connect(config, login) as conn:
        typ, data = conn.select(_quoted(config.folder), readonly=True)
        if typ != "OK":
            raise imaplib.IMAP4.error(f"cannot open the folder {config.folder!r}: {data[0]!r}")
        return int(data[0])


def _readable(conn: imaplib.IMAP4, timeout: float) -> bool:
    """Whether a line is waiting, without blocking past `timeout` (TLS may hold decrypted bytes already)."""
    sock = conn.sock
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    return bool(select.select([sock], [], [], timeout)[0])


def identity(raw: bytes, headers: EmailMessage | None = None) -> str:
    """Message-ID plus a digest of the bytes: the same message fetched twice has the same identity.
    `headers`: the message's, when the caller has parsed them already."""
    message_id = (headers if headers is not None else mail.parse_headers(raw)).get("Message-ID", "") or ""
    return hashlib.sha256(str(message_id).strip().encode("utf-8", "replace") + b"\0" + hashlib.sha256(raw).digest()).hexdigest()


def _internaldate(head: bytes) -> datetime:
    """When the mailbox received the message (UTC): the key folder's time, the same on every fetch."""
    parsed = imaplib.Internaldate2tuple(head)
    return datetime.fromtimestamp(time.mktime(parsed), timezone.utc) if parsed else datetime.now(timezone.utc)


def _quoted(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def describe(exc: BaseException, config: ImapConfig | None = None) -> str:
    """An error in the words an operator needs, with what to check."""
    if isinstance(exc, imaplib.IMAP4.error) and ("AUTHENTICATIONFAILED" in str(exc) or "Authentication failed" in str(exc)):
        check = ("the app's IMAP access to this mailbox: Microsoft 365, the IMAP.AccessAsApp permission and the Exchange "
                 "mailbox permission; Google, the grant behind the refresh token" if config is not None and config.auth == "oauth2"
                 else "the password in password_env")
        return f"login refused (check username and {check}): {exc}"
    if isinstance(exc, socket.timeout):
        return f"no answer within {IO_TIMEOUT:.0f}s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"its TLS certificate is not trusted ({exc.verify_message}): check the host name; for a server with a private CA "
                "or a self-signed certificate, put SSL_CERT_FILE=/path/to/its-ca.pem in the service's environment "
                "(/etc/esmail/env)")
    return f"{type(exc).__name__}: {exc}"
