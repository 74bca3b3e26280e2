"""The errors esmail raises, named for what the caller must do.

    EsmailError
    ├── ConfigError        the operator must fix the configuration (exit 2)
    ├── Unprocessable      this file cannot be converted: store the original in unprocessable
    ├── TemporaryFailure   try again later (storage outage, full disk); nothing is lost meanwhile
    │   ├── ConversionCrashed  a conversion process died: retried alone, then given up on
    │   └── StorageFailure     the store failed: retried when it works again (esmail.outage)
    │       └── NeedsFixing    will not pass by itself (a folder esmail may not write): retried, and a human told
    ├── CannotListen       a configured port cannot be bound (in use, or below 1024 without the capability)
    └── ActionRefused      a retry or release asked for an entry that is not (or no longer) where it needs to be
"""

import errno
import os


class EsmailError(Exception):
    """Base of every error esmail raises on purpose."""


class ConfigError(EsmailError):
    """The configuration is wrong; the message names the file, the key and the fix."""


class Unprocessable(EsmailError):
    """A file cannot be converted; the reason says why, in words an operator understands."""


class TemporaryFailure(EsmailError):
    """Storage or the spool failed in a way that may pass; the work must be retried."""


class ActionRefused(EsmailError):
    """A person's retry or release cannot be done: the entry is not where the action needs it (409 on the page)."""


class ConversionCrashed(TemporaryFailure):
    """The process converting a message died (out of memory, a crash in a native library)."""


class StorageFailure(TemporaryFailure):
    """The store refused a write or could not be reached."""


class NeedsFixing(StorageFailure):
    """Storage refuses esmail itself (a permission): retried like any outage, but logged as an error for a human."""


class CannotListen(EsmailError):
    """`esmail serve` cannot open a configured port; the message names the key and what to look at."""

    def __init__(self, key: str, address, exc: OSError):
        self.errno, self.strerror = exc.errno, exc.strerror
        reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))  # asyncio's strerror repeats the address
        super().__init__(f"cannot listen on {address} ({key}): {reason}{_hint(address.port, exc.errno)}")


def _hint(port: int, error: int | None) -> str:
    if error == errno.EADDRINUSE:
        mta = ("; on port 25 usually the system's own mail server (exim4, postfix: systemctl disable --now exim4), "
               "or an esmail already running") if port == 25 else ""
        return f" (another program holds it: ss -ltnp 'sport = :{port}' shows which{mta})"
    if error == errno.EACCES and port < 1024:
        return " (ports below 1024 need root or CAP_NET_BIND_SERVICE, which the systemd unit grants)"
    return ""
