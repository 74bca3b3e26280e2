"""Feed policy (DESIGN §12, §13): may this message write to this prefix, and has the feed gone quiet?

Decided per prefix, after the 250, from the message's header From and its
authentication. A refusal quarantines the message for that prefix (the
worker keeps it in the spool's quarantine/ for a human to release); DNS
trouble that could change the answer is a temporary failure, never a refusal.
A feed that expects mail every so often is late after 1.5 times that.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from esmail.config import FeedConfig
from esmail.errors import TemporaryFailure

if TYPE_CHECKING:
    from esmail.authentication import Authentication

LATE_AFTER = 1.5  # × expected_every
SENDER = "sender"  # the kinds of refusal, as /metrics counts them
UNAUTHENTICATED = "unauthenticated"
HEADER_CHANGED = "header_changed"  # on_header_change = "hold" (DESIGN §16)


@dataclass(frozen=True)
class Refusal:
    kind: str  # SENDER, UNAUTHENTICATED or HEADER_CHANGED
    reason: str  # for people: the spool list, the log, the page

    def __str__(self) -> str:
        return self.reason


def judge(feed: FeedConfig | None, auth: Authentication) -> Refusal | None:
    """Why the message may not write to the feed, or None when it may; TemporaryFailure when DNS trouble leaves it open."""
    if feed is None:
        return None
    sender = auth.from_address or "(not exactly one From address)"
    if feed.senders and not any(fnmatchcase(auth.from_address, glob) for glob in feed.senders):
        return Refusal(SENDER, f"From {sender} is not among the senders of the feed {feed.prefix}")
    if feed.authenticated and not auth.authenticated:
        if auth.trouble:
            raise TemporaryFailure(f"cannot authenticate the sender {sender} now: {auth.trouble}")
        return Refusal(UNAUTHENTICATED, f"From {sender} is not authenticated (no passing SPF or DKIM aligned with its domain)")
    return None


def late(feed: FeedConfig, last_message: float | None, first_declared: float | None, now: float) -> bool:
    """Whether nothing arrived for 1.5 × `expected_every`: since the last message, or, before the first, since
    the feed was first declared (times in seconds since the epoch)."""
    since = last_message if last_message is not None else first_declared
    return feed.expected_every is not None and since is not None and now - since > LATE_AFTER * feed.expected_every
