"""A throwaway Dovecot IMAP server for the tests: loopback only, a passwd-file user, maildirs under a temp folder.

Runs as root, as CI does (see DESIGN, "Dovecot for tests"): its login
processes run as dovenull, the mail user is nobody (uid 65534), and the
folders are world-readable so that auth (as dovecot) can read the passwd file.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import free_port

USER, PASSWORD = "feeds", "s3cret-pass"
DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"


def available() -> bool:
    return os.path.exists(DOVECOT)


class Dovecot:
    def __init__(self, root: Path, cert: Path, key: Path, introspection_url: str | None = None):
        """`introspection_url`: log in only with OAuth2 tokens (XOAUTH2, OAUTHBEARER), which Dovecot's oauth2 passdb
        checks there (RFC 7662 introspection); no password passdb, so a password cannot get in."""
        self.root = root
        self.port, self.tls_port = free_port(), free_port()
        for folder in ("run", "state", "home"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        (root / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::\n")
        os.chown(root / "home", 65534, 65534)
        for folder in (root, *root.parents, cert.parent, *cert.parent.parents):  # auth runs as dovecot: it must reach them
            mode = folder.stat().st_mode
            if not mode & 0o001:
                os.chmod(folder, mode | 0o055)
        for path in (root / "passwd", cert, key):
            os.chmod(path, 0o644)
        mechanisms, passdb = "plain login", f"driver = passwd-file\n  args = scheme=PLAIN username_format=%u {root}/passwd"
        if introspection_url:
            (root / "oauth2.conf.ext").write_text(f"introspection_mode = post\nintrospection_url = {introspection_url}\n"
                                                  "username_attribute = username\nactive_attribute = active\nactive_value = true\n")
            os.chmod(root / "oauth2.conf.ext", 0o644)
            mechanisms, passdb = "xoauth2 oauthbearer", f"driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {root}/oauth2.conf.ext"
        self.conf = root / "dovecot.conf"
        self.conf.write_text(f"""
protocols = imap
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
default_login_user = dovenull
default_internal_user = dovecot
first_valid_uid = 1
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
passdb {{
  {passdb}
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home={root}/home/%u
}}
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  separator = /
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.tls_port}
    ssl = yes
  }}
}}
""")

    def start(self) -> None:
        subprocess.run([DOVECOT, "-c", str(self.conf)], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # it daemonises: no pipes
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("dovecot did not start: " + self.log())

    def stop(self) -> None:
        subprocess.run([DOVECOT, "-c", str(self.conf), "stop"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_closed()

    def crash(self) -> None:
        """Kill the server and every session it serves at once (`stop` lets open sessions live on)."""
        pid_file = self.root / "run" / "master.pid"
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGKILL)
        pid_file.unlink(missing_ok=True)
        self._wait_closed()

    def _wait_closed(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                time.sleep(0.05)
            except OSError:
                return

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text() if path.exists() else ""
