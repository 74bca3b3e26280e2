"""DNS for mail authentication: dnspython, pointed at `[dns] nameservers`, with one time budget per message.

"No such record" and "no answer now" must never be confused: the first is
an answer (no SPF policy, no DKIM key), the second is a temporary error
(DNS trouble of ours must not make a sender's mail fail). NXDOMAIN and an
empty answer come back as no records; SERVFAIL, REFUSED, timeouts and an
exhausted budget raise `DnsTrouble`.
"""

from __future__ import annotations

import functools
import math
import time

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from esmail.config import DnsConfig


class DnsTrouble(Exception):
    """A lookup got no answer (SERVFAIL, REFUSED, timeout, the budget spent): try again later."""


class DnsTimeout(DnsTrouble):
    """No answer at all within the budget: the resolver is away (or unreachable)."""


CACHED = 10_000  # answers kept per resolver configuration


@functools.lru_cache(maxsize=8)
def _resolver(config: DnsConfig) -> tuple[dns.resolver.Resolver, dict]:
    """The resolver of a conversion process, and its answers: (name, type) → (when they expire, the records).
    A feed's sender domain is asked about again only when its records' TTL runs out, not for every message
    (three or four lookups each). The cache is ours, not dnspython's: a hit is a dict lookup (dnspython's
    costs ~90 µs of Python), and each answer's expiry is known, for `Lookups.expires`."""
    if not config.nameservers:
        resolver = dns.resolver.Resolver()  # /etc/resolv.conf
    else:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in config.nameservers]
    return resolver, {}


def nameservers(config: DnsConfig) -> str:
    """The resolvers asked, for people: `127.0.0.1:53`, or the system's."""
    if config.nameservers:
        return ", ".join(map(str, config.nameservers))
    return ", ".join(f"{server}:53" for server in _resolver(config)[0].nameservers) + " (the system resolver)"


class Lookups:
    """The lookups of one message: every query shares `[dns] timeout`. `down`: DNS is known not to answer now
    (dns_health): every query is DnsTrouble at once, saying so, rather than a wait. `expires`: when the first of
    the answers used since it was last set to infinity expires (a result worked out from them holds until then)."""

    def __init__(self, config: DnsConfig, down: str = ""):
        self.config = config
        self.resolver, self.answers = _resolver(config)
        self.deadline = time.monotonic() + config.timeout
        self.down = down
        self.expires = math.inf

    def query(self, name: str, rdtype: str) -> list:
        """The records of a type at a name ([] when there are none); DnsTrouble when DNS does not answer."""
        if self.down:
            raise DnsTrouble(f"{name} {rdtype}: not asked ({self.down})")
        key = (name.lower(), rdtype)
        now = time.time()
        cached = self.answers.get(key)
        if cached is None or cached[0] <= now:
            cached = self.answers[key] = self._ask(name, rdtype, now)
            if len(self.answers) > CACHED:
                self._forget(now)
        self.expires = min(self.expires, cached[0])
        return cached[1]

    def _ask(self, name: str, rdtype: str, now: float) -> tuple[float, list]:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DnsTimeout(f"{name} {rdtype}: the [dns] timeout for this message is spent")
        try:
            answer = self.resolver.resolve(name, rdtype, lifetime=remaining, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:  # no such name: kept for the negative TTL (RFC 2308), as dnspython's cache would
            return now + _negative_ttl(exc), []
        except dns.exception.Timeout:
            raise DnsTimeout(f"{name} {rdtype}: no answer within the [dns] timeout") from None
        except dns.exception.DNSException as exc:  # NoNameservers (SERVFAIL, REFUSED), YXDOMAIN, bad names
            raise DnsTrouble(f"{name} {rdtype}: {exc}") from None
        return answer.expiration, list(answer)  # no records (NODATA): the same, for its negative TTL

    def _forget(self, now: float) -> None:
        """Room in a full cache: the expired answers go, and if that is not enough, all of them."""
        for key, (expires, _) in list(self.answers.items()):  # a copy: conversions in threads share the answers
            if expires <= now:
                self.answers.pop(key, None)
        if len(self.answers) > CACHED:
            self.answers.clear()

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record at a name, its strings joined."""
        return [b"".join(record.strings) for record in self.query(name, "TXT")]

    def dkim_key(self, name: bytes | str, timeout: float = 0) -> bytes | None:
        """dkimpy's `dnsfunc`: the key record, or None when there is none. Its own function reads SERVFAIL
        as "no key" (a false dkim=fail); this one raises DnsTrouble, which dkimpy lets through."""
        name = name.decode() if isinstance(name, bytes) else name
        records = self.txt(name.rstrip("."))
        return records[0] if records else None

    def spf(self, name: str, qtype: str, strict: bool = True, timeout: float = 0) -> list:
        """pyspf's `DNSLookup`: ((name, type), value) pairs, as its own dnspython function gives them."""
        import spf

        try:
            records = self.query(name, qtype)
        except DnsTrouble as exc:
            raise spf.TempError(f"DNS {exc}") from None
        if qtype in ("A", "AAAA"):
            return [((name, qtype), r.address) for r in records]
        if qtype == "MX":
            return [((name, qtype), (r.preference, r.exchange)) for r in records]
        if qtype == "PTR":
            return [((name, qtype), r.target.to_text(True)) for r in records]
        if qtype in ("TXT", "SPF"):
            return [((name, qtype), r.strings) for r in records]
        return []


def _negative_ttl(exc: dns.resolver.NXDOMAIN) -> float:
    try:
        return min(response.resolve_chaining().minimum_ttl for response in exc.responses().values())
    except Exception:  # a response dnspython cannot follow (an answer with NXDOMAIN): not kept
        return 0


def probe(config: DnsConfig, name: str) -> str:
    """`esmail check-config`: ask the configured resolver about one name; raise DnsTrouble if it does not answer."""
    started = time.monotonic()
    records = Lookups(config).query(name, "TXT")
    where = ", ".join(map(str, config.nameservers)) or "the system resolver"
    return f"{where} answered for {name} in {(time.monotonic() - started) * 1000:.0f} ms ({len(records)} TXT records)"
