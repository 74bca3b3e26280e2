"""Who may see the page and act on it: HTTP Basic, a CSRF token on every form, and headers that keep browsers strict.

The page shows message senders and subjects and can release quarantined mail,
so off loopback it needs `[http] password_env` (config refuses otherwise).
CSRF follows the double-submit-cookie pattern (as datasette's asgi-csrf):
a random `csrftoken` cookie, the same value in a hidden form field, and a
POST without both equal gets 403.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets

from aiohttp import web

OPEN_PATHS = ("/healthz",)  # for load balancers and uptime checks: no password
CSRF_COOKIE = CSRF_FIELD = "csrftoken"
_NEW_TOKEN = web.RequestKey("new_csrf_token", str)  # a token made for this response, to be set as the cookie
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def middlewares(password: str | None) -> list:
    """Security headers on every answer; the password (when set) on everything but /healthz."""

    @web.middleware
    async def strict(request: web.Request, handler):
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        token = request.get(_NEW_TOKEN)
        if token:
            response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="Strict", path="/")
        if isinstance(response, web.HTTPException):
            raise response
        return response

    @web.middleware
    async def basic_auth(request: web.Request, handler):
        if password is not None and request.path not in OPEN_PATHS and not _authorised(request, password):
            raise web.HTTPUnauthorized(text="401: the esmail page needs its password ([http] password_env)\n",
                                       headers={"WWW-Authenticate": 'Basic realm="esmail", charset="UTF-8"'})
        return await handler(request)

    return [strict, basic_auth]


def who(request: web.Request) -> str:
    """The person acting: the HTTP Basic user name they gave, or `local` when the page has no password."""
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            name = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")[0].strip()
        except (binascii.Error, UnicodeDecodeError):
            name = ""
        if name:
            return "".join(c for c in name if c.isprintable())[:64]
    return "local"


def _authorised(request: web.Request, password: str) -> bool:
    """HTTP Basic with any user name and the configured password."""
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")[2]
    except (binascii.Error, UnicodeDecodeError):
        return False
    return hmac.compare_digest(given.encode(), password.encode())


def csrf_token(request: web.Request) -> str:
    """The token for this visitor's forms: the cookie's, or a new one that the response sets."""
    token = request.cookies.get(CSRF_COOKIE)
    if not token or len(token) < 32:
        token = request.get(_NEW_TOKEN) or secrets.token_urlsafe(32)
        request[_NEW_TOKEN] = token
    return token


async def check_csrf(request: web.Request) -> None:
    """403 unless the form's token equals the cookie's."""
    form = await request.post()
    cookie, field = request.cookies.get(CSRF_COOKIE, ""), str(form.get(CSRF_FIELD, ""))
    if not cookie or not hmac.compare_digest(cookie.encode(), field.encode()):
        raise web.HTTPForbidden(text="403: this form is out of date or did not come from the esmail page (CSRF token); "
                                     "reload the page and try again\n")
