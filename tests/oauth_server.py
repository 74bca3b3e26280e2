"""A small OAuth2 authorisation server on loopback for the tests: a token endpoint and RFC 7662 introspection.

The token endpoint takes the client-credentials and refresh-token grants
(form-encoded, client_secret_post) and answers RFC 6749 JSON; Dovecot's
oauth2 passdb asks the introspection endpoint whether a token is active. The
tests can change the lifetime of the tokens it issues, expire every token it
issued, or make the endpoint fail.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

CLIENT_ID, CLIENT_SECRET = "esmail-test-app", "s3cret-client"
REFRESH_TOKEN = "refresh-token-1"
USERNAME = "feeds"


class AuthServer:
    def __init__(self):
        self.lifetime = 3600  # expires_in of the tokens it issues
        self.failing: str | None = None  # None, or "500" / "garbage": the token endpoint breaks that way
        self.tokens: dict[str, float] = {}  # issued token → when it expires (time.time())
        self.requests: list[dict] = []  # every token request's form, in order
        self.refresh_tokens = {REFRESH_TOKEN}
        self.rotate = False  # answer a refresh-token grant with a new refresh token (and forget the old one)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "AuthServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def expire_all(self) -> None:
        """Every token issued so far is expired (as the provider sees it), whatever its expires_in said."""
        with self._lock:
            self.tokens = {token: 0.0 for token in self.tokens}

    def token_requests(self, grant: str | None = None) -> int:
        return sum(1 for form in self.requests if grant is None or form.get("grant_type") == grant)

    def _issue(self, form: dict) -> tuple[int, dict]:
        grant = form.get("grant_type")
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
            return 401, {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."}
        if grant == "refresh_token" and form.get("refresh_token") not in self.refresh_tokens:
            return 400, {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
        if grant not in ("client_credentials", "refresh_token"):
            return 400, {"error": "unsupported_grant_type"}
        token = "at-" + secrets.token_urlsafe(24)
        with self._lock:
            self.tokens[token] = time.time() + self.lifetime
        answer = {"access_token": token, "token_type": "Bearer", "expires_in": self.lifetime}
        if grant == "refresh_token" and self.rotate:
            new = "refresh-" + secrets.token_urlsafe(8)
            self.refresh_tokens = {new}
            answer["refresh_token"] = new
        return 200, answer

    def _active(self, token: str) -> bool:
        with self._lock:
            return self.tokens.get(token, 0.0) > time.time()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                form = {key: values[0] for key, values in parse_qs(body).items()}
                if self.path == "/token":
                    server.requests.append(form)
                    if server.failing == "500":
                        return self._send(500, b"<html>upstream error</html>", "text/html")
                    if server.failing == "garbage":
                        return self._send(200, b"not json at all", "text/plain")
                    status, answer = server._issue(form)
                elif self.path == "/introspect":
                    active = server._active(form.get("token", ""))
                    status, answer = 200, {"active": "true", "username": USERNAME} if active else {"active": "false"}
                else:
                    status, answer = 404, {"error": "not_found"}
                self._send(status, json.dumps(answer).encode(), "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
