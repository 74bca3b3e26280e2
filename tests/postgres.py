"""A throwaway PostgreSQL server for the tests: Debian's `postgresql`, initdb + pg_ctl in a temp folder, loopback only.

PostgreSQL refuses to run as root (as CI runs the suite), so when the tests
are root the server runs as `nobody`, in a folder of its own under /tmp
(pytest's own temp folders are 0700 root). Roles log in with a password
(scram-sha-256) over TCP; the superuser `postgres` makes a database per test.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from conftest import free_port

SUPERUSER, SUPERPASSWORD = "postgres", "pg-test-superuser"
ROLE, PASSWORD = "esmail", "esmail-test-password"


def _bin() -> Path | None:
    """The newest installed server's bin folder (Debian keeps them in /usr/lib/postgresql/N/bin, off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


BIN = _bin()


def available() -> bool:
    return BIN is not None and (BIN / "initdb").exists()


class Postgres:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="esmail-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = "nobody" if os.geteuid() == 0 else None
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        secret = self.root / "superuser-password"
        secret.write_text(SUPERPASSWORD + "\n")
        if self.user:
            os.chown(secret, entry.pw_uid, entry.pw_gid)
        self._run(BIN / "initdb", "-D", self.data, "-U", SUPERUSER, f"--pwfile={secret}", "--auth=scram-sha-256",
                  "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")
        secret.unlink()
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.root}'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")

    def _run(self, *command, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in command], user=self.user, cwd=self.root, check=check, capture_output=True, text=True)

    def start(self) -> None:
        self._run(BIN / "pg_ctl", "-D", self.data, "-l", self.root / "server.log", "-w", "-t", "30", "start")

    def stop(self) -> None:
        self._run(BIN / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop", check=False)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str, user: str = ROLE) -> str:
        """A URL without its password, as esmail's config takes it (the password goes in PGPASSWORD or password_env)."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> list[tuple]:
        """Run SQL as the superuser (psycopg, as esmail uses it)."""
        import psycopg

        with psycopg.connect(self.url(database, SUPERUSER), password=SUPERPASSWORD, autocommit=True) as conn:
            cursor = conn.execute(statement)
            return cursor.fetchall() if cursor.description else []

    def new_database(self, name: str, owned: bool = True) -> str:
        """A database owned by the esmail role (made on first use), as docs/many-hosts.md sets it up; its URL.
        `owned=False`: the superuser's, where the role may connect but not create tables (no grant yet)."""
        if not self.sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'"):
            self.sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
        self.sql(f"CREATE DATABASE {name}" + (f" OWNER {ROLE}" if owned else ""))
        if not owned:
            self.sql("REVOKE CREATE ON SCHEMA public FROM PUBLIC", name)  # PostgreSQL before 15 lets everyone create there
        return self.url(name)
