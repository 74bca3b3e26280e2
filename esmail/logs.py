"""Log output: one human-readable line per event by default, or one JSON object per line for log shippers.

Events that matter to an operator carry their fields as `extra=` (spool id,
client, sender, prefixes, size, outcome, seconds; bucket, key, bytes), which
the JSON format writes as keys of their own. WARNING means a human may
need to look; ERROR means something failed for good or needs fixing.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

FIELDS = ("spool_id", "client", "sender", "prefixes", "size", "outcome", "seconds", "objects", "bucket", "key", "bytes", "rule", "link", "reason", "authentication")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({name: getattr(record, name) for name in FIELDS if hasattr(record, name)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


_settings = ("info", "text")


def counted(n: int, singular: str, plural: str = "") -> str:
    """`1 entry`, `2 entries`: a count as a line says it."""
    return f"{n:,} {singular if n == 1 else plural or singular + 's'}"


def current() -> tuple[str, str]:
    """The level and format `setup` was given last (for processes the daemon starts)."""
    return _settings


def setup(level: str, format: str) -> None:
    global _settings
    _settings = (level, format)
    handler = logging.StreamHandler(sys.stderr)
    if format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("esmail: %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    if level != "debug":  # aiosmtpd logs every command at INFO
        logging.getLogger("mail.log").setLevel(logging.WARNING)
