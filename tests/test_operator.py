"""The operations guide tried as a new operator would: each place one got stuck or was misled, fixed and pinned."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path

import pytest

from conftest import FAKE_AWS, RunningDaemon, self_signed
from esmail import metrics
from esmail.spool import Spool
from esmail.worker import Worker

UNIT = Path(__file__).parents[1] / "systemd" / "esmail.service"
DOMAIN = "datafeeds.example.org"


def esmail(*args, stdin: bytes | None = None, cwd=None, umask: int | None = None):
    return subprocess.run([sys.executable, "-m", "esmail", *map(str, args)], capture_output=True, input=stdin, cwd=cwd,
                          env={**os.environ, **FAKE_AWS}, timeout=120, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def eml(to: str = f"sheffield@{DOMAIN}", **headers) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"] = "meters@supplier.example", to
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("attached")
    msg.add_attachment(b"MPAN,00:30\r\n2200013680374,1.5\r\n", maintype="text", subtype="csv", filename="export.csv")
    return bytes(msg)


def local(tmp_path, text: str = "") -> Path:
    toml = tmp_path / "c.toml"
    toml.write_text(f'[storage]\npath = "{tmp_path / "data"}"\n[spool]\npath = "{tmp_path / "spool"}"\nmin_free = 0\n{text}')
    return toml


def test_ingest_reads_a_message_from_standard_input(tmp_path):
    """`aws s3 cp s3://…/X.eml - | esmail ingest -`: no file for the service user to be unable to read."""
    result = esmail("--config", local(tmp_path), "ingest", "--recipient", f"sheffield@{DOMAIN}", "-", stdin=eml())
    assert result.returncode == 0, result.stderr
    assert "amr-data\tsheffield/" in result.stdout.decode() and list((tmp_path / "data").rglob("export.csv"))


def test_ingest_says_when_no_recipient_is_in_a_configured_domain(tmp_path):
    """docs/operations.md: the prefix comes from the first address in a configured domain; when none is, the old rule, with a warning."""
    toml = local(tmp_path, f'[smtp]\ndomains = ["{DOMAIN}"]\n')
    (tmp_path / "foreign.eml").write_bytes(eml(to="leeds@elsewhere.example"))
    result = esmail("--config", toml, "ingest", tmp_path / "foreign.eml")
    assert result.returncode == 0
    assert f"no recipient in [smtp] domains ({DOMAIN}); the prefix 'leeds' comes from leeds@elsewhere.example" in result.stderr.decode()
    (tmp_path / "ours.eml").write_bytes(eml(to=f"sheffield@{DOMAIN}"))
    assert "no recipient in [smtp] domains" not in esmail("--config", toml, "ingest", tmp_path / "ours.eml").stderr.decode()


def test_check_config_fails_what_serve_would_refuse(tmp_path):
    """TLS files that do not load, a spool that cannot be made: a FAILED line each and exit 1; the page on the SMTP port: exit 2."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    toml = tmp_path / "c.toml"
    toml.write_text(f'[smtp]\ntls_cert = "{tmp_path / "fullchain.pem"}"\ntls_key = "{tmp_path / "privkey.pem"}"\n'
                    f'[storage]\npath = "{tmp_path / "data"}"\n[spool]\npath = "{blocked / "spool"}"\n')
    result = esmail("--config", toml, "check-config")
    out = result.stdout.decode()
    assert result.returncode == 1
    assert f"FAILED  spool: [spool] path = '{blocked / 'spool'}': cannot create or write" in out
    assert "FAILED  tls: [smtp] tls_cert" in out and "cannot load the certificate and key" in out
    cert, key = self_signed(tmp_path)
    toml.write_text(f'[smtp]\ntls_cert = "{cert}"\ntls_key = "{key}"\n[storage]\npath = "{tmp_path / "data"}"\n'
                    f'[spool]\npath = "{tmp_path / "spool"}"\nmin_free = 0\n')
    result = esmail("--config", toml, "check-config")
    assert result.returncode == 0 and f"ok      tls: {cert} and its key load, valid until" in result.stdout.decode()
    toml.write_text('[smtp]\nlisten = "127.0.0.1:2525"\n[http]\nlisten = "127.0.0.1:2525"\n')
    same = esmail("--config", toml, "check-config")
    assert same.returncode == 2 and "[http] listen and [smtp] listen are both 127.0.0.1:2525" in same.stderr.decode()


@pytest.mark.parametrize("text, expected", [
    ("[links]\npatterns = ['https://x\\.example/(unclosed']\n", "[links] patterns must be a list of regular expressions"),
    ('[smtp]\nmax_sessions = "100"\n', '[smtp] max_sessions must be at least 1 (a whole number of concurrent connections); got \'100\' '
                                       "(a number: write it without quotes)"),
    ('[smtp]\ndomains = ["@datafeeds.example.org"]\n', "[smtp] domains must be a list of domain names"),
])
def test_config_mistakes_exit_2_naming_the_key(tmp_path, text, expected):
    toml = tmp_path / "c.toml"
    toml.write_text(text)
    result = esmail("--config", toml, "check-config")
    assert result.returncode == 2 and expected in result.stderr.decode() and "Traceback" not in result.stderr.decode()


def test_a_spool_that_cannot_be_made_is_a_config_error_not_a_traceback(tmp_path):
    (tmp_path / "a-file").write_text("")
    toml = tmp_path / "c.toml"
    toml.write_text(f'[spool]\npath = "{tmp_path / "a-file" / "spool"}"\n')
    for command in (["serve"], ["ingest", "-"], ["spool", "list"]):
        result = esmail("--config", toml, *command, stdin=b"")
        err = result.stderr.decode()
        assert "Traceback" not in err and result.returncode in (1, 2), (command, err)
    serve = esmail("--config", toml, "serve").stderr.decode()
    assert "config error" in serve and "[spool] path" in serve and "chown -R esmail:" in serve


def test_a_malformed_rollbar_token_is_refused_at_start(tmp_path):
    """A token that is not 32 hex characters stops the start, and says so when a comment was kept in it."""
    result = subprocess.run([sys.executable, "-m", "esmail", "check-config"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "ROLLBAR_ACCESS_TOKEN": "d00dfeedd00dfeedd00dfeedd00dfeed   # Rollbar"}, timeout=60)
    assert result.returncode == 2 and "ROLLBAR_ACCESS_TOKEN (environment or .env.development) is not a Rollbar access token" in result.stderr
    assert "keeps a comment written after a value as part of the value" in result.stderr


def test_config_errors_follow_log_format_json(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[smtp]\nmax_sessions = 0\n")
    result = esmail("--config", toml, "--log-format", "json", "check-config")
    [line] = result.stderr.decode().splitlines()
    entry = json.loads(line)
    assert result.returncode == 2 and entry["level"] == "error" and entry["message"].startswith("config error: ")


def test_send_says_a_recipient_needs_a_domain(tmp_path):
    (tmp_path / "a.csv").write_text("a,b\n")
    result = esmail("send", "--to", "sheffield", tmp_path / "a.csv")
    assert result.returncode == 2 and "--to 'sheffield' needs a domain" in result.stderr.decode()


def test_stored_files_follow_the_umask_so_an_importer_in_the_group_can_read_them(tmp_path):
    """Under the unit's group-readable variant (UMask=0027) objects are 0640 in 0750 folders; under 0077, 0600 in 0700."""
    for umask, file_mode, dir_mode in ((0o027, 0o640, 0o750), (0o077, 0o600, 0o700)):
        data = tmp_path / f"data-{umask:o}"
        toml = tmp_path / "c.toml"
        toml.write_text(f'[storage]\npath = "{data}"\n[spool]\npath = "{tmp_path / "spool"}"\nmin_free = 0\n')
        result = esmail("--config", toml, "ingest", "--recipient", f"sheffield@{DOMAIN}", "-", stdin=eml(), umask=umask)
        assert result.returncode == 0, result.stderr
        [csv] = data.rglob("export.csv")
        assert stat.S_IMODE(csv.stat().st_mode) == file_mode and stat.S_IMODE(csv.parent.stat().st_mode) == dir_mode


@pytest.mark.parametrize("config", ["local"], indirect=True)
async def test_a_second_attempt_says_already_stored(config, store, caplog):
    """An entry processed again (a retry after a later object failed) logs its first objects as already stored."""
    spool = Spool(config.spool.path)
    envelope = spool.accept(eml(), ["sheffield"])
    copy = spool.entry_path(envelope.id).read_bytes()
    caplog.set_level("INFO", logger="esmail.worker")
    await Worker(config, spool, store).process(envelope.id)
    spool.entry_path(envelope.id).write_bytes(copy)  # as if the first attempt had stopped after storing
    caplog.clear()
    await Worker(config, spool, store).process(envelope.id)
    lines = [r.getMessage() for r in caplog.records if ".eml" in r.getMessage() or "export.csv" in r.getMessage()]
    assert lines and all(": already stored " in line for line in lines), lines


@pytest.mark.parametrize("config", ["local"], indirect=True)
def test_refused_mail_leaves_one_log_line_and_a_failed_tls_handshake_no_error(config, tmp_path, caplog):
    """550 at RCPT is an INFO line naming client, sender and recipient; a STARTTLS handshake with garbage is one INFO
    line and a counter, no ERROR, no traceback."""
    cert, key = self_signed(tmp_path)
    before = metrics.REGISTRY.get_sample_value("esmail_tls_handshake_failures_total") or 0
    caplog.set_level("INFO", logger="esmail.smtp")
    config = replace(config, smtp=replace(config.smtp, domains=(DOMAIN,)))
    with RunningDaemon(config, tls_cert=cert, tls_key=key) as server:
        with server.smtp() as client:
            client.ehlo("sender.example")
            client.starttls(context=__import__("ssl")._create_unverified_context())
            client.ehlo("sender.example")
            client.mail("meters@supplier.example")
            assert client.rcpt("someone@elsewhere.example")[0] == 550
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        raw.recv(1000)
        raw.sendall(b"EHLO x\r\nSTARTTLS\r\n")
        time.sleep(0.3)
        raw.sendall(b"not a TLS client hello\r\n" * 4)
        deadline = time.monotonic() + 10
        while "TLS handshake failed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        raw.close()
    refused = [r.getMessage() for r in caplog.records if "refused: 550" in r.getMessage()]
    assert refused == ["127.0.0.1: refused: 550 5.1.1 <someone@elsewhere.example>: Recipient address rejected: "
                       "not a data feed domain here (MAIL FROM <meters@supplier.example>)"]
    assert any(r.levelname == "INFO" and "127.0.0.1: TLS handshake failed: [SSL" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= 40]
    assert metrics.REGISTRY.get_sample_value("esmail_tls_handshake_failures_total") == before + 1


def test_the_unit_does_not_restart_a_config_error():
    unit = UNIT.read_text()
    assert "RestartPreventExitStatus=2" in unit and "Restart=on-failure" in unit


@pytest.mark.skipif(shutil.which("runuser") is None or shutil.which("esmail") is None or os.geteuid() != 0,
                    reason="esmail-admin drops privileges with runuser, as root")
def test_esmail_admin_runs_commands_with_every_secret_of_the_env_file(tmp_path):
    """The operations guide's admin wrapper: the secrets a config names (here the page's password) come from the env file."""
    toml = local(tmp_path, '[http]\nlisten = "127.0.0.1:9925"\npassword_env = "PAGE_PASSWORD"\n')
    env_file = tmp_path / "env"
    env_file.write_text("PAGE_PASSWORD=from-the-env-file\n")
    admin = Path(__file__).parents[1] / "systemd" / "esmail-admin"
    env = {**{k: v for k, v in os.environ.items() if k != "PAGE_PASSWORD"}, "ESMAIL_ENV_FILE": str(env_file),
           "ESMAIL_CONFIG": str(toml), "ESMAIL_USER": "root", "ESMAIL": shutil.which("esmail")}
    ok = subprocess.run([str(admin), "check-config"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "# PAGE_PASSWORD: set (****)" in ok.stdout and "from-the-env-file" not in ok.stdout
    env["ESMAIL_ENV_FILE"] = str(tmp_path / "absent")
    missing = subprocess.run([str(admin), "check-config"], capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and "password_env = 'PAGE_PASSWORD'" in missing.stderr
