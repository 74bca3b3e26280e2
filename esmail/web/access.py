"""Who may see the page and act on it: HTTP Basic (throttled per client), an unforgeable CSRF token on every form, strict headers.

The page shows message senders and subjects and can release quarantined mail,
so off loopback it needs `[http] password_env` (config refuses otherwise).

Forms carry a token `random.signature`, the signature an HMAC of the random
part with a key only the daemon holds (`{spool}/http-secret`, made once, so
a page left open survives a restart), in a `csrftoken` cookie and a hidden
field. A POST needs both, equal and signed: another site on this host can set
our cookie (cookies ignore ports) but cannot sign a value. Before that, a POST
that the browser says came from another origin (`Origin`, `Sec-Fetch-Site`) is
refused. Without JavaScript the forms work as they are.

Passwords: LOGIN_LIMIT wrong ones from one client address within LOGIN_WINDOW
seconds, and that address gets 429 (the right password too) until the window,
counted from its first failure, has passed; one warning in the log then.
Behind a reverse proxy on this host every client is loopback, so from a
loopback peer the address is the last entry of X-Forwarded-For (the one the
proxy added), and X-Forwarded-Proto says whether the browser used TLS.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from esmail import metrics
from esmail.durable import fsync_dir

log = logging.getLogger(__name__)

OPEN_PATHS = ("/healthz",)  # for load balancers and uptime checks: no password
CSRF_COOKIE = CSRF_FIELD = "csrftoken"
SECRET_FILE = "http-secret"  # in the spool: the key that signs CSRF tokens
LOGIN_LIMIT = 20  # wrong passwords from one address…
LOGIN_WINDOW = 60.0  # …within this many seconds: 429 for it until they have passed
TRACKED_ADDRESSES = 10_000  # the most addresses whose failures are remembered at once (the oldest are forgotten first)
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # nothing to other sites; to its own forms the browser then sends the real Origin, not `null`
    "Cache-Control": "no-store",
}
_KEY = web.AppKey("csrf_key", bytes)
_NEW_TOKEN = web.RequestKey("new_csrf_token", str)  # a token made for this response, to be set as the cookie


def protect(app: web.Application, password: str | None, spool: Path) -> "Logins":
    """Strict headers on every answer (errors too, no Server banner), the password (when set) on everything but /healthz,
    and the key for CSRF tokens. Returns the login throttle."""
    logins = Logins()
    app[_KEY] = signing_key(spool)
    app.on_response_prepare.append(_strict)
    app.middlewares.extend([_set_token, _basic_auth(password, logins)])
    return logins


def signing_key(spool: Path) -> bytes:
    """`{spool}/http-secret` (0600): made the first time, then kept, so tokens in open pages stay valid across restarts."""
    path = spool / SECRET_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = b""
    if len(key) < 32:  # none yet (or an empty or damaged one)
        key = secrets.token_bytes(32)
        tmp = path.with_name(f".{SECRET_FILE}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(fd)
        os.replace(tmp, path)
        fsync_dir(spool)
    return key


async def _strict(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.popall("Server", None)


@web.middleware
async def _set_token(request: web.Request, handler):
    response = await handler(request)
    token = request.get(_NEW_TOKEN)
    if token:
        response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="Strict", path="/", secure=_over_tls(request))
    return response


def _basic_auth(password: str | None, logins: "Logins"):
    @web.middleware
    async def basic_auth(request: web.Request, handler):
        if password is None or request.path in OPEN_PATHS:
            return await handler(request)
        address = client_address(request)
        given = (_basic(request) or (None, None))[1]
        right = given is not None and hmac.compare_digest(given.encode(), password.encode())
        if given is not None and not right:
            metrics.HTTP_LOGIN_FAILURES.inc()
        wait = logins.throttled(address)
        if wait:
            raise web.HTTPTooManyRequests(text=f"429: too many wrong passwords from {address}; try again in {math.ceil(wait)} s\n",
                                          headers={"Retry-After": str(math.ceil(wait))})
        if not right:
            if given is not None:
                logins.failed(address)
            raise web.HTTPUnauthorized(text="401: the esmail page needs its password ([http] password_env)\n",
                                       headers={"WWW-Authenticate": 'Basic realm="esmail", charset="UTF-8"'})
        return await handler(request)

    return basic_auth


def who(request: web.Request) -> str:
    """The person acting: the HTTP Basic user name they gave, or `local` when the page has no password."""
    name = (_basic(request) or ("", ""))[0].strip()
    return "".join(c for c in name if c.isprintable())[:64] or "local"


def _basic(request: web.Request) -> tuple[str, str] | None:
    """The user name and password of an HTTP Basic `Authorization`: None without one, two empty strings for one unreadable."""
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    return user, password


@dataclass
class _Window:
    start: float
    failures: int = 0


class Logins:
    """Wrong passwords per client address, counted in a window of LOGIN_WINDOW from the first; LOGIN_LIMIT of them throttle it."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.windows: dict[str, _Window] = {}  # in the order they started: the first is the oldest

    def throttled(self, address: str) -> float:
        """Seconds until `address` may try again; 0 when it may now."""
        window = self._window(address)
        if window is None or window.failures < LOGIN_LIMIT:
            return 0.0
        return window.start + LOGIN_WINDOW - self.clock()

    def failed(self, address: str) -> None:
        window = self._window(address)
        if window is None:
            while len(self.windows) >= TRACKED_ADDRESSES:
                del self.windows[next(iter(self.windows))]
            window = self.windows[address] = _Window(self.clock())
        window.failures += 1
        if window.failures == LOGIN_LIMIT:
            log.warning("page: %d wrong passwords from %s within %.0f s: it gets 429 for the next %.0f s", window.failures, address,
                        LOGIN_WINDOW, window.start + LOGIN_WINDOW - self.clock(), extra={"client": address})

    def _window(self, address: str) -> _Window | None:
        window = self.windows.get(address)
        if window is not None and self.clock() >= window.start + LOGIN_WINDOW:
            del self.windows[address]
            return None
        return window


def client_address(request: web.Request) -> str:
    """The client's address: the peer's, or behind a reverse proxy on this host the one the proxy added to X-Forwarded-For."""
    forwarded = request.headers.get("X-Forwarded-For", "").rsplit(",", 1)[-1].strip()
    return forwarded if forwarded and _from_loopback(request) else request.remote or ""


def _over_tls(request: web.Request) -> bool:
    """The browser's connection was TLS: our own, or a reverse proxy's on this host (X-Forwarded-Proto: https)."""
    return request.secure or (_from_loopback(request) and request.headers.get("X-Forwarded-Proto", "").strip().lower() == "https")


def _from_loopback(request: web.Request) -> bool:
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def _own_origin(request: web.Request) -> str:
    return f"{'https' if _over_tls(request) else 'http'}://{request.host}".lower()


def csrf_token(request: web.Request) -> str:
    """The token for this visitor's forms: the cookie's if the daemon signed it, or a new one that the response sets."""
    token = request.cookies.get(CSRF_COOKIE, "")
    if not _signed(request.app[_KEY], token):
        token = request.get(_NEW_TOKEN) or _new_token(request.app[_KEY])
        request[_NEW_TOKEN] = token
    return token


async def check_csrf(request: web.Request) -> None:
    """403 unless the POST came from the page itself: not from another origin, and with the daemon's token in field and cookie."""
    origin, fetch_site = request.headers.get("Origin"), request.headers.get("Sec-Fetch-Site", "same-origin")
    if fetch_site not in ("same-origin", "none") or (origin is not None and origin.lower() != _own_origin(request)):
        raise web.HTTPForbidden(text=f"403: this form was sent from another site ({origin or fetch_site}), not from the esmail page "
                                     f"({_own_origin(request)}). Behind a reverse proxy, have it pass on the Host header and "
                                     "X-Forwarded-Proto\n")
    form = await request.post()
    cookie, field = request.cookies.get(CSRF_COOKIE, ""), str(form.get(CSRF_FIELD, ""))
    if not (hmac.compare_digest(cookie.encode(), field.encode()) and _signed(request.app[_KEY], field)):
        raise web.HTTPForbidden(text="403: this form is out of date or did not come from the esmail page (CSRF token); "
                                     "reload the page and try again\n")


def _new_token(key: bytes) -> str:
    nonce = secrets.token_urlsafe(18)
    return f"{nonce}.{_signature(key, nonce)}"


def _signed(key: bytes, token: str) -> bool:
    nonce, _, signature = token.partition(".")
    return bool(nonce) and hmac.compare_digest(_signature(key, nonce).encode(), signature.encode())


def _signature(key: bytes, nonce: str) -> str:
    return hmac.new(key, nonce.encode(), hashlib.sha256).hexdigest()
