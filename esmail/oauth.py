"""OAuth2 for IMAP mailboxes (DESIGN §14): access tokens from the provider, and the SASL login that uses them.

Microsoft 365 and Google Workspace refuse passwords over IMAP. authlib makes
the token request (RFC 6749, form-encoded, `client_secret_post`): a
client-credentials grant (Microsoft 365's app-only access) or a
refresh-token grant (Google). A token is kept in memory and reused until 60 s
before it expires; a login refused with a kept token fetches a new one once.
The login is SASL XOAUTH2 when the server offers it, else OAUTHBEARER
(RFC 7628). No token or secret is ever logged or put in an error message.
"""

from __future__ import annotations

import imaplib
import logging
import threading
import time
from collections.abc import Mapping

from esmail.config import ImapConfig
from esmail.errors import TemporaryFailure

log = logging.getLogger(__name__)

EARLY = 60.0  # seconds before its expiry a token is no longer used
REQUEST_TIMEOUT = 30.0  # seconds for one token request
NEEDS_A_HUMAN = ("invalid_client", "invalid_grant", "unauthorized_client")  # a wrong secret or a revoked grant


class TokenError(TemporaryFailure):
    """The token endpoint gave no token (network, HTTP status, not JSON, an OAuth error): an outage like any other."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code  # the OAuth error code (invalid_client, invalid_grant, …); "" for the others


class Tokens:
    """One mailbox's access tokens. Thread-safe: the mailbox's watcher and `check-config` may ask."""

    def __init__(self, config: ImapConfig, secrets: Mapping[str, str]):
        self.config = config
        self._client_secret = secrets[config.client_secret_env]
        self._refresh_token = secrets.get(config.refresh_token_env) if config.refresh_token_env else None
        self._token: str | None = None
        self.expires_at = 0.0  # time.time() when the kept token runs out
        self.fetched = 0  # tokens fetched since start
        self._lock = threading.Lock()

    @property
    def grant(self) -> str:
        return "refresh token" if self._refresh_token else "client credentials"

    def get(self) -> tuple[str, bool]:
        """A token for a login, and whether it was fetched just now: the kept one while it has more than a minute left."""
        with self._lock:
            if self._token is not None and time.time() < self.expires_at - EARLY:
                return self._token, False
            return self._fetch(), True

    def renew(self) -> str:
        """A new token, whatever the kept one's expiry (the server refused it)."""
        with self._lock:
            return self._fetch()

    def _fetch(self) -> str:
        import requests
        from authlib.integrations.base_client.errors import OAuthError
        from authlib.integrations.requests_client import OAuth2Session

        config = self.config
        session = OAuth2Session(config.client_id, self._client_secret, scope=config.scope, token_endpoint_auth_method="client_secret_post")
        try:
            if self._refresh_token:
                token = session.refresh_token(config.token_url, refresh_token=self._refresh_token, timeout=REQUEST_TIMEOUT)
            else:
                token = session.fetch_token(config.token_url, grant_type="client_credentials", timeout=REQUEST_TIMEOUT)
        except OAuthError as exc:
            hint = " (a human must act: check client_id and the secret in client_secret_env, or grant the access again)" \
                if exc.error in NEEDS_A_HUMAN else ""
            raise TokenError(f"the token endpoint {config.token_url} refused: {exc.error}: {exc.description or ''}{hint}", exc.error) from None
        except requests.RequestException as exc:
            raise TokenError(f"the token endpoint {config.token_url} failed: {type(exc).__name__}: {_status(exc)}") from None
        except ValueError as exc:  # an answer that is not a JSON object
            raise TokenError(f"the token endpoint {config.token_url} answered something else than a token: {exc}") from None
        finally:
            session.close()
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            raise TokenError(f"the token endpoint {config.token_url} answered without an access_token")
        try:
            lifetime = float(token.get("expires_in", 3600))
        except (TypeError, ValueError):
            lifetime = 0.0  # unknown: used for this login only
        if isinstance(token.get("refresh_token"), str) and token["refresh_token"]:
            self._refresh_token = token["refresh_token"]  # a rotated refresh token: kept for the life of the process
        self._token, self.expires_at = access, time.time() + lifetime
        self.fetched += 1
        log.debug("%s: new OAuth2 token (%s grant), valid for %.0f s", config, self.grant, lifetime)
        return access


def _status(exc) -> str:
    """What went wrong with a request, without its body (which could echo what we sent)."""
    response = getattr(exc, "response", None)
    if response is not None:
        return f"HTTP {response.status_code}"
    return str(exc.args[0] if exc.args else exc).split(" (Caused by")[0]


class OAuth2Login:
    """Logs a connection in with a token: the kept one, and if the server refuses it, once more with a new one."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    def __call__(self, conn: imaplib.IMAP4, config: ImapConfig) -> None:
        token, fresh = self.tokens.get()
        try:
            authenticate(conn, config, token)
        except imaplib.IMAP4.error:
            if fresh:
                raise
            log.info("%s: the server refused the kept OAuth2 token; fetching a new one", config)
            authenticate(conn, config, self.tokens.renew())


def authenticate(conn: imaplib.IMAP4, config: ImapConfig, token: str) -> None:
    """SASL XOAUTH2 when the server offers it, else OAUTHBEARER (RFC 7628)."""
    if "AUTH=XOAUTH2" in conn.capabilities:
        mechanism, response = "XOAUTH2", f"user={config.username}\x01auth=Bearer {token}\x01\x01"
    elif "AUTH=OAUTHBEARER" in conn.capabilities:
        user = config.username.replace("=", "=3D").replace(",", "=2C")
        mechanism, response = "OAUTHBEARER", f"n,a={user},\x01host={config.host}\x01port={config.port}\x01auth=Bearer {token}\x01\x01"
    else:
        raise imaplib.IMAP4.error(f"{config.host} offers neither AUTH=XOAUTH2 nor AUTH=OAUTHBEARER; it cannot take an OAuth2 login")
    answered = []

    def respond(challenge: bytes) -> bytes:
        """The first continuation gets the token; a second one is the server's error, acknowledged with an empty line."""
        if answered:
            return b""
        answered.append(True)
        return response.encode()

    conn.authenticate(mechanism, respond)
