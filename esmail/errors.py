"""The errors esmail raises, named for what the caller must do.

    EsmailError
    ├── ConfigError        the operator must fix the configuration (exit 2)
    ├── Unprocessable      this file cannot be converted: store the original in unprocessable
    └── TemporaryFailure   try again later (storage outage, full disk); nothing is lost meanwhile
"""


class EsmailError(Exception):
    """Base of every error esmail raises on purpose."""


class ConfigError(EsmailError):
    """The configuration is wrong; the message names the file, the key and the fix."""


class Unprocessable(EsmailError):
    """A file cannot be converted; the reason says why, in words an operator understands."""


class TemporaryFailure(EsmailError):
    """Storage or the spool failed in a way that may pass; the work must be retried."""
