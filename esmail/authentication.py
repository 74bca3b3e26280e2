"""Who sent a message, as far as DNS can tell (DESIGN §12): SPF, DKIM and DMARC, and the Authentication-Results header.

The field's libraries do the checking: pyspf evaluates SPF (RFC 7208),
dkimpy verifies each DKIM signature (RFC 6376), the public suffix list
(publicsuffixlist) gives organisational domains, authres writes and reads
RFC 8601 headers, and every lookup goes through `resolver.Lookups` (one
budget per message; DNS trouble raises rather than reads as "no record").
What is ours is DMARC's small part (RFC 7489): find the policy record and
test alignment. "Authenticated" is DMARC's pass condition — the From domain
aligned with a passing SPF or DKIM identity — whether or not the domain
publishes a record.

Runs in a conversion process (or a thread): a 40 MB body is hashed here.
Within the TTL of the DNS answers they were worked out from, an SPF result
and a DMARC record are remembered (a feed sends from the same hosts all
day): they are functions of those answers and of the message's envelope.
"""

from __future__ import annotations

import functools
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path

import authres
import authres.dmarc
import dkim
import spf
from publicsuffixlist import PublicSuffixList

from esmail import mail
from esmail.config import DnsConfig
from esmail.keys import domain_of
from esmail.resolver import DnsTrouble, Lookups
from esmail.spool import read_entry

HEADER = "Authentication-Results"

_quiet = logging.getLogger("esmail.dkimpy")  # dkimpy logs every bad signature as an ERROR: the header says it
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False

# pyspf looks records up through its module's DNSLookup; each thread points it at its message's Lookups
_current = threading.local()
spf.DNSLookup = lambda name, qtype, strict=True, timeout=None: _current.lookups.spf(name, qtype, strict, timeout)


@dataclass(frozen=True)
class Request:
    """What the worker knows of a message besides its bytes."""

    dns: DnsConfig
    authserv_id: str  # [smtp] hostname; empty: this host's name
    client: str = ""  # the SMTP client's IP address; empty: no SMTP session (IMAP, ingest)
    helo: str = ""
    mail_from: str = ""
    trusted_authserv_id: str = ""  # IMAP: the provider whose SPF and DMARC results are believed
    dns_down: str = ""  # DNS is known not to answer now (dns_health): look nothing up, say temperror


@dataclass(frozen=True)
class Authentication:
    header: str  # the whole Authentication-Results header field, folded, without its line end
    from_address: str  # the header From address, lower-case; "" unless there is exactly one
    authenticated: bool  # DMARC's pass condition
    trouble: str = ""  # why `authenticated` may change on a later try (DNS trouble); "" when final
    dns_trouble: str = ""  # every lookup that got no answer, whether or not it changed the verdict

    @property
    def summary(self) -> str:
        """The results on one line, for the log: `spf=pass smtp.mailfrom=…; dkim=none; dmarc=…`."""
        return "; ".join(clause.strip() for clause in self.header.split(";")[1:])

    def prepended(self, raw: bytes) -> bytes:
        """The message with this header on top, in the message's own line ends."""
        first = raw.find(b"\n")
        end = "\n" if first == 0 or (first > 0 and raw[first - 1] != 0x0D) else "\r\n"
        return (self.header.replace("\r\n", end) + end).encode() + raw


@functools.cache
def _suffixes() -> PublicSuffixList:
    return PublicSuffixList()


@functools.lru_cache(maxsize=4096)
def organisational_domain(domain: str) -> str:
    """`reports.sheffield.gov.uk` → `sheffield.gov.uk` (RFC 7489 §3.2, with the public suffix list)."""
    return _suffixes().privatesuffix(domain) or domain


def aligned(identity: str, from_domain: str, strict: bool) -> bool:
    if strict:
        return identity == from_domain
    return organisational_domain(identity) == organisational_domain(from_domain)


def authenticate_entry(path: Path, request: Request) -> Authentication:
    """`authenticate` of a spool entry, read here (in a conversion process, like `conversion.convert_entry`)."""
    return authenticate(read_entry(path)[1], request)


def authenticate_and_convert(path: Path, request: Request, ascii_only: bool, link_patterns: tuple[str, ...], formats: dict | None = None):
    """`authenticate_entry`, then `conversion.convert` (each CSV checked with its prefixes' `formats`) of the same bytes
    in the same trip to the conversion pool (wasted only on a message every feed refuses); a conversion that raises
    gives None, for the worker's own call to meet the error."""
    from esmail.conversion import convert

    message = [read_entry(path)[1]]
    auth = authenticate(message[0], request)
    try:
        return auth, convert(message.pop(), ascii_only, link_patterns, formats)  # popped: convert drops the bytes when it is done with them
    except Exception:
        return auth, None


def authenticate(raw: bytes, request: Request) -> Authentication:
    lookups = Lookups(request.dns, request.dns_down)
    troubles: list[str] = []
    head = mail.head(raw)
    lines = _header_lines(head)
    from_address = _usual_from(head, lines)
    headers = mail.parse_headers(raw) if from_address is None or request.trusted_authserv_id else None
    if from_address is None:
        from_address = _single_from(headers)
    from_domain = domain_of(from_address) if from_address else ""
    results: list[authres.AuthenticationResult] = []

    spf_domain = ""
    provider = _provider_results(headers, request.trusted_authserv_id) if request.trusted_authserv_id else []
    if request.client:
        spf_result, spf_domain = _spf(lookups, request, troubles)
        identity = {"smtp_mailfrom": request.mail_from} if request.mail_from else {"smtp_helo": request.helo}
        results.append(authres.SPFAuthenticationResult(result=spf_result, **identity))
    for result in provider:
        if result.method == "spf":
            results.append(result)
            mailfrom = result._find_first_property("smtp", "mailfrom")
            if result.result == "pass" and mailfrom:
                spf_domain = domain_of(mailfrom.value)

    dkim_passed = []
    for result, domain, selector in _dkim(raw, lines, lookups, troubles):
        results.append(authres.DKIMAuthenticationResult(result=result, header_d=domain or None, header_s=selector or None))
        if result == "pass":
            dkim_passed.append(domain)

    provider_dmarc = [r for r in provider if r.method == "dmarc" and r.result == "pass"
                      and (p := r._find_first_property("header", "from")) and p.value.lower() == from_domain]
    if not from_domain:
        results.append(authres.dmarc.DMARCAuthenticationResult(result="permerror", reason="not exactly one From address"))
        authenticated = False
    else:
        dmarc_result, policy, authenticated = _dmarc(lookups, from_domain, spf_domain, dkim_passed, troubles)
        authenticated = authenticated or bool(provider_dmarc)
        if provider_dmarc:
            dmarc_result = "pass"
        results.append(authres.dmarc.DMARCAuthenticationResult(result=dmarc_result, header_from=from_domain, policy=policy or None))

    authserv_id = request.authserv_id or _host_name()
    header = f"{HEADER}: {authserv_id};" + ";".join(f"\r\n\t{result}" for result in results)
    return Authentication(header, from_address, authenticated, "; ".join(troubles) if not authenticated else "", "; ".join(troubles))


@functools.cache
def _host_name() -> str:
    return socket.getfqdn()


def _header_lines(head: bytes) -> list | None:
    """dkimpy's reading of the header lines, [name, value] each, for DKIM, and for the usual From without the email
    package's parser (0.1 ms); None when dkimpy cannot read them."""
    try:
        return dkim.rfc822_parse(head)[0]
    except Exception:  # not a message dkimpy can read at all
        return None


def _usual_from(head: bytes, lines: list | None) -> str | None:
    """`_single_from` of the usual header (one From, on one line, in a usual form), read from dkimpy's header lines
    where they are the email package's too (no bare CR, no mbox `From ` line: then each reads the same header lines);
    None for any other: `_single_from` decides."""
    if lines is None or head.count(b"\r") != head.count(b"\r\n") or head.startswith(b"From ") or b"\nFrom " in head:
        return None
    found = [value for name, value in lines if name.lower() == b"from"]
    if len(found) != 1 or found[0].count(b"\n") != 1 or not found[0].isascii():
        return None
    plain = mail.plain_sender(found[0].decode())
    return plain[1].lower() if plain else None


def _single_from(headers) -> str:
    raw = [value for name, value in headers.raw_items() if name.lower() == "from"]
    if len(raw) == 1 and (plain := mail.plain_sender(raw[0])):  # the usual From, without the email package's parser (0.5 ms)
        return plain[1].lower()
    try:
        values = [str(v) for v in headers.get_all("From", [])]
    except Exception:  # a header too broken to parse: no From
        return ""
    addresses = [address for _, address in getaddresses(values) if "@" in address]
    return addresses[0].lower() if len(values) == 1 and len(addresses) == 1 else ""


def _spf(lookups: Lookups, request: Request, troubles: list[str]) -> tuple[str, str]:
    """SPF of the MAIL FROM domain (the HELO name for a null sender): (result, the domain it vouches for when it passes)."""
    key = (request.dns, request.client, request.mail_from, request.helo)
    result = _remembered(_spf_results, key, lookups, lambda: _check_spf(lookups, request, troubles))
    domain = domain_of(request.mail_from) if request.mail_from else request.helo.lower()
    return result, domain if result == "pass" else ""


def _check_spf(lookups: Lookups, request: Request, troubles: list[str]) -> str:
    """pyspf's result; a temperror (DNS trouble) raises _NotFinal after saying why in `troubles`."""
    _current.lookups = lookups
    try:
        result, explanation = spf.check2(i=request.client, s=request.mail_from, h=request.helo or "unknown", querytime=0)
    finally:
        _current.lookups = None
    if result == "temperror":
        troubles.append(f"SPF: {explanation}")
        raise _NotFinal(result)
    return result


class _NotFinal(Exception):
    """A result not to remember (DNS trouble): `args[0]` is the result."""


REMEMBERED = 10_000  # results kept in each cache of a conversion process
_spf_results: dict[tuple, tuple[float, str]] = {}  # (dns config, client IP, MAIL FROM, HELO) → (until, SPF result)
_dmarc_records: dict[tuple, tuple[float, dict[str, str]]] = {}  # (dns config, From domain) → (until, its DMARC record's tags)


def _remembered(cache: dict, key: tuple, lookups: Lookups, work_out):
    """`work_out()`, remembered under `key` until the first DNS answer it used expires: within every answer's TTL
    the same lookups give the same answers, so the result is the same (pyspf's reads nothing else but its arguments).
    A `_NotFinal` result is returned as it is, not remembered; DnsTrouble is raised, not remembered."""
    now = time.time()
    hit = cache.get(key) if not lookups.down else None  # DNS known down: nothing looked up, nothing taken from before
    if hit is not None and hit[0] > now:
        lookups.expires = min(lookups.expires, hit[0])
        return hit[1]
    outer, lookups.expires = lookups.expires, math.inf
    try:
        value = work_out()
    except _NotFinal as exc:
        return exc.args[0]
    finally:
        until, lookups.expires = lookups.expires, min(outer, lookups.expires)
    if until > now:
        if len(cache) >= REMEMBERED:
            cache.clear()
        cache[key] = (until, value)
    return value


def _dkim(raw: bytes, lines: list | None, lookups: Lookups, troubles: list[str]) -> list[tuple[str, str, str]]:
    """(result, d=, s=) for every DKIM-Signature; one `none` when there is none (RFC 8601: unsigned is not a failure).
    `lines`: dkimpy's reading of the header lines alone (None: it cannot read them), all it reads of an unsigned message."""
    if lines is None:
        return [("permerror", "", "")]
    count = sum(1 for name, _ in lines if name.lower() == b"dkim-signature")
    if not count:
        return [("none", "", "")]
    verifier = dkim.DKIM(raw, logger=_quiet)
    found = []
    for index in range(count):
        verifier.domain = verifier.selector = None
        try:
            result = "pass" if verifier.verify(idx=index, dnsfunc=lookups.dkim_key) else "fail"
        except DnsTrouble as exc:
            troubles.append(f"DKIM: {exc}")
            result = "temperror"
        except dkim.ValidationError:  # the body hash does not match, the signature expired, …
            result = "fail"
        except Exception:  # a malformed signature or key (dkim.DKIMException), or what it makes the parser raise
            result = "permerror"
        domain, selector = (value.decode(errors="replace").lower() if value else "" for value in (verifier.domain, verifier.selector))
        found.append((result, domain, selector))
    return found


def _dmarc(lookups: Lookups, from_domain: str, spf_domain: str, dkim_passed: list[str], troubles: list[str]) -> tuple[str, str, bool]:
    """(dmarc result, the policy, authenticated) for the From domain.

    An exact match is aligned whatever the record says, so the record is
    needed only when just a relaxed (same organisational domain) match exists.
    """
    identities = [d for d in (*dkim_passed, spf_domain) if d]
    try:
        record = _dmarc_record(lookups, from_domain)
    except DnsTrouble as exc:
        exact = from_domain in identities
        if not exact:
            troubles.append(f"DMARC: {exc}")
        return "temperror", "", exact
    strict_dkim = record.get("adkim") == "s"
    strict_spf = record.get("aspf") == "s"
    passed = any(aligned(d, from_domain, strict_dkim) for d in dkim_passed) or bool(spf_domain and aligned(spf_domain, from_domain, strict_spf))
    if not record:
        return "none", "", passed
    return ("pass" if passed else "fail"), record.get("p", "none"), passed


def _dmarc_record(lookups: Lookups, from_domain: str) -> dict[str, str]:
    """The DMARC record's tags for a domain, from `_dmarc.{domain}`, else from its organisational domain's (RFC 7489 §6.6.3).
    Several records at one name count as none."""
    return _remembered(_dmarc_records, (lookups.config, from_domain), lookups, lambda: _find_dmarc_record(lookups, from_domain))


def _find_dmarc_record(lookups: Lookups, from_domain: str) -> dict[str, str]:
    for domain in dict.fromkeys((from_domain, organisational_domain(from_domain))):
        records = [r for r in lookups.txt(f"_dmarc.{domain}") if r[:8].upper() == b"V=DMARC1"]
        if len(records) == 1:
            tags = (part.split("=", 1) for part in records[0].decode("ascii", "replace").split(";") if "=" in part)
            return {name.strip().lower(): value.strip().lower() for name, value in tags}
        if records:
            return {}
    return {}


def _provider_results(headers, authserv_id: str) -> list[authres.AuthenticationResult]:
    """The SPF and DMARC results of the provider's Authentication-Results: only the topmost header with its
    authserv-id (the provider adds its own on top; any below may be the sender's forgery)."""
    for value in headers.get_all(HEADER, []):
        text = " ".join(str(value).split())
        try:
            parsed = authres.AuthenticationResultsHeader.parse_value(text)
        except Exception:  # authres.AuthResError: a malformed header is no one's word
            continue
        if parsed.authserv_id == authserv_id.lower():
            return [r for r in parsed.results if r.method in ("spf", "dmarc")]
    return []
