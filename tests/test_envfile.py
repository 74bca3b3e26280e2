"""The secrets file as systemd reads it: esmail, esmail-admin and systemd's own parser agree on every value."""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from esmail import config as config_module, envfile
from esmail.errors import ConfigError

ADMIN = Path(__file__).parents[1] / "systemd" / "esmail-admin"
LIBSYSTEMD_SHARED = sorted(glob.glob("/usr/lib/*/systemd/libsystemd-shared-*.so") + glob.glob("/lib/systemd/libsystemd-shared-*.so"))

# What an operator writes: the template line (a comment after the value), quotes, escapes, a
# continued line, an `export`, blanks around the key, CRLF, a key given twice.
TRICKY = (b"# Rollbar: a post_server_item token\n"
          b"ROLLBAR_ACCESS_TOKEN=d00dfeedd00dfeedd00dfeedd00dfeed   # Rollbar: 32 hex characters\n"
          b"; a comment too\n"
          b"IMAP_PASSWORD=\"pass word # not a comment\"\n"
          b"SINGLE='keeps $HOME and \\n as they are'\n"
          b"ESCAPED=a\\ b\\\\c\\$d\n"
          b"JOINED=first \\\n  second\n"
          b"export EXPORTED=1\n"
          b"  INDENTED = spaced value  \n"
          b"CRLF=windows\r\n"
          b"DOUBLE=\"a\\\"b\\$c\\qd\"\n"
          b"EMPTY=\n"
          b"TWICE=1\nTWICE=2\n"
          b"NO_EQUALS\n"
          b"MULTI='line one\nline two'\n")
EXPECTED = {
    "ROLLBAR_ACCESS_TOKEN": "d00dfeedd00dfeedd00dfeedd00dfeed   # Rollbar: 32 hex characters",
    "IMAP_PASSWORD": "pass word # not a comment",
    "SINGLE": "keeps $HOME and \\n as they are",
    "ESCAPED": "a b\\c$d",
    "JOINED": "first   second",
    "INDENTED": "spaced value",
    "CRLF": "windows",
    "DOUBLE": 'a"b$c\\qd',
    "EMPTY": "",
    "TWICE": "2",
    "MULTI": "line one\nline two",
}


def systemd_reads(path: Path) -> dict[str, str] | int:
    """What systemd's EnvironmentFile= makes of a file: its own load_env_file() and the clean-up that drops invalid
    names (exec_context_load_environment), called in libsystemd-shared; a negative errno when it refuses the file."""
    lib = ctypes.CDLL(LIBSYSTEMD_SHARED[-1])
    strv = ctypes.POINTER(ctypes.c_char_p)
    lib.load_env_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(strv)]
    lib.strv_env_clean_with_callback.restype = strv
    lib.strv_env_clean_with_callback.argtypes = [strv, ctypes.c_void_p, ctypes.c_void_p]
    found = strv()
    error = lib.load_env_file(None, bytes(path), ctypes.byref(found))
    if error < 0:
        return error
    found = lib.strv_env_clean_with_callback(found, None, None)
    values, i = {}, 0
    while found and found[i]:
        name, _, value = found[i].decode().partition("=")
        values[name] = value
        i += 1
    return values


needs_systemd = pytest.mark.skipif(not LIBSYSTEMD_SHARED, reason="systemd's libsystemd-shared is not installed (Debian: systemd)")


def test_the_rules_on_what_an_operator_writes():
    """Comments only on lines of their own, quotes, escapes, continued lines; `export` and lines without = ignored, with a note."""
    values, ignored = envfile.parse(TRICKY, "env")
    assert values == EXPECTED
    assert ignored == ["env: line 9: 'export EXPORTED' is not a variable name (letters, digits, _): systemd ignores the line "
                       "(write it without 'export')",
                       "env: line 16: no '=' in 'NO_EQUALS': ignored"]


@needs_systemd
def test_systemd_reads_the_same(tmp_path):
    """systemd's own parser, on the same file, gives the same values."""
    (tmp_path / "env").write_bytes(TRICKY)
    assert systemd_reads(tmp_path / "env") == EXPECTED


@needs_systemd
@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["A", "B", "x", "é", "…", "_", "1", "=", " ", "\t", "\n", "\r", "\r\n", "#", ";", "'", '"',
                                 "\\", "$", "`", "export "]), max_size=60).map("".join))
def test_systemd_reads_the_same_on_any_file(text):
    """Any text built of the characters that matter: esmail's parser and systemd's agree (or esmail refuses the file)."""
    try:
        ours = envfile.parse(text.encode(), "env")[0]
    except ConfigError as exc:
        assert "comment ending in a backslash" in str(exc)
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "env"
        path.write_text(text, newline="")
        assert ours == systemd_reads(path)


@pytest.mark.parametrize("data, message", [
    (b"A=caf\xe9\n", "env: line 1 is not UTF-8; systemd would ignore the whole file: write it as UTF-8"),
    (b"# a comment \\\nROLLBAR_ACCESS_TOKEN=x\n", "env: line 1: a comment ending in a backslash means different things to systemd 252"),
])
def test_a_file_systemd_would_misread_is_refused(data, message):
    """Invalid UTF-8 (systemd drops the whole file) and a comment ending in `\\` (read differently by systemd 252 and 254)."""
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        envfile.parse(data, "env")


@pytest.mark.skipif(shutil.which("runuser") is None or os.geteuid() != 0, reason="esmail-admin drops privileges with runuser, as root")
def test_esmail_admin_runs_a_command_with_what_systemd_reads(tmp_path):
    """esmail-admin: the same file gives the command the same values as systemd, as the service's user, with its umask."""
    (tmp_path / "env").write_bytes(TRICKY)
    # Both of esmail-admin's calls go through $ESMAIL: `env-file` to esmail, the command itself to a shell that prints
    # its user, its umask and its environment (NUL-separated: a value may hold a newline), in a folder nobody can reach.
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        wrapper = Path(folder) / "esmail"
        wrapper.write_text(f'#!/bin/sh\nif [ "$1" = env-file ]; then exec {sys.executable} -m esmail "$@"; fi\n'
                           'id -u; umask; exec env -0\n')
        wrapper.chmod(0o755)
        env = {**{k: v for k, v in os.environ.items() if k not in EXPECTED}, "ESMAIL_ENV_FILE": str(tmp_path / "env"),
               "ESMAIL_USER": "nobody", "ESMAIL": str(wrapper)}
        result = subprocess.run([str(ADMIN), "spool", "list"], capture_output=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    user, mask, environment = result.stdout.decode().split("\n", 2)
    seen = dict(item.split("=", 1) for item in environment.split("\0") if item)
    assert {name: seen[name] for name in EXPECTED if name in seen} == EXPECTED
    assert "EXPORTED" not in seen and "line 9: 'export EXPORTED'" in result.stderr.decode()
    assert int(user) == int(subprocess.check_output(["id", "-u", "nobody"])) and mask == "0077"
    if LIBSYSTEMD_SHARED:
        assert systemd_reads(tmp_path / "env") == EXPECTED


def test_env_dot_stage_is_read_by_the_same_rules(tmp_path):
    """`.env.{stage}` beside the config: a comment after the token stays in it, as systemd would keep it, and says so."""
    toml = tmp_path / "c.toml"
    toml.write_text('stage = "production"\n')
    (tmp_path / ".env.production").write_bytes(TRICKY)
    with pytest.raises(ConfigError, match="is not a Rollbar access token .*keeps a comment written after a value as part of the value"):
        config_module.load(toml, environ={})
    fixed = TRICKY.replace(b"   # Rollbar: 32 hex characters", b"")
    (tmp_path / ".env.production").write_bytes(fixed)
    loaded = config_module.load(toml, environ={})
    assert loaded.secrets["ROLLBAR_ACCESS_TOKEN"] == "d00dfeedd00dfeedd00dfeedd00dfeed"
    assert any("'export EXPORTED' is not a variable name" in warning for warning in loaded.warnings)


@pytest.mark.parametrize("name, value", [
    ("ROLLBAR_ACCESS_TOKEN", "0123456789abcdef0123456789abcdef"),
    ("AWS_ACCESS_KEY_ID", "AKIA…"),
    ("AWS_SECRET_ACCESS_KEY", "…"),
])
@pytest.mark.parametrize("command", [["check-config"], ["serve"]])
def test_the_templates_placeholders_are_refused(tmp_path, name, value, command):
    """The env template's placeholders, left in, stop the start and check-config, naming the variable."""
    toml = tmp_path / "c.toml"
    toml.write_text(f'[storage]\npath = "{tmp_path / "data"}"\n[spool]\npath = "{tmp_path / "spool"}"\n')
    result = subprocess.run([sys.executable, "-m", "esmail", "--config", str(toml), *command], capture_output=True, text=True,
                            env={**os.environ, name: value}, timeout=60)
    assert result.returncode == 2
    assert f"{name} (environment or .env.development): this is the placeholder of a template, not a real value" in result.stderr


def test_env_file_lists_names_and_lengths_never_values(tmp_path):
    """`esmail env-file FILE` shows what systemd will set, and what looks wrong, without printing a secret."""
    (tmp_path / "env").write_bytes(b"ROLLBAR_ACCESS_TOKEN=0123456789abcdef0123456789abcdef\nIMAP_PASSWORD=s3cret   # the mailbox\n")
    result = subprocess.run([sys.executable, "-m", "esmail", "env-file", str(tmp_path / "env")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        "ROLLBAR_ACCESS_TOKEN: 32 characters; this is the placeholder of a template, not a real value: put the real value in, "
        "or remove the line",
        "IMAP_PASSWORD: 22 characters; it holds ' #': systemd's EnvironmentFile= (and a .env file) keeps a comment written "
        "after a value as part of the value; put comments on lines of their own"]
    assert "s3cret" not in result.stdout
    (tmp_path / "env").write_bytes(b"# only comments, as the template starts\n#IMAP_PASSWORD=\xe2\x80\xa6\n")
    result = subprocess.run([sys.executable, "-m", "esmail", "env-file", str(tmp_path / "env")], capture_output=True, text=True, timeout=60)
    assert result.stdout == f"{tmp_path / 'env'}: no variables (every line is blank or a comment)\n"
