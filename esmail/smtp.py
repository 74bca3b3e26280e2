"""The SMTP receiver: check the envelope, spool the message, and only then answer 250.

Nothing here converts or stores; the worker takes each message from the
spool. Replies follow DESIGN §7. aiosmtpd does the protocol; esmail adds what
an MX host on the internet needs and aiosmtpd leaves out: DATA read in bulk
(aiosmtpd reads it a line at a time, ~20 MB/s), a size limit enforced while
reading, a cap on concurrent sessions, a total session time limit, and 451
rather than 500 when something inside goes wrong.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import socket
import ssl
from collections.abc import Mapping
from typing import Callable

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, Envelope as SmtpEnvelope, Session as SmtpSession, TLSSetupException

from esmail import metrics, report
from esmail.config import SmtpConfig
from esmail.errors import CannotListen, ConfigError, TemporaryFailure
from esmail.keys import domain_of, prefix_of
from esmail.group_commit import GroupCommit

log = logging.getLogger(__name__)

MAX_RECIPIENTS = 100  # DESIGN §7: 452 4.5.3 past this, the sender sends those later
READ_BUFFER = 256 * 1024  # bytes a session may buffer; aiosmtpd's 1,001 would make bulk reads crawl
SHUTDOWN_GRACE = 30.0  # seconds a transaction in progress may take to finish at shutdown
_SIZE_PARAM = re.compile(r"(?:^|\s)SIZE=(\d+)", re.IGNORECASE)
_ATOMS = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
# `<local@domain>` with dot-atoms, then parameters (not a comment): what aiosmtpd's parser gives, in 0.5 µs instead of 47
_PLAIN_PATH = re.compile(rf"<({_ATOMS}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*(?![( \t])")

INTERNAL_ERROR = "451 4.3.0 Internal error; please try again later"
HANG_UP_GRACE = 5.0  # seconds a closing connection may take to drain its last replies
YIELD_EVERY = 32  # replies a session may send before it lets the others run
# Refusals logged (INFO, one line each) so that "my mail bounced" can be answered from the journal; 452 4.5.3
# (past 100 recipients: sent again later) and syntax errors are left out, a client can make thousands
_LOGGED = frozenset({"421", "450", "451", "452", "530", "550", "552", "553", "554"})
SHUTTING_DOWN = "421 4.3.2 Service shutting down; please try again later"


def client_of(peer) -> str:
    """The client's address from a socket's peer name (host, port[, …]), or the name as it is."""
    return peer[0] if isinstance(peer, tuple) else str(peer or "")


def too_big(limit: int, size: int) -> str:
    return f"552 5.3.4 Message too big: {size:,} bytes, over the limit of {limit:,} bytes"


def counted(command: str, reply: str) -> str:
    """A final reply, counted for /metrics by command and code."""
    _replies(command, reply[:3]).inc()
    return reply


_replies = functools.cache(metrics.SMTP_REPLIES.labels)  # the labelled counter looked up once, not under a lock per reply


def _counted(command: str):
    """Count what a Receiver hook answers."""
    def wrap(hook):
        @functools.wraps(hook)
        async def hook_counted(*args):
            return counted(command, await hook(*args))
        return hook_counted
    return wrap


def _sanitized_log(log_at: Callable[..., None], message: str, *args, **kwargs) -> None:
    """aiosmtpd's `sanitized_log` (it masks AUTH secrets), skipped when its logger drops the level anyway.

    aiosmtpd logs every command line twice (DEBUG and INFO), and masks each
    argument with a regex before the logger looks at its level; esmail keeps
    its logger at WARNING, so that was 2.5% of a receiver's time for nothing.
    """
    if log_at.__self__.isEnabledFor(_LEVELS.get(log_at.__name__, logging.CRITICAL)):
        _aiosmtpd_sanitized_log(log_at, message, *args, **kwargs)


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_aiosmtpd_sanitized_log, aiosmtpd.smtp.sanitized_log = aiosmtpd.smtp.sanitized_log, _sanitized_log


class Receiver:
    """aiosmtpd handler: the checks of DESIGN §7 at MAIL and RCPT, and the spool at DATA."""

    def __init__(self, config: SmtpConfig, committer: GroupCommit, on_spooled: Callable[[str], None],
                 feeds: frozenset[str] | None = None):
        """`feeds`: the only prefixes taken ([smtp] unknown_feeds = "reject"); None: any."""
        self.config = config
        self.committer = committer
        self.on_spooled = on_spooled
        self.feeds = feeds
        self.hooks = {name.removeprefix("handle_"): getattr(self, name) for name in dir(Receiver) if name.startswith("handle_")}

    def __dir__(self) -> list[str]:
        """Nothing: aiosmtpd lists the handler's attributes on every new session; `Connection` is given `hooks` instead."""
        return []

    async def handle_EHLO(self, server: SMTP, session: SmtpSession, envelope: SmtpEnvelope, hostname: str, responses: list[str]) -> list[str]:
        # esmail checks the size itself, so aiosmtpd is given no limit and SIZE is advertised here; no AUTH
        session.host_name = hostname
        kept = [line for line in responses[:-1] if not line.startswith("250-AUTH")]
        return [*kept, f"250-SIZE {self.config.max_message_size}", responses[-1]]

    @_counted("MAIL")
    async def handle_MAIL(self, server: SMTP, session: SmtpSession, envelope: SmtpEnvelope, address: str, options: list[str]) -> str:
        declared = _SIZE_PARAM.search(" ".join(options))
        if declared and int(declared.group(1)) > self.config.max_message_size:
            return too_big(self.config.max_message_size, int(declared.group(1)))
        try:
            self.committer.spool.ensure_space()
        except TemporaryFailure as exc:
            log.error("refusing mail (452): %s", exc)
            return "452 4.3.1 Insufficient system storage; please try again later"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    @_counted("RCPT")
    async def handle_RCPT(self, server: SMTP, session: SmtpSession, envelope: SmtpEnvelope, address: str, options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return f"452 4.5.3 Too many recipients: at most {MAX_RECIPIENTS} per message"
        if self.config.domains and domain_of(address) not in self.config.domains:
            return f"550 5.1.1 <{address}>: Recipient address rejected: not a data feed domain here"
        prefix = prefix_of(address)
        if prefix is None:
            return f"550 5.1.3 <{address}>: Bad recipient address syntax: use a-z 0-9 . _ + - in the local part"
        if self.feeds is not None and prefix not in self.feeds:
            return f"550 5.1.1 <{address}>: Recipient address rejected: no such data feed here"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    @_counted("DATA")
    async def handle_DATA(self, server: SMTP, session: SmtpSession, envelope: SmtpEnvelope) -> str:
        raw = envelope.original_content
        prefixes = [prefix_of(address) for address in envelope.rcpt_tos]
        client = client_of(session.peer)
        try:
            spooled = await self.committer.accept(
                raw, prefixes, sender=envelope.mail_from or "", recipients=tuple(envelope.rcpt_tos),
                client=client, helo=session.host_name or "", origin="smtp")
        except TemporaryFailure as exc:
            log.error("refusing a message from %s (451): %s", client, exc)
            return "451 4.3.0 Cannot queue the message now; please try again later"
        log.info("%s: queued %d bytes from %s <%s> for %s", spooled.id, len(raw), client, envelope.mail_from, ",".join(spooled.folders),
                 extra={"spool_id": spooled.id, "client": client, "sender": envelope.mail_from, "prefixes": list(spooled.folders), "size": len(raw)})
        try:
            self.on_spooled(spooled.id)
        except Exception:  # the message is safe in the spool (the worker's scan finds it): the answer is 250 whatever happens here
            log.exception("%s: cannot hand the message to the worker now", spooled.id)
            report.exception("cannot hand a spooled message to the worker", spool_id=spooled.id)
        return f"250 2.0.0 Ok: queued as {spooled.id}"

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %s: %s", type(error).__name__, error, exc_info=error)
        report.exception("unexpected error in an SMTP session", error)
        return INTERNAL_ERROR


class _Commands(Mapping):
    """aiosmtpd's table of a session's commands (name → bound `smtp_` method), looked up when used, not built per session."""

    def __init__(self, connection: "Connection"):
        self.connection = connection

    def __getitem__(self, name: str):
        if name not in _KNOWN:
            raise KeyError(name)
        return getattr(self.connection, "smtp_" + name)

    def get(self, name: str, default=None):
        """What aiosmtpd calls for every command line (Mapping's own goes through a KeyError for unknown ones)."""
        return getattr(self.connection, "smtp_" + name) if name in _KNOWN else default

    def __iter__(self):
        return iter(_COMMANDS)

    def __len__(self) -> int:
        return len(_COMMANDS)


class Connection(SMTP):
    """One SMTP session: aiosmtpd's protocol, with DATA read in bulk and a limit on the session's length."""

    line_length_limit = READ_BUFFER  # also the StreamReader's buffer size; command lines keep their own limits

    def __init__(self, handler: Receiver, server: SmtpServer, **kwargs):
        super().__init__(handler, **kwargs)  # it finds no commands, hooks nor AUTH mechanisms (see __dir__): they are set here
        self._smtp_methods = _Commands(self)
        self._handle_hooks = handler.hooks
        self._ehlo_hook_ver = "new"  # handle_EHLO takes the responses (aiosmtpd read its signature on every session)
        self.server = server
        self.max_message_size = handler.config.max_message_size
        self._session_ends = self.loop.time() + server.config.session_timeout
        self._idle_ends = self._session_ends
        self._timer_at = 0.0  # when self._timeout_handle fires
        self._in_data = False
        self._replies = 0

    def __dir__(self) -> list[str]:
        """Nothing: aiosmtpd lists, with dir() and inspect.getmembers(), the commands, AUTH mechanisms and hooks on every new session.

        Listing every attribute (and reading each, properties included), and
        the same for the handler, was most of the cost of a new session
        (115 µs); `__init__` sets the tables instead: a lookup of the command
        when it is used, the handler's hooks found once, and no AUTH
        mechanism (esmail offers none: aiosmtpd's LOGIN and PLAIN are
        excluded).
        """
        return []

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The address of MAIL FROM or RCPT TO, and the parameters after it.

        A plain `<local@domain>` is matched here; anything else (quotes,
        comments, a null path, an address literal, UTF-8) goes to aiosmtpd's
        parser, which takes 47 µs (it declares a class on every call): 10% of
        the event loop's time for small messages.
        """
        plain = _PLAIN_PATH.match(arg)
        if plain is None:
            return super()._getaddr(arg)
        address = plain.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, arg[plain.end():]

    async def push(self, status: str) -> None:
        """Send a reply; every YIELD_EVERY replies, let the other sessions run.

        aiosmtpd reads the next command without yielding when it is already
        buffered, so a client that pipelines megabytes of commands (and
        never reads the replies, which loopback's socket buffers take by the
        megabyte) would hold the event loop for seconds: every other
        session would wait, and time out.
        """
        if status[:3] in _LOGGED and not status.startswith("452 4.5.3"):
            envelope = self.envelope
            log.info("%s: refused: %s (MAIL FROM <%s>)", self._client(), status, envelope.mail_from if envelope and envelope.mail_from else "",
                     extra={"client": self._client(), "sender": envelope.mail_from if envelope else None, "outcome": status[:3]})
        await super().push(status)
        self._replies += 1
        if self._replies % YIELD_EVERY == 0:
            await asyncio.sleep(0)

    def _client(self) -> str:
        return client_of(self.session.peer if self.session else None)

    async def handle_exception(self, error: Exception) -> str:
        """A failed STARTTLS handshake (an unknown CA, a scanner sending garbage) is daily life on an MX:
        one INFO line and a counter, never a traceback or a Rollbar report. aiosmtpd closes the connection."""
        if isinstance(error, TLSSetupException):
            cause = error.__cause__
            log.info("%s: TLS handshake failed: %s", self._client(), cause or "no reason given", extra={"client": self._client()})
            metrics.TLS_FAILURES.inc()
            return "421 4.7.0 TLS handshake failed; closing"
        return await super().handle_exception(error)

    def data_received(self, data: bytes) -> None:
        """In DATA every packet counts as activity: command_timeout is for silence, not for a slow but busy sender."""
        super().data_received(data)
        if self._in_data:
            self._reset_timeout()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Note activity: one timer a session watches both command_timeout and session_timeout.

        aiosmtpd cancels and schedules a timer on every command (and esmail on
        every packet of DATA); here a command only moves a deadline, and the
        timer, when it fires, sets itself again for whichever deadline is next.
        """
        self._idle_ends = self.loop.time() + (duration or self._timeout_duration)
        if self._timeout_handle is None or self._idle_ends < self._timer_at:
            self._set_timer()

    def _set_timer(self) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._timer_at = min(self._idle_ends, self._session_ends)
        self._timeout_handle = self.loop.call_at(self._timer_at, self._on_timer)

    def _on_timer(self) -> None:
        now = self.loop.time()
        if now >= self._session_ends:
            self.close_with("421 4.4.2 Session time limit reached; closing")
        elif now >= self._idle_ends:
            self._timeout_cb()
        else:
            self._set_timer()

    def connection_lost(self, error: Exception | None) -> None:
        self.server.sessions.discard(self)
        super().connection_lost(error)  # cancels the timer

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def close_with(self, reply: str) -> None:
        """Say why (a 421) and hang up."""
        if self.transport is not None and not self.transport.is_closing():
            log.info("%r: %s", self.session.peer if self.session else None, reply)
            self.transport.write(reply.encode() + b"\r\n")
            self._hang_up()

    def _timeout_cb(self) -> None:
        log.info("%r: connection timed out", self.session.peer if self.session else None)
        self._hang_up()

    def _hang_up(self) -> None:
        """Close after what is buffered is sent; a client that never reads its replies is cut off anyway."""
        transport = self.transport
        if transport is not None:
            transport.close()
            self.loop.call_later(HANG_UP_GRACE, transport.abort)

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._in_data = True
        try:
            content, size = await read_data(self._reader, self.max_message_size)
        except asyncio.IncompleteReadError:  # the client went away mid-message: nothing was accepted
            self._set_post_data_state()
            if self.transport is not None:
                self.transport.close()
            return
        finally:
            self._in_data = False
        if content is None:
            self._set_post_data_state()
            await self.push(counted("DATA", too_big(self.max_message_size, size)))
            return
        self.envelope.content = self.envelope.original_content = content
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            self._set_post_data_state()
        await self.push(status)


_COMMANDS = [name.removeprefix("smtp_") for name in dir(Connection) if name.startswith("smtp_")]
_KNOWN = frozenset(_COMMANDS)


async def read_data(reader: asyncio.StreamReader, limit: int) -> tuple[bytes | None, int]:
    """The message after DATA, up to `<CRLF>.<CRLF>`, dot-unstuffed (RFC 5321 §4.5.2).

    Read in large pieces rather than line by line. As in aiosmtpd, only
    CRLF.CRLF ends the message (a bare LF or CR before the dot does not: SMTP
    smuggling). Past `limit` bytes the rest is read and dropped, never held,
    and None is returned; with the message's size either way.
    """
    chunks: list[bytes] = []
    size = 0  # the message's size as stored: dot-unstuffed, without the final ".\r\n"
    tail = b"\r\n"  # the last two bytes read: the DATA line itself ended with CRLF
    while True:
        try:
            chunk = await reader.readuntil(b".\r\n")
        except asyncio.LimitOverrunError as exc:  # no dot-CRLF in a buffer's worth: take what cannot hold one
            chunk = await reader.readexactly(exc.consumed)
        finished = (tail + chunk[-5:]).endswith(b"\r\n.\r\n")
        piece = chunk[:-3] if finished else chunk  # the final ".\r\n"; the CRLF before it ends the last line
        if b"\r\n." in piece or b"\r\n." in tail + piece[:2]:  # a stuffed dot, perhaps just after the last read
            piece = (tail + piece).replace(b"\r\n.", b"\r\n")[2:]
        size += len(piece)
        if size <= limit:
            chunks.append(piece)
        elif chunks:
            chunks.clear()
        tail = chunk[-2:] if len(chunk) >= 2 else (tail + chunk)[-2:]
        if finished:
            break
    return (b"".join(chunks) if size <= limit else None), size


class _Busy(asyncio.Protocol):
    """What a client gets when max_sessions are already open."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        log.info("%s: refused: 421 4.7.0 Too many connections (max_sessions)", client_of(transport.get_extra_info("peername")))
        transport.write(counted("CONNECT", "421 4.7.0 Too many connections; please try again later").encode() + b"\r\n")
        transport.close()


class SmtpServer:
    """The listening socket and its sessions."""

    def __init__(self, config: SmtpConfig, receiver: Receiver, reuse_port: bool = False):
        """`reuse_port`: one of several receiver processes on the same port (esmail.receivers)."""
        self.config = config
        self.receiver = receiver
        self.reuse_port = reuse_port
        self.sessions: set[Connection] = set()
        self.tls_context = tls_context(config)
        self.tls_problem: str | None = None  # a certificate reload that failed (/healthz): the old one is still served
        self.hostname = config.hostname
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if not self.hostname:  # once: aiosmtpd would look it up (blocking) for every connection
            self.hostname = await loop.run_in_executor(None, socket.getfqdn)
        host, port = self.config.listen
        try:
            self._server = await loop.create_server(self._connection, host, port, reuse_address=True, reuse_port=self.reuse_port or None)
        except OSError as exc:
            raise CannotListen("[smtp] listen", self.config.listen, exc) from None

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    def _connection(self) -> asyncio.Protocol:
        if len(self.sessions) >= self.config.max_sessions:
            return _Busy()
        connection = Connection(
            self.receiver, self, data_size_limit=None, enable_SMTPUTF8=True, hostname=self.hostname,
            ident="esmail", tls_context=self.tls_context, auth_exclude_mechanism=["LOGIN", "PLAIN"], require_starttls=self.config.require_tls,
            timeout=self.config.command_timeout, loop=asyncio.get_running_loop())
        self.sessions.add(connection)
        return connection

    def reload_tls(self) -> None:
        """SIGHUP: read the certificate and key again (after a renewal); new sessions get them, a bad pair keeps the old."""
        if self.config.tls_cert is None:
            log.info("SIGHUP: no [smtp] tls_cert, nothing to reload")
            return
        try:
            self.tls_context = tls_context(self.config)
        except ConfigError as exc:
            log.error("SIGHUP: %s; the certificate loaded before stays in use", exc)
            self.tls_problem = f"the TLS certificate could not be reloaded ({exc}); the one loaded before is still in use"
            return
        self.tls_problem = None
        log.info("SIGHUP: reloaded the TLS certificate %s", self.config.tls_cert)

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop listening; close idle sessions now and busy ones once their message is through (at most `grace` s)."""
        if self._server is None:
            return
        self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.sessions and loop.time() < deadline:  # a closed session leaves the set in connection_lost
            for connection in list(self.sessions):
                if not connection.in_transaction:
                    connection.close_with(SHUTTING_DOWN)
            await asyncio.sleep(0.05)
        for connection in list(self.sessions):
            connection.close_with(SHUTTING_DOWN)
        await self._server.wait_closed()


def tls_context(config: SmtpConfig) -> ssl.SSLContext | None:
    """The STARTTLS context from [smtp] tls_cert and tls_key, or None."""
    if config.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[smtp] tls_cert = {str(config.tls_cert)!r}, tls_key = {str(config.tls_key)!r}: "
                          f"cannot load the certificate and key ({exc}); give PEM files esmail can read") from None
    expires = certificate_expiry(config.tls_cert)
    if expires is not None:
        metrics.TLS_CERT_EXPIRY.set(expires)
    return context


def certificate_expiry(path) -> float | None:
    """When the first certificate of a PEM file expires (Unix time), for /metrics; None if it cannot be read."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(open(path, "rb").read()).not_valid_after_utc.timestamp()
    except (OSError, ValueError):
        return None
