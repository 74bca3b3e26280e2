"""The history (DESIGN §13, §17): what arrived and what came of it — for the data team's page, not for safekeeping.

One interface (`base.History`), two backends side by side, as the store has:

    sqlite.py    {spool}/history.sqlite: one host, no database server (the embedded default)
    postgres.py  a PostgreSQL database every host shares ([history] url), fed through journal.py

The worker writes, the page reads; the worker never waits on a database.
The spool and the buckets are the truth: a history that cannot be written
loses no mail.

    messages          one row per message: its host, envelope, headers, its state now
    message_prefixes  one row per message and prefix: state, CSVs and unprocessable files
    outcomes          every outcome of a message, in order (a failure, then its retry): who asked for it, each failed try
    files             every object each outcome stored: name, kind, rule, bucket, key, bytes, reason, a CSV's check (§16)
    attachments       the files a message carried, as sent (before any conversion)
    prefixes          per prefix: first declared as a [[feed]], last message, last CSV
"""

from __future__ import annotations

import socket

from esmail.config import Config
from esmail.history.base import (DROPPED, FAILED, FILES, PAGE, QUARANTINED, QUEUED, RELEASED, RETRIED, STATES, STORED, URGENCY,
                                 WAITING, Attached, FileRow, Filters, Finished, History, Record, now_text, since, timestamp, urgency)
from esmail.history.sqlite import SqliteHistory


def host_name(config: Config) -> str:
    """The name each history row carries: `[smtp] hostname`, else this host's own name (no DNS lookup)."""
    return config.smtp.hostname or socket.gethostname()


def open_history(config: Config) -> History:
    """The backend the configuration names; call `close()` when done (it writes what waits)."""
    if config.history.url:
        from esmail.history.postgres import PostgresHistory

        password = config.secrets.get(config.history.password_env) if config.history.password_env else None
        return PostgresHistory(config.history.url, password, config.spool.path, host_name(config))
    return SqliteHistory(config.spool.path, host_name(config))


def probe(config: Config) -> str:
    """For check-config: where the history is and what it holds; raises when it cannot be read."""
    if config.history.url:
        from esmail.history.postgres import probe as probe_postgres

        password = config.secrets.get(config.history.password_env) if config.history.password_env else None
        return probe_postgres(config.history.url, password)
    from esmail.history.sqlite import probe as probe_sqlite

    return probe_sqlite(config.spool.path)


__all__ = ["DROPPED", "FAILED", "FILES", "PAGE", "QUARANTINED", "QUEUED", "RELEASED", "RETRIED", "STATES", "STORED", "URGENCY",
           "WAITING", "Attached", "FileRow", "Filters", "Finished", "History", "Record", "SqliteHistory", "host_name", "now_text",
           "open_history", "probe", "since", "timestamp", "urgency"]
