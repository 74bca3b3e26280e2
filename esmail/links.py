"""Download links (DESIGN §6): a message with no attachments may carry a link to its data instead.

Only links that match a configured pattern are fetched, and only from the
scheme, host and port that pattern names (so a redirect, or a pattern's
unescaped `.`, cannot lead elsewhere). Each download is bounded in time and
size; timeouts, dropped connections and 5xx answers are retried a few times.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import ResolveResult

from esmail.config import DEFAULT_PORTS, LinksConfig
from esmail.keys import safe_path
from esmail.logs import counted

MAX_LINKS = 5  # per message
MAX_REDIRECTS = 5
_NOT_AVAILABLE = b"Your image cannot be displayed at this time"
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class LinkFailed(Exception):
    """A link that gave nothing to store; the message is finished without it."""

    def __init__(self, reason: str, url: str = ""):
        super().__init__(f"{url}: {reason}" if url else reason)
        self.url = url


class _Transient(Exception):
    """Worth another try: a timeout, a dropped connection, a 5xx."""


@dataclass(frozen=True)
class Download:
    url: str
    name: str  # made safe (DESIGN §3)
    data: bytes


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, the port filled in: what a link may be fetched from."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme, 0)


class _NotPublic(OSError):
    """A host name that resolves to no public address."""


class PublicResolver(aiohttp.ThreadedResolver):
    """Host names resolve to public addresses only.

    A pattern's host name cannot lead to loopback, a private network or a
    cloud metadata service (169.254.169.254), even if its DNS says so; an
    address written in a pattern is the operator's explicit choice and is not
    looked up at all. aiohttp connects to the addresses returned here, so a
    second, different answer (DNS rebinding) is never asked for.
    """

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await super().resolve(host, port, family)
        public = [r for r in results if is_public(r["host"])]
        if not public:
            found = ", ".join(r["host"] for r in results)
            raise _NotPublic(f"{host} resolves to {found}, not a public address; write the address itself in the [links] pattern to allow it")
        return public


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global


async def download_all(urls: list[str], config: LinksConfig) -> list[Download | LinkFailed]:
    """Each link's download, or why it failed (in the same order)."""
    timeout = aiohttp.ClientTimeout(total=config.timeout)
    connector = aiohttp.TCPConnector(resolver=PublicResolver())
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        return [await _with_retries(session, url, config) for url in urls]


async def _with_retries(session: aiohttp.ClientSession, url: str, config: LinksConfig) -> Download | LinkFailed:
    for attempt in range(1, config.attempts + 1):
        try:
            return await _download(session, url, config)
        except LinkFailed as exc:
            return LinkFailed(str(exc), url)
        except _Transient as exc:
            if attempt == config.attempts:
                return LinkFailed(f"{exc} (after {counted(attempt, 'attempt')})", url)
            await asyncio.sleep(2 ** (attempt - 1))
    raise AssertionError("unreachable")


async def _download(session: aiohttp.ClientSession, link: str, config: LinksConfig) -> Download:
    """One try: the link and its redirects, each checked against the allowed origins."""
    allowed, url = config.origins, link
    for _ in range(MAX_REDIRECTS + 1):
        if origin(url) not in allowed:
            redirect = f"redirected to {url}, " if url != link else ""
            raise LinkFailed(f"{redirect}not on a scheme, host and port that a [links] pattern names")
        try:
            async with session.get(url, allow_redirects=False) as response:
                if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                    url = urljoin(url, response.headers["Location"])
                    continue
                return await _read(response, config.max_bytes)
        except asyncio.TimeoutError:
            raise _Transient(f"no complete answer within {config.timeout:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, _NotPublic):
                raise LinkFailed(str(exc.os_error)) from None
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        except aiohttp.ClientError as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
    raise LinkFailed(f"more than {MAX_REDIRECTS} redirects")


async def _read(response: aiohttp.ClientResponse, max_bytes: int) -> Download:
    if response.status in _RETRY_STATUS:
        raise _Transient(f"HTTP {response.status}")
    if not 200 <= response.status < 300:
        raise LinkFailed(f"HTTP {response.status}")
    if response.content_type == "text/html":
        raise LinkFailed("the answer is an HTML page, not a file")
    if (response.content_length or 0) > max_bytes:
        raise LinkFailed(f"{response.content_length:,} bytes, over [links] max_bytes ({max_bytes:,})")
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > max_bytes:
            raise LinkFailed(f"over [links] max_bytes ({max_bytes:,} bytes)")
        chunks.append(chunk)
    data = b"".join(chunks)
    if _NOT_AVAILABLE in data:
        raise LinkFailed(f"the server says the file is not available ({_NOT_AVAILABLE.decode()!r})")
    url = str(response.url)
    return Download(url, safe_path(_filename(response) or re.sub(r"[:/?]", "_", url)), data)


def _filename(response: aiohttp.ClientResponse) -> str | None:
    """The name a Content-Disposition gives (`filename`, or RFC 6266 `filename*`); None when absent or unreadable."""
    try:
        disposition = response.content_disposition
        return disposition.filename if disposition else None
    except Exception:  # a malformed header is a sender's mistake: fall back to the URL
        return None
