"""Problems a human should see, sent to Rollbar when `ROLLBAR_ACCESS_TOKEN` is set.

Reported: a file that went to unprocessable, a failed link download, a
message that exhausted its retries, an unexpected exception. Each report
carries names and keys (prefix, key, spool id, link), never a message's
body or a secret: local variables are not collected, since a frame may hold
a raw message. Without a token nothing is sent and start-up says so once.
"""

from __future__ import annotations

import logging
import sys

from esmail.config import Config

log = logging.getLogger(__name__)

_enabled = False
rollbar = None  # the module, imported only when there is a token (it brings requests: a fifth of a second)


def setup(config: Config) -> bool:
    """Report to Rollbar when there is a token; whether there is (the caller says so, once per daemon)."""
    global _enabled, rollbar
    token = config.secrets.get("ROLLBAR_ACCESS_TOKEN")
    if not token:
        return False
    import rollbar

    rollbar.init(token, environment=config.stage, endpoint=config.rollbar.endpoint, handler="thread",
                 locals={"enabled": False}, capture_ip=False, include_request_body=False, log_payload_on_error=False,
                 suppress_reinit_warning=True)
    _enabled = True
    return True


def problem(message: str, level: str = "error", **details: str) -> None:
    """A known kind of failure: `message` groups them in Rollbar, `details` say which."""
    if _enabled:
        rollbar.report_message(message, level, extra_data=details)


def exception(message: str, error: BaseException | None = None, **details: str) -> None:
    """`error`, or else the exception being handled (in an `except` block)."""
    if _enabled:
        exc_info = (type(error), error, error.__traceback__) if error is not None else sys.exc_info()
        rollbar.report_exc_info(exc_info, extra_data={"context": message, **details})


def flush() -> None:
    """Wait for reports still being sent (before the process exits)."""
    if _enabled:
        rollbar.wait()
