"""The spool: a message is ours only once it is here, on disk, fsync'd.

    {spool}/tmp/      being written, and empty blank-* files made ahead for the receiver; never read
    {spool}/queue/    {id}.msg: one line of JSON envelope, then the raw message
    {spool}/failed/   entries that exhausted their attempts, with {id}.reason
    {spool}/quarantine/  entries a feed's policy refused (DESIGN §12), for a human to release
    {spool}/state/    {id}.json: attempts, last error, authentication results (advisory; the results are kept
                      on the entry's file instead, as an extended attribute, where the filesystem allows)
    {spool}/taken/    marks of mailbox messages spooled but not yet moved out of their folder

An entry is written to tmp/, fsync'd, renamed into queue/ and the folder
fsync'd; only then does the receiver say "accepted". The key folders of
DESIGN §3 are chosen here and kept in the envelope, so a replay after a crash
writes the same keys.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from esmail.durable import fsync_dir, sync_files, write_synced, write_unsynced
from esmail.errors import ConfigError, TemporaryFailure
from esmail.keys import folder_name, numbered_folder

SUFFIX = ".msg"
AUTHENTICATION = "user.esmail.authentication"  # the extended attribute of an entry's file that holds its final results


@dataclass(frozen=True)
class Envelope:
    id: str
    received: str  # ISO 8601, UTC
    folders: dict[str, str]  # prefix → key folder (`20250323-101112` or `…-2`); empty: no usable recipient
    sender: str = ""
    recipients: tuple[str, ...] = ()
    client: str = ""
    helo: str = ""
    origin: str = "smtp"  # smtp, imap or ingest
    trusted_authserv_id: str = ""  # IMAP: the provider whose Authentication-Results are believed
    # Set when a feed's policy quarantines the entry (quarantine/), kept when a human releases it (queue/):
    held: dict[str, str] = field(default_factory=dict)  # prefix → why it was quarantined
    authentication: str = ""  # the Authentication-Results header it was judged by, reused when released

    @property
    def received_at(self) -> datetime:
        return datetime.fromisoformat(self.received)


@dataclass(frozen=True)
class Written:
    """A message written to tmp/, not yet durable nor queued."""
    envelope: Envelope
    path: Path


@dataclass
class EntryState:
    attempts: int = 0
    last_error: str = ""
    reason: str = ""  # why it failed for good (failed/ only)
    crashes: int = 0  # conversions of this entry that killed their process
    authentication: dict | None = None  # the final results, so that a replay stores the same inbox copy
    inbox_header: str | None = None  # the Authentication-Results a give-up stored the inbox copy with ("": none); reused
    tries: list[dict] = field(default_factory=list)  # each failed attempt: {"at", "step", "error", "stored"} (the page shows them)
    attachments: list[dict] = field(default_factory=list)  # the files it carried, as its conversion found them: {"name", "bytes"}
    by: str = ""  # who retried or released it (the history's outcome says so)


@dataclass
class Entry:
    """A queued entry as one attempt holds it: its envelope and state read once and carried along, the
    message left on disk until it is needed (`Spool.message`)."""
    envelope: Envelope
    state: EntryState
    path: Path
    body_at: int  # where the raw message starts: past the envelope's line

    @property
    def id(self) -> str:
        return self.envelope.id


def read_entry(path: Path) -> tuple[Envelope, bytes]:
    """An entry's envelope and raw message."""
    with open(path, "rb") as f:
        header = f.readline()
    return _envelope(header), read_body(path, len(header))


def read_body(path: Path, offset: int) -> bytes:
    """The raw message from `offset` on, read unbuffered, straight into one buffer: a buffered read after
    the envelope's line joins what it had buffered to the rest, a second copy of a 40 MB message."""
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        return f.readall()


class Spool:
    def __init__(self, path: Path, min_free: int = 0):
        self.path = Path(path)
        self.min_free = min_free
        self.tmp, self.queue, self.failed, self.quarantine_dir, self.state, self.taken = (
            self.path / d for d in ("tmp", "queue", "failed", "quarantine", "state", "taken"))
        for folder in (self.tmp, self.queue, self.failed, self.quarantine_dir, self.state, self.taken):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                if not os.access(folder, os.W_OK | os.X_OK):
                    raise PermissionError(13, "Permission denied", str(folder))
            except OSError as exc:
                raise ConfigError(f"[spool] path = '{self.path}': cannot create or write {exc.filename or folder}: "
                                  f"{exc.strerror or exc} (esmail runs as {user_name()}); run esmail as the user the service runs as "
                                  f"(sudo -u esmail …), or give that user the folder (chown -R esmail: {self.path})") from None
        self._lock = threading.Lock()
        self._folders_used: dict[tuple[str, str], int] = {}
        self._second: tuple[datetime | None, str, str] = (None, "", "")  # the last second an entry was named in, and its names
        for entry_id in self.pending():
            try:
                self._remember(self.envelope(entry_id))
            except (OSError, ValueError):
                continue

    # --- writing -------------------------------------------------------------

    def accept(self, raw: bytes, prefixes: list[str], **fields) -> Envelope:
        """Write one message durably into the queue and return its envelope; raise TemporaryFailure if it cannot."""
        written = self.write(raw, prefixes, **fields)
        self.publish([written])
        return written.envelope

    def accept_once(self, raw: bytes, prefixes: list[str], key: str, received: datetime, **fields) -> Envelope | None:
        """Spool a message fetched from a mailbox unless it was spooled before (None then).

        `key` is the message's identity (Message-ID plus digest). It is marked
        as taken until `release(key)`, after the mailbox has moved the message;
        it also names the entry, so a message spooled just before a crash,
        before its mark was written, is still found in the queue.
        """
        entry_id = f"{received:%Y%m%d-%H%M%S}-{key[:12]}"
        if (self.taken / key).exists() or any((folder / (entry_id + SUFFIX)).exists() for folder in (self.queue, self.failed)):
            return None
        envelope = self.accept(raw, prefixes, received=received, entry_id=entry_id, **fields)
        try:
            write_synced(self.tmp / key, entry_id.encode())
            os.replace(self.tmp / key, self.taken / key)
            fsync_dir(self.taken)
        except OSError as exc:
            raise self.failure(exc) from exc
        return envelope

    def forget_taken(self, key: str) -> None:
        """The mailbox has let go of the message: forget its mark."""
        (self.taken / key).unlink(missing_ok=True)

    def write(self, raw: bytes, prefixes: list[str], blank: Path | None = None, **fields) -> Written:
        """Write a message to tmp/ (into `blank` if given): not yet durable, not yet in the queue (see `publish`)."""
        self.ensure_space(len(raw))
        envelope = self._envelope_for(fields.pop("received", None), prefixes, fields)
        path = blank or self.tmp / (envelope.id + SUFFIX)
        try:
            write_unsynced(path, _encoded(envelope), b"\n", raw, new=blank is None)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise self.failure(exc) from exc
        return Written(envelope, path)

    def make_blanks(self, count: int) -> list[Path]:
        """Up to `count` empty files in tmp/ for `write` to fill (fewer if the disk refuses: `write` then reports why).

        Creating a file allocates an inode, which on a well-used ext4 can
        take most of a millisecond of kernel CPU (0.8 ms in /tmp on the VM
        esmail is built on); the SMTP receiver has its files made ahead, in a
        thread, so that its event loop only writes.
        """
        blanks = []
        try:
            for _ in range(count):
                fd, path = tempfile.mkstemp(prefix="blank-", dir=self.tmp)
                os.close(fd)
                blanks.append(Path(path))
        except OSError:
            pass
        return blanks

    def publish(self, written: list[Written]) -> None:
        """Make written messages durable and queue them: one flush for all, renames, one fsync of queue/.

        An entry is never in queue/ half-written. On failure none of them is
        queued (none was acknowledged) and TemporaryFailure is raised.
        """
        try:
            sync_files(self.tmp, [each.path for each in written])
            for each in written:
                os.rename(each.path, self.entry_path(each.envelope.id))
            fsync_dir(self.queue)
        except OSError as exc:
            self.discard(written)
            raise self.failure(exc) from exc

    def discard(self, written: list[Written]) -> None:
        """Remove messages that were written but never acknowledged."""
        for each in written:
            each.path.unlink(missing_ok=True)
            self.entry_path(each.envelope.id).unlink(missing_ok=True)

    def failure(self, exc: OSError) -> TemporaryFailure:
        return TemporaryFailure(f"cannot write to the spool {self.path}: {exc.strerror or exc}")

    def remove_stale(self, older_than: float = 3600.0) -> int:
        """Delete what a crash left in tmp/ (never acknowledged, so the sender still has it); return how many.

        Only files older than `older_than` seconds: another process (`esmail ingest`)
        may be writing the young ones right now.
        """
        removed = 0
        cutoff = time.time() - older_than
        for path in self.tmp.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def ensure_space(self, size: int = 0) -> None:
        """Raise TemporaryFailure unless `size` more bytes still leave [spool] min_free on the spool's disk."""
        stat = os.statvfs(self.path)
        free = stat.f_bavail * stat.f_frsize
        if free - size < self.min_free:
            raise TemporaryFailure(f"the spool {self.path} has {free:,} bytes free, under [spool] min_free ({self.min_free:,})")

    def check_writable(self) -> None:
        """Raise TemporaryFailure unless a message could be spooled now: space above min_free, a file can be created."""
        self.ensure_space()
        try:
            with tempfile.NamedTemporaryFile(dir=self.tmp, prefix="health-"):
                pass
        except OSError as exc:
            raise self.failure(exc) from None

    def oldest_age(self) -> float:
        """Seconds the oldest queued entry has waited; 0 when the queue is empty."""
        for entry_id in self.pending():
            try:
                return max((datetime.now(timezone.utc) - self.envelope(entry_id).received_at).total_seconds(), 0.0)
            except (OSError, ValueError):  # finished meanwhile: the next one is the oldest
                continue
        return 0.0

    def _envelope_for(self, received: datetime | None, prefixes: list[str], fields: dict) -> Envelope:
        arrived = received or datetime.now(timezone.utc)
        received = arrived.replace(microsecond=0)
        # the microsecond after the second: ids (and so the queue and the page) keep the order messages arrived in
        named, second, iso = self._second
        if named != received or named.tzinfo is not received.tzinfo:  # formatted once a second, not for every message (25 µs)
            second, iso = folder_name(received), received.isoformat()
            self._second = (received, second, iso)
        entry_id = fields.pop("entry_id", None) or f"{second}-{arrived.microsecond:06d}{secrets.token_hex(3)}"
        with self._lock:
            folders = {prefix: self._allocate(prefix, second) for prefix in dict.fromkeys(prefixes)}
        return Envelope(entry_id, iso, folders, **{**fields, "recipients": tuple(fields.get("recipients", ()))})

    def _allocate(self, prefix: str, second: str) -> str:
        """The key folder for a prefix in a second (`YYYYmmdd-HHMMSS`): `-2`, `-3`, … for a second message in the same second."""
        n = self._folders_used.get((prefix, second), 0) + 1
        self._folders_used[(prefix, second)] = n
        if len(self._folders_used) > 10_000:  # seconds long past can no longer collide
            for old in sorted(self._folders_used, key=lambda k: k[1])[:5_000]:
                del self._folders_used[old]
        return numbered_folder(second, n)

    def _remember(self, envelope: Envelope) -> None:
        second = folder_name(envelope.received_at)
        for prefix, folder in envelope.folders.items():
            n = int(folder.rsplit("-", 1)[1]) if folder.count("-") == 2 else 1
            key = (prefix, second)
            self._folders_used[key] = max(self._folders_used.get(key, 0), n)

    # --- reading -------------------------------------------------------------

    def pending(self) -> list[str]:
        """Queued entry ids in arrival order."""
        return _ids(self.queue)

    def failed_ids(self) -> list[str]:
        return _ids(self.failed)

    def quarantined_ids(self) -> list[str]:
        return _ids(self.quarantine_dir)

    def envelope(self, entry_id: str, folder: Path | None = None) -> Envelope:
        with open((folder or self.queue) / (entry_id + SUFFIX), "rb") as f:
            return _envelope(f.readline())

    def entry_path(self, entry_id: str) -> Path:
        return self.queue / (entry_id + SUFFIX)

    def entry(self, entry_id: str) -> Entry:
        """A queued entry's envelope and state, for one attempt (FileNotFoundError once it is no longer queued)."""
        path = self.entry_path(entry_id)
        with open(path, "rb") as f:
            header = f.readline()
            state = self.read_state(entry_id)
            if state.authentication is None:
                state.authentication = _recorded_authentication(f.fileno())
        return Entry(_envelope(header), state, path, len(header))

    def message(self, entry: Entry) -> bytes:
        """The entry's raw message."""
        return read_body(entry.path, entry.body_at)

    def read_state(self, entry_id: str) -> EntryState:
        try:
            return EntryState(**json.loads((self.state / f"{entry_id}.json").read_text()))
        except (OSError, ValueError, TypeError):
            return EntryState()

    # --- finishing -----------------------------------------------------------

    def record_authentication(self, entry: Entry, authentication: dict) -> None:
        """The final results, kept with the entry (they move with its file: to failed/ and back) so that a replay stores
        the same inbox copy: as an extended attribute of its file (one call, where a state file costs making a file:
        0.4 ms of CPU in this machine's /tmp), else, on a filesystem without them or past their size, in its state file."""
        entry.state.authentication = authentication
        try:
            os.setxattr(entry.path, AUTHENTICATION, json.dumps(authentication).encode())
        except OSError:
            self._write_state(entry.id, entry.state)

    def record_inbox_header(self, entry: Entry, header: str) -> None:
        entry.state.inbox_header = header
        self._write_state(entry.id, entry.state)

    def record_attempt(self, entry: Entry, error: str, crashed: bool = False, step: str = "", stored: list[dict] = ()) -> EntryState:
        """A failed attempt: counted, and kept with when, what it was doing (`step`), its error and what it had stored."""
        state = entry.state
        state.attempts += 1
        state.crashes += crashed
        state.last_error = error
        state.tries.append({"at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(), "step": step, "error": error,
                            "stored": list(stored)})
        self._write_state(entry.id, state)
        return state

    def done(self, *entry_ids: str) -> None:
        """Every object of these entries is stored: forget them.

        No fsync: their objects were flushed to disk before this, and a
        removal that a power cut undoes only means the entry is processed
        again, which finds its objects stored (the same keys, the same bytes)
        and writes nothing new.
        """
        for entry_id in entry_ids:
            (self.queue / (entry_id + SUFFIX)).unlink(missing_ok=True)
            (self.state / f"{entry_id}.json").unlink(missing_ok=True)

    def fail(self, entry: Entry, reason: str) -> None:
        """Keep the entry in failed/ with the reason, for `esmail spool retry`."""
        entry_id = entry.id
        entry.state.reason = reason
        self._write_state(entry_id, entry.state)
        (self.failed / f"{entry_id}.reason").write_text(reason + "\n")
        os.rename(self.queue / (entry_id + SUFFIX), self.failed / (entry_id + SUFFIX))
        fsync_dir(self.failed)

    def retry(self, entry_ids: list[str] | None = None, by: str = "") -> list[str]:
        """Move failed entries (all, or those named) back to the queue, for `by`; return the ids moved."""
        moved = []
        for entry_id in entry_ids or self.failed_ids():
            source = self.failed / (entry_id + SUFFIX)
            if not source.exists():
                raise KeyError(entry_id)
            state = self.read_state(entry_id)  # a new count of attempts; the inbox copy's results stay (on the file too), for one copy
            self._write_state(entry_id, EntryState(authentication=state.authentication, inbox_header=state.inbox_header, by=by))
            (self.failed / f"{entry_id}.reason").unlink(missing_ok=True)
            os.rename(source, self.queue / (entry_id + SUFFIX))
            moved.append(entry_id)
        fsync_dir(self.queue)
        return moved

    def quarantine(self, entry: Entry, raw: bytes, held: dict[str, str], authentication: str) -> None:
        """Keep a copy of the entry (its raw message `raw`) in quarantine/ for the prefixes a feed refused, with the
        reasons and the results they were judged by. Named by the entry's id: a replay after a crash writes the same file."""
        entry_id = entry.id
        envelope = replace(entry.envelope, folders={p: f for p, f in entry.envelope.folders.items() if p in held}, held=held,
                           authentication=authentication)
        tmp = self.tmp / f"{entry_id}.quarantine"
        try:
            write_synced(tmp, _encoded(envelope), b"\n", raw)
            os.replace(tmp, self.quarantine_dir / (entry_id + SUFFIX))
            fsync_dir(self.quarantine_dir)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self.failure(exc) from exc

    def release(self, entry_ids: list[str], by: str = "") -> list[Envelope]:
        """Move quarantined entries back to the queue, for `by`, to be processed as if they had passed; their envelopes.
        KeyError for an id not in quarantine/; FileExistsError while the original is still queued."""
        for entry_id in entry_ids:
            if not (self.quarantine_dir / (entry_id + SUFFIX)).exists():
                raise KeyError(entry_id)
            if self.entry_path(entry_id).exists():
                raise FileExistsError(entry_id)
        released = [self.envelope(entry_id, self.quarantine_dir) for entry_id in entry_ids]
        for entry_id in entry_ids:
            self._write_state(entry_id, EntryState(by=by))
            os.rename(self.quarantine_dir / (entry_id + SUFFIX), self.entry_path(entry_id))
        fsync_dir(self.queue)
        return released

    def held(self, entry_id: str) -> dict[str, str]:
        """prefix → reason for a quarantined entry; empty when it is not in quarantine/."""
        try:
            return self.envelope(entry_id, self.quarantine_dir).held
        except FileNotFoundError:
            return {}

    def drop_quarantined(self, older_than_days: float) -> list[Envelope]:
        """Delete quarantined entries older than `older_than_days` (their inbox copies stay); their envelopes."""
        cutoff = time.time() - older_than_days * 86400
        dropped = []
        for entry_id in self.quarantined_ids():
            path = self.quarantine_dir / (entry_id + SUFFIX)
            try:
                if path.stat().st_mtime < cutoff:
                    dropped.append(self.envelope(entry_id, self.quarantine_dir))
                    path.unlink()
            except (OSError, ValueError):
                continue
        return dropped

    def _write_state(self, entry_id: str, state: EntryState) -> None:
        tmp = self.tmp / f"{entry_id}.json"
        tmp.write_text(json.dumps(asdict(state)))
        os.replace(tmp, self.state / f"{entry_id}.json")


def _recorded_authentication(fd: int) -> dict | None:
    """The results `Spool.record_authentication` kept on an entry's file, or None."""
    try:
        return json.loads(os.getxattr(fd, AUTHENTICATION))
    except (OSError, ValueError):  # none recorded (ENODATA), or no extended attributes here
        return None


def user_name() -> str:
    """Who esmail runs as, for messages about files it cannot make or read."""
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _encoded(envelope: Envelope) -> bytes:
    """The envelope as one line of JSON; empty fields are left out (their defaults come back on reading)."""
    return json.dumps({k: v for k, v in vars(envelope).items() if v or k in _REQUIRED}, separators=(",", ":")).encode()


_REQUIRED = ("id", "received", "folders")


def _ids(folder: Path) -> list[str]:
    """The entry ids in a folder, oldest first (ids start with the received time)."""
    return sorted(p.name[: -len(SUFFIX)] for p in folder.iterdir() if p.name.endswith(SUFFIX))


def _envelope(header: bytes) -> Envelope:
    fields_ = json.loads(header)
    fields_["recipients"] = tuple(fields_.get("recipients", ()))
    return Envelope(**fields_)
