"""`[[imap]] auth = "oauth2"` (DESIGN §14) against a real Dovecot that takes only OAuth2 tokens, checked by its oauth2
passdb at a token server the suite runs on loopback (client-credentials and refresh-token grants, introspection)."""

from __future__ import annotations

import imaplib
import json
import logging
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace

import pytest

import dovecot as dovecot_server
from conftest import RunningDaemon, config_toml, eventually, self_signed
from esmail.config import Address, Config, HttpConfig, ImapConfig
from oauth_server import CLIENT_ID, CLIENT_SECRET, REFRESH_TOKEN, USERNAME, AuthServer
from test_imap import amr_keys, feed

pytestmark = pytest.mark.parametrize("config", ["local"], indirect=True)
SECRET_ENV, REFRESH_ENV = "IMAP_CLIENT_SECRET", "IMAP_REFRESH_TOKEN"
SCOPE = "https://outlook.office365.com/.default"


@pytest.fixture
def auth():
    server = AuthServer().start()
    yield server
    server.stop()


def oauth_dovecot(tmp_path, auth: AuthServer, mechanisms: str = "xoauth2 oauthbearer"):
    if not dovecot_server.available():
        if os.environ.get("CI"):
            pytest.fail("Dovecot is not installed, and CI is set: .ci/run must install the Debian package dovecot-imapd")
        pytest.skip("Dovecot is not installed: apt-get install dovecot-imapd")
    cert, key = self_signed(tmp_path)
    server = dovecot_server.Dovecot(tmp_path / "dovecot", cert, key, introspection_url=f"{auth.url}/introspect")
    if mechanisms != "xoauth2 oauthbearer":
        server.conf.write_text(server.conf.read_text().replace("auth_mechanisms = xoauth2 oauthbearer", f"auth_mechanisms = {mechanisms}"))
    server.start()
    return server


@pytest.fixture
def dovecot(tmp_path, auth):
    server = oauth_dovecot(tmp_path, auth)
    yield server
    server.stop()


def login(server, auth: AuthServer) -> imaplib.IMAP4:
    """The test's own IMAP client, with a token the auth server issues to it directly (not counted as a request)."""
    token = "test-" + secrets.token_urlsafe(16)
    auth.tokens[token] = time.time() + 3600
    conn = imaplib.IMAP4("127.0.0.1", server.port, timeout=30)
    conn.authenticate("XOAUTH2", lambda _: f"user={USERNAME}\x01auth=Bearer {token}\x01\x01".encode())
    return conn


def append(server, auth, *messages: bytes) -> None:
    with login(server, auth) as conn:
        for raw in messages:
            assert conn.append("INBOX", None, None, raw)[0] == "OK"


def count(server, auth, folder: str) -> int:
    with login(server, auth) as conn:
        typ, data = conn.select(f'"{folder}"', readonly=True)
        return int(data[0]) if typ == "OK" else 0


def mailbox(config: Config, server, auth: AuthServer, secret: str = CLIENT_SECRET, refresh: str | None = None, **more) -> Config:
    box = ImapConfig(host="127.0.0.1", port=server.port, tls="none", username=USERNAME, auth="oauth2", token_url=f"{auth.url}/token",
                     client_id=CLIENT_ID, client_secret_env=SECRET_ENV, refresh_token_env=REFRESH_ENV if refresh else None,
                     scope=None if refresh else SCOPE, poll_interval=1.0, **more)
    return replace(config, imap=(box,), secrets={**config.secrets, SECRET_ENV: secret, **({REFRESH_ENV: refresh} if refresh else {})})


def healthz(server: RunningDaemon) -> tuple[int, list[str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.daemon.monitor.port}/healthz", timeout=10) as response:
            return response.status, []
    except urllib.error.HTTPError as unhealthy:
        return unhealthy.code, json.loads(unhealthy.read())["problems"]


def test_the_feeds_user_cannot_log_in_with_a_password(config, dovecot, auth):
    """The Dovecot of these tests takes OAuth2 only: a password login, even the right one, is refused."""
    with imaplib.IMAP4("127.0.0.1", dovecot.port, timeout=30) as conn:
        assert "AUTH=XOAUTH2" in conn.capabilities and "AUTH=PLAIN" not in conn.capabilities
        with pytest.raises(imaplib.IMAP4.error):
            conn.login(USERNAME, dovecot_server.PASSWORD)


async def test_client_credentials_land_the_mail_and_move_it_to_processed(config, dovecot, auth):
    """Microsoft 365's shape: client credentials with the .default scope, the secret in the form; one token for every poll."""
    append(dovecot, auth, feed("m365.csv"))
    config = mailbox(config, dovecot, auth)
    with RunningDaemon(config):
        assert await eventually(lambda: amr_keys(config), timeout=20)
        assert await eventually(lambda: count(dovecot, auth, "Processed") == 1, timeout=10)
        time.sleep(2.5)  # more polls
    assert amr_keys(config)[0].endswith("/m365.csv") and count(dovecot, auth, "INBOX") == 0
    [form] = auth.requests
    assert form == {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "scope": SCOPE}


async def test_a_refresh_token_grant_lands_the_mail_and_keeps_a_rotated_refresh_token(config, dovecot, auth):
    """Google's shape: a refresh-token grant. The provider rotates the refresh token; the next grant uses the new one."""
    auth.rotate, auth.lifetime = True, 30  # under a minute: a new token for every login
    append(dovecot, auth, feed("google.csv"))
    config = mailbox(config, dovecot, auth, refresh=REFRESH_TOKEN)
    with RunningDaemon(config):
        assert await eventually(lambda: amr_keys(config), timeout=20)
        dovecot.crash()
        dovecot.start()
        append(dovecot, auth, feed("google-2.csv"))
        assert await eventually(lambda: len(amr_keys(config)) == 2, timeout=60)  # a restarted Dovecot, reached with backoff (1, 2, 4, 8 s …)
    grants = [form for form in auth.requests if form["grant_type"] == "refresh_token"]
    # the server takes only the latest refresh token it gave (the second grant would be invalid_grant otherwise)
    assert len(grants) == 2 and grants[0]["refresh_token"] == REFRESH_TOKEN and grants[1]["refresh_token"].startswith("refresh-")


async def test_a_token_is_reused_across_logins_until_a_minute_before_it_expires(config, dovecot, auth):
    """An hour-long token serves two reconnects without a new request; a 30 s token (under the minute) is fetched for each login."""
    config = mailbox(config, dovecot, auth)
    for lifetime, requests in ((3600, 1), (30, 3)):
        auth.lifetime, auth.requests = lifetime, []
        with RunningDaemon(config):
            for n in range(2):
                append(dovecot, auth, feed(f"reuse-{lifetime}-{n}.csv"))
                assert await eventually(lambda: count(dovecot, auth, "INBOX") == 0, timeout=60)  # after a restart: backoff
                dovecot.crash()  # the watcher reconnects and logs in again
                dovecot.start()
            append(dovecot, auth, feed(f"reuse-{lifetime}-last.csv"))
            assert await eventually(lambda: count(dovecot, auth, "INBOX") == 0, timeout=60)
        assert auth.token_requests() == requests, (lifetime, auth.requests)


async def test_a_token_the_server_refuses_is_replaced_once_without_an_outage(config, dovecot, auth, caplog):
    """The provider expired every token early: the login with the kept one is refused, one new token is fetched,
    and the mailbox goes on with no warning."""
    config = mailbox(config, dovecot, auth)
    caplog.set_level("INFO", logger="esmail")
    with RunningDaemon(config):
        append(dovecot, auth, feed("first.csv"))
        assert await eventually(lambda: len(amr_keys(config)) == 1, timeout=20)
        auth.expire_all()
        dovecot.crash()
        dovecot.start()
        append(dovecot, auth, feed("second.csv"))
        assert await eventually(lambda: len(amr_keys(config)) == 2, timeout=60)  # a restarted Dovecot, reached with backoff (1, 2, 4, 8 s …)
    assert auth.token_requests() == 2
    assert "the server refused the kept OAuth2 token; fetching a new one" in caplog.text
    assert not [r for r in caplog.records if r.name == "esmail.imap" and r.levelno >= logging.WARNING and "refused" in r.getMessage()]


async def test_a_wrong_secret_is_one_warning_and_an_unhealthy_mailbox_until_fixed(config, dovecot, auth, caplog):
    """invalid_client: the daemon stays up, warns once, /healthz is 503 for the mailbox, nothing lands; restarted with
    the right secret, the mail lands."""
    append(dovecot, auth, feed("waiting.csv"))
    wrong = replace(mailbox(config, dovecot, auth, secret="not-the-secret"), http=HttpConfig(listen=Address("127.0.0.1", 0)))
    with RunningDaemon(wrong) as server:
        assert await eventually(lambda: auth.token_requests() >= 3, timeout=20)  # 1 s, 2 s backoff
        status, problems = healthz(server)
    assert status == 503 and "invalid_client" in problems[0] and problems[0].startswith(f"the mailbox {wrong.imap[0]} cannot be read")
    warnings = [r.getMessage() for r in caplog.records if r.name == "esmail.imap" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "refused: invalid_client" in warnings[0] and "a human must act" in warnings[0]
    assert amr_keys(config) == [] and count(dovecot, auth, "INBOX") == 1
    right = mailbox(config, dovecot, auth)
    with RunningDaemon(right):
        assert await eventually(lambda: amr_keys(config), timeout=20)


async def test_a_failing_token_endpoint_is_an_outage_and_recovers(config, dovecot, auth, caplog):
    """HTTP 500, then an answer that is not JSON: one warning, backoff, 503 for the mailbox; then one line when it works."""
    auth.failing = "500"
    caplog.set_level("INFO", logger="esmail.imap")
    append(dovecot, auth, feed("later.csv"))
    config = replace(mailbox(config, dovecot, auth), http=HttpConfig(listen=Address("127.0.0.1", 0)))
    with RunningDaemon(config) as server:
        assert await eventually(lambda: auth.token_requests() >= 2, timeout=20)
        assert healthz(server)[1][0].endswith("failed: HTTPError: HTTP 500")
        auth.failing = "garbage"
        assert await eventually(lambda: auth.token_requests() >= 3, timeout=20)
        auth.failing = None
        assert await eventually(lambda: amr_keys(config), timeout=60)  # the next try after backoff (4 s, 8 s …)
        assert await eventually(lambda: healthz(server)[0] == 200, timeout=10)
    warnings = [r for r in caplog.records if r.name == "esmail.imap" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the token endpoint" in warnings[0].getMessage()
    assert "connected again after" in caplog.text


async def test_oauthbearer_when_the_server_offers_only_that(config, tmp_path, auth):
    server = oauth_dovecot(tmp_path, auth, mechanisms="oauthbearer")
    try:
        with imaplib.IMAP4("127.0.0.1", server.port, timeout=30) as conn:
            assert "AUTH=OAUTHBEARER" in conn.capabilities and "AUTH=XOAUTH2" not in conn.capabilities
        token = "test-" + secrets.token_urlsafe(16)
        auth.tokens[token] = time.time() + 3600
        with imaplib.IMAP4("127.0.0.1", server.port, timeout=30) as conn:
            conn.authenticate("OAUTHBEARER", lambda _: f"n,a={USERNAME},\x01auth=Bearer {token}\x01\x01".encode())
            assert conn.append("INBOX", None, None, feed("bearer.csv"))[0] == "OK"
        config = mailbox(config, server, auth)
        with RunningDaemon(config):
            assert await eventually(lambda: amr_keys(config), timeout=20)
        assert amr_keys(config)[0].endswith("/bearer.csv")
    finally:
        server.stop()


def test_check_config_fetches_a_token_logs_in_and_says_when_it_expires(config, dovecot, auth, tmp_path):
    append(dovecot, auth, feed("a.csv"))
    toml = tmp_path / "esmail.toml"
    toml.write_text(config_toml(config) + f'[[imap]]\nhost = "127.0.0.1"\nport = {dovecot.port}\ntls = "none"\nusername = "{USERNAME}"\n'
                    f'auth = "oauth2"\ntoken_url = "{auth.url}/token"\nclient_id = "{CLIENT_ID}"\nclient_secret_env = "{SECRET_ENV}"\n'
                    f'scope = "{SCOPE}"\n')

    def check(secret: str):
        return subprocess.run([sys.executable, "-m", "esmail", "--config", str(toml), "--log-level", "debug", "check-config"],
                              capture_output=True, text=True, env={**os.environ, SECRET_ENV: secret}, timeout=60)

    ok = check(CLIENT_SECRET)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    line = f"ok      imap {USERNAME}@127.0.0.1:{dovecot.port}/INBOX: 1 message in INBOX; OAuth2 token (client credentials grant) valid until "
    assert line in ok.stdout
    wrong = check("wrong-secret")
    assert wrong.returncode == 1 and "invalid_client" in wrong.stdout and f"FAILED  imap {USERNAME}@127.0.0.1" in wrong.stdout
    for output in (ok.stdout + ok.stderr, wrong.stdout + wrong.stderr):
        assert CLIENT_SECRET not in output and "wrong-secret" not in output
        assert not [token for token in auth.tokens if token in output]


async def test_no_token_or_secret_reaches_the_log(config, dovecot, auth, caplog):
    """Every line esmail logs (debug included) through a refused token, a renewal and a wrong secret: no token, no secret."""
    caplog.set_level("DEBUG")
    config = mailbox(config, dovecot, auth, refresh=REFRESH_TOKEN)
    with RunningDaemon(config):
        append(dovecot, auth, feed("quiet.csv"))
        assert await eventually(lambda: amr_keys(config), timeout=20)
        auth.expire_all()
        dovecot.crash()
        dovecot.start()
        append(dovecot, auth, feed("quiet-2.csv"))
        assert await eventually(lambda: len(amr_keys(config)) == 2, timeout=60)  # a restarted Dovecot, reached with backoff (1, 2, 4, 8 s …)
    with RunningDaemon(mailbox(config, dovecot, auth, secret="not-it", refresh=REFRESH_TOKEN)):
        assert await eventually(lambda: auth.token_requests() >= 4, timeout=20)
    logged = caplog.text
    assert "new OAuth2 token (refresh token grant)" in logged and "invalid_client" in logged
    for secret in (*auth.tokens, CLIENT_SECRET, "not-it", REFRESH_TOKEN):
        assert secret not in logged, secret
