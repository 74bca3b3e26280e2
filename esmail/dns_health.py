"""Whether the resolver answers now (DESIGN §12, §13): remembered since when it does not.

A message's lookups that get no answer make the daemon ask the resolver
about one name (a probe); when the probe gets no answer either, DNS is down
from that message's trouble on, and is probed again every PROBE_EVERY
seconds until it answers. While it is down, mail that no feed needs
authenticated is not looked up at all: it is stored at once, its
Authentication-Results saying `temperror`. Mail to a feed that needs an
authenticated sender is still looked up (the answer is its verdict), but for
DOWN_TIMEOUT at most, not the whole `[dns] timeout`: it stays queued and is
retried, and the first of its lookups to get an answer says DNS is back.
The page and /healthz say since when.
"""

from __future__ import annotations

import asyncio
import logging
import time

from dataclasses import replace

from esmail.config import Config, DnsConfig
from esmail.resolver import DnsTimeout, DnsTrouble, Lookups, nameservers

log = logging.getLogger(__name__)

PROBE_EVERY = 5.0  # seconds between probes while DNS does not answer
DOWN_TIMEOUT = 1.0  # seconds the lookups of a message that needs them may take while DNS does not answer


def probe_name(config: Config) -> str:
    """A name worth asking the resolver about: a feed sender's domain, else a feed domain of ours."""
    for feed in config.feeds:
        for glob in feed.senders:
            domain = glob.rpartition("@")[2].removeprefix("*.")
            if not any(c in domain for c in "*?[]"):
                return domain
    return config.smtp.domains[0] if config.smtp.domains else "example.org"


class DnsHealth:
    """Owned by the daemon's event loop; `watch()` runs the probes."""

    def __init__(self, config: DnsConfig, name: str):
        self.config = config
        self.name = name
        self.failing_since: float | None = None  # while DNS does not answer: when the trouble began
        self.why = ""
        self._trouble_at: float | None = None  # a message's trouble, not yet probed
        self._look = asyncio.Event()

    @property
    def down(self) -> str:
        """Why lookups are not worth making now ("" while DNS answers): for the Authentication-Results' temperror."""
        return self.problem() or ""

    def problem(self) -> str | None:
        """`DNS: no answer from 127.0.0.1:53 since 10:02 UTC`, or None while DNS answers."""
        if self.failing_since is None:
            return None
        started = time.gmtime(self.failing_since)
        when = time.strftime("%H:%M UTC" if started[:3] == time.gmtime()[:3] else "%Y-%m-%d %H:%M UTC", started)
        return f"DNS: {self.why} since {when}"

    def for_message(self, needs_answer: bool) -> tuple[DnsConfig, str]:
        """The lookups' settings for a message, and why it is not to look anything up ("": it is): while DNS is down,
        one whose feed needs the answer gets DOWN_TIMEOUT, any other none at all."""
        if self.failing_since is None:
            return self.config, ""
        if needs_answer:
            return replace(self.config, timeout=min(self.config.timeout, DOWN_TIMEOUT)), ""
        return self.config, self.down

    def heard(self, trouble: str) -> None:
        """What a message's own lookups met: trouble ("": none) has DNS probed now; an answer means it is back."""
        if not trouble:
            self._answered()
        elif self.failing_since is None:
            self._trouble_at = self._trouble_at or time.time()
            self._look.set()

    async def watch(self) -> None:
        """Probe at start, on a message's trouble, and every PROBE_EVERY seconds while DNS does not answer."""
        while True:
            try:
                await asyncio.to_thread(Lookups(self.config).query, self.name, "TXT")
            except DnsTrouble as exc:
                self._failed(exc)
            else:
                self._answered()
            self._look.clear()
            if self.failing_since is not None:
                await asyncio.sleep(PROBE_EVERY)
            else:
                await self._look.wait()

    def _failed(self, exc: DnsTrouble) -> None:
        servers = nameservers(self.config)
        why = f"no answer from {servers}" if isinstance(exc, DnsTimeout) else f"{servers} does not answer lookups ({exc})"
        if self.failing_since is None:
            self.failing_since = self._trouble_at or time.time()
            log.warning("DNS: %s; until it answers, mail to feeds that need no authenticated sender is stored without "
                        "looking it up (temperror in its Authentication-Results); feeds that need one keep theirs queued, "
                        "looked up for %g s a try", why, min(self.config.timeout, DOWN_TIMEOUT))
        self.why = why
        self._trouble_at = None

    def _answered(self) -> None:
        self._trouble_at = None
        if self.failing_since is not None:
            log.info("DNS answers again after %.0f s", time.time() - self.failing_since)
            self.failing_since = None
