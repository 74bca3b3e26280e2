"""Configuration: one TOML file parsed once into frozen value objects.

This is the one module that reads the environment: secrets come from the
process environment or from `.env.{stage}` beside the config file (or in the
working directory when there is no file; read as systemd reads an
EnvironmentFile=, esmail/envfile.py), never from the TOML.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

from esmail.errors import ConfigError
from esmail.keys import prefix_of

if TYPE_CHECKING:  # formats (and Ruby's dates) are imported only where a format is configured
    from esmail.formats import Format, Unusable

CONFIG_ENV = "ESMAIL_CONFIG"
SECRET_NAMES = (
    "ROLLBAR_ACCESS_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
PLACEHOLDERS = ("0123456789abcdef0123456789abcdef",)  # the example token of the env file's template in docs/operations.md

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$")
_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def parse_size(text: str | int) -> int:
    """`"40MB"` → 40_000_000 (MB = 10^6, MiB = 2^20); a bare integer is bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f'a size like "40MB", "500MiB" or a number of bytes, not {text!r}')
    return int(float(match.group(1)) * _UNITS[match.group(2)])


class Address(NamedTuple):
    """A listening address: `127.0.0.1:2525`, `[::1]:25`."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SmtpConfig:
    listen: Address = Address("127.0.0.1", 2525)
    hostname: str = ""  # the name in the greeting; empty: the host's FQDN, looked up once at start
    domains: tuple[str, ...] = ()
    max_message_size: int = 40_000_000
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_tls: bool = False
    command_timeout: float = 300.0  # idle time allowed between commands and between DATA packets
    session_timeout: float = 1800.0  # a whole connection, however busy
    max_sessions: int = 100
    unknown_feeds: str = "accept"  # "reject": RCPT for a prefix with no [[feed]] gets 550 5.1.1
    processes: int = 1  # receiver processes on the one port (SO_REUSEPORT); 0: one per core


@dataclass(frozen=True)
class StorageConfig:
    backend: str = "local"
    path: Path = Path("./esmail-data")
    endpoint_url: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class Buckets:
    inbox: str = "es-{stage}-data-inbox"
    amr_data: str = "es-{stage}-data-amr-data"
    unprocessable: str = "es-{stage}-data-unprocessable"

    def named(self, logical: str) -> str:
        """The real bucket name for a logical one (`"amr_data"` → `es-prod-data-amr-data`)."""
        return getattr(self, logical)


@dataclass(frozen=True)
class SpoolConfig:
    path: Path = Path("./esmail-spool")
    min_free: int = 500_000_000  # refuse mail (451) rather than fill the disk
    quarantine_days: float = 30.0  # quarantined entries older than this are dropped (the inbox copy stays)


@dataclass(frozen=True)
class WorkerConfig:
    processes: int = 0  # 0: one per core
    max_attempts: int = 100  # storage failures retried with backoff (1 s doubling, capped at 10 min): ~15 h
    memory_limit: int = 2_000_000_000  # address space of one conversion process; 0: no limit


IMAP_TLS = ("implicit", "starttls", "none")
LOCALHOST = ("localhost", "127.0.0.1", "::1")


IMAP_AUTH = ("password", "oauth2")


@dataclass(frozen=True)
class ImapConfig:
    """One `[[imap]]` mailbox. Its secrets are in environment variables the `*_env` keys name: the password,
    or for OAuth2 (DESIGN §14) the client secret and, for a refresh-token grant, the refresh token."""

    host: str
    username: str
    password_env: str | None = None
    auth: str = "password"  # or "oauth2"
    token_url: str | None = None
    client_id: str | None = None
    client_secret_env: str | None = None
    refresh_token_env: str | None = None  # set: refresh-token grant (Google); else client credentials (Microsoft 365)
    scope: str | None = None
    port: int = 0  # 0: 993 with implicit TLS, else 143
    tls: str = "implicit"
    folder: str = "INBOX"
    processed_folder: str = "Processed"
    poll_interval: float = 60.0
    prefix: str | None = None  # for a mailbox that serves one feed; else from the headers (DESIGN §2)
    trusted_authserv_id: str | None = None  # the provider whose Authentication-Results (SPF, DMARC) are believed

    def __str__(self) -> str:
        return f"{self.username}@{self.host}:{self.port}/{self.folder}"

    @property
    def secret_keys(self) -> dict[str, str]:
        """key → the environment variable it names, for each secret this mailbox needs."""
        keys = ("password_env",) if self.auth == "password" else ("client_secret_env", "refresh_token_env")
        return {key: getattr(self, key) for key in keys if getattr(self, key)}


@dataclass(frozen=True)
class FeedConfig:
    """One `[[feed]]`: a prefix esmail knows, and who may write to it (DESIGN §12)."""

    prefix: str
    name: str = ""
    senders: tuple[str, ...] = ()  # header From address globs, lower-case; empty: anyone
    authenticated: bool = False  # the From domain must pass DMARC's alignment test
    expected_every: float | None = None  # seconds; late after 1.5 × this without a message
    on_header_change: str = "store"  # "hold": a CSV whose header changed (DESIGN §16) quarantines the message
    format: Format | None = None  # [feed.format]: the importer's configuration of this prefix (DESIGN §16)


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[Address, ...] = ()  # empty: the system's resolver (/etc/resolv.conf)
    timeout: float = 5.0  # seconds for every lookup of one message together


@dataclass(frozen=True)
class RollbarConfig:
    endpoint: str = "https://api.rollbar.com/api/1/"  # the token is a secret: ROLLBAR_ACCESS_TOKEN


@dataclass(frozen=True)
class HttpConfig:
    listen: Address | None = None  # the page, /healthz and /metrics; None: off
    password_env: str | None = None  # the variable holding the page's password (HTTP Basic); needed off loopback


@dataclass(frozen=True)
class HistoryConfig:
    keep_days: float = 400.0  # messages received longer ago are pruned, once a day
    url: str | None = None  # postgresql://… shared by every host (DESIGN §17); None: {spool}/history.sqlite
    password_env: str | None = None  # the variable holding the database password (libpq's PGPASSWORD and ~/.pgpass work too)


@dataclass(frozen=True)
class CsvConfig:
    ascii_only: bool = False


@dataclass(frozen=True)
class FormatsConfig:
    path: Path | None = None  # the importer's AmrDataFeedConfig.all.to_json (DESIGN §16)


IMSERV_LINK = r"https://datavision\.imserv\.com/imgserver/InternalImage\.aspx\?[a-zA-Z0-9&%=]+"
DEFAULT_PORTS = {"https": 443, "http": 80}
_PATTERN_ORIGIN = re.compile(r"\^?(https?)://((?:[A-Za-z0-9-]|\\?\.)+)(?::(\d+))?(?:/|\\/|$)")


def pattern_origin(pattern: str) -> tuple[str, str, int]:
    """(scheme, host, port) that a link pattern names literally at its start; ValueError if it does not."""
    match = _PATTERN_ORIGIN.match(pattern)
    if not match:
        raise ValueError(pattern)
    scheme, host, port = match.groups()
    return scheme, host.replace("\\", "").lower(), int(port) if port else DEFAULT_PORTS[scheme]


@dataclass(frozen=True)
class LinksConfig:
    patterns: tuple[str, ...] = (IMSERV_LINK,)
    timeout: float = 60.0  # seconds for one download, redirects included
    max_bytes: int = 100_000_000
    attempts: int = 3  # tries of a link that timed out or answered 5xx

    @property
    def origins(self) -> frozenset[tuple[str, str, int]]:
        """Where links may be fetched from, redirects included: the patterns' own schemes, hosts and ports."""
        return frozenset(map(pattern_origin, self.patterns))


@dataclass(frozen=True)
class Config:
    stage: str = "development"
    smtp: SmtpConfig = SmtpConfig()
    storage: StorageConfig = StorageConfig()
    buckets: Buckets = Buckets()
    spool: SpoolConfig = SpoolConfig()
    worker: WorkerConfig = WorkerConfig()
    csv: CsvConfig = CsvConfig()
    formats: FormatsConfig = FormatsConfig()
    links: LinksConfig = LinksConfig()
    http: HttpConfig = HttpConfig()
    history: HistoryConfig = HistoryConfig()
    rollbar: RollbarConfig = RollbarConfig()
    dns: DnsConfig = DnsConfig()
    imap: tuple[ImapConfig, ...] = ()
    feeds: tuple[FeedConfig, ...] = ()
    feed_formats: Mapping[str, Format | Unusable] = field(default_factory=dict, repr=False)  # prefix → format: the export's, inline winning
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    source: Path | None = None
    warnings: tuple[str, ...] = ()  # things worth saying at start that do not stop esmail

    def describe(self) -> str:
        """The effective configuration as TOML-like text, secrets masked."""
        lines = [f"# from {self.source or 'the embedded default'}", f'stage = "{self.stage}"']
        for section in _SECTIONS:
            lines.append(f"[{section}]")
            value = getattr(self, section)
            for f in fields(value):
                lines.append(f"{f.name} = {_show(getattr(value, f.name))}")
        for table, values in [("imap", self.imap), ("feed", self.feeds)]:
            for value in values:
                lines.append(f"[[{table}]]")
                lines += [f"{f.name} = {_show(getattr(value, f.name))}" for f in fields(value) if f.name != "format"]
                if getattr(value, "format", None) is not None:
                    lines.append("[feed.format]")
                    lines += [f"{f.name} = {_show(getattr(value.format, f.name))}" for f in fields(value.format)]
        if self.formats.path is not None:
            from esmail.formats import Unusable

            unusable = sum(isinstance(fmt, Unusable) for fmt in self.feed_formats.values())
            lines.append(f"# [formats] path: {len(self.feed_formats)} prefixes have a format, {unusable} of them unusable")
        lines.append("# secrets (environment or .env.{stage})")
        for name in secret_names(self):
            lines.append(f"# {name}: {'set (****)' if self.secrets.get(name) else 'not set'}")
        return "\n".join(lines)


    def feed(self, prefix: str) -> FeedConfig | None:
        """The `[[feed]]` declared for a prefix, or None."""
        return next((feed for feed in self.feeds if feed.prefix == prefix), None)

    def formats_for(self, prefixes) -> dict[str, Format | Unusable]:
        """prefix → its format (DESIGN §16), for those of `prefixes` that have one."""
        return {prefix: self.feed_formats[prefix] for prefix in prefixes if prefix in self.feed_formats}


def _show(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, Address):
        return f'"{value}"'
    if isinstance(value, tuple) and value and all(isinstance(v, tuple) for v in value):  # column_row_filters: a table
        return "{ " + ", ".join(f"{_show(k)} = {_show(v)}" for k, v in value) + " }"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(_show, value)) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, Path)):
        return f"'{value}'" if "\\" in str(value) else f'"{value}"'  # a literal string keeps a regex's backslashes
    return str(value)


# How each key is read: section → key → (converter, what it must be).
def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError
    return v


def _positive_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TypeError
    return v


def _seconds(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise TypeError
    return float(v)


def parse_address(text: str) -> Address:
    """`"127.0.0.1:2525"`, `"[::1]:25"` or `":25"` (every address) → Address; ValueError otherwise."""
    host, sep, port = _str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'an address and port such as "127.0.0.1:2525" or "[::1]:25", not {text!r}')
    return Address(host.strip("[]") or "0.0.0.0", int(port))


def _one_of(*choices: str):
    def check(v: Any) -> str:
        if v not in choices:
            raise ValueError
        return v
    return check


def _at_least_one(v: Any) -> int:
    if _positive_int(v) < 1:
        raise ValueError
    return v


class _Why(ValueError):
    """A bad value with something to add to "must be …; got …" (what exactly is wrong with it)."""


def _patterns(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
        raise TypeError
    for pattern in v:
        try:
            re.compile(pattern)
        except re.error as exc:  # not a ValueError
            raise _Why(f"{pattern!r} is not a regular expression: {exc}") from None
        pattern_origin(pattern)
    return tuple(v)


def _nameserver(text: Any) -> Address:
    """`"127.0.0.1"`, `"127.0.0.1:5353"`, `"::1"` or `"[::1]:5353"`: an IP address (a resolver is not looked up by name)."""
    text = _str(text)
    address = parse_address(text) if text.startswith("[") or text.count(":") == 1 else Address(text, 53)
    ipaddress.ip_address(address.host)  # ValueError: not an IP address
    return address


def _nameservers(v: Any) -> tuple[Address, ...]:
    if not isinstance(v, list):
        raise TypeError
    return tuple(map(_nameserver, v))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(v: Any) -> float:
    """`"1d"`, `"12h"`, `"30m"`, `"90s"` or a number of seconds → seconds."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
        return float(v)
    match = _DURATION.match(v) if isinstance(v, str) else None
    if not match or float(match.group(1)) <= 0:
        raise ValueError
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def describe_duration(seconds: float) -> str:
    """86400 → `1d`, 5400 → `90m`: the shortest way `parse_duration` reads back."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def describe_age(seconds: float) -> str:
    """How long ago, in its largest whole unit: 3d, 5h, 12m, 40s."""
    seconds = max(int(seconds), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


_GLOB = re.compile(r"[^@\s]+@[^@\s]+")


def _senders(v: Any) -> tuple[str, ...]:
    """Address globs (`*@sheffield.gov.uk`): one @, no spaces, brackets closed; lower-cased (they match case-insensitively)."""
    if not isinstance(v, list) or not all(isinstance(g, str) for g in v):
        raise TypeError
    for glob in v:
        if not _GLOB.fullmatch(glob) or glob.count("[") != glob.count("]"):
            raise ValueError(glob)
    return tuple(g.lower() for g in v)


_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")


def _domains(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(d, str) and d for d in v):
        raise TypeError
    domains = tuple(d.lower().strip(".") for d in v)
    if not all(_DOMAIN.fullmatch(d) for d in domains):  # "@x", "x.org:25", "*.x.org": not domain names
        raise ValueError
    return domains


def database_url(v: Any) -> str:
    """A `postgresql://` URL with no password in it (the password comes from the environment, PGPASSWORD or ~/.pgpass)."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(_str(v))
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname and not parts.path.strip("/"):
        raise ValueError
    if parts.password is not None or "password" in parse_qs(parts.query):
        raise SecretError("holds a password: take it out of the URL and put it in the environment variable that "
                      "[history] password_env names (or PGPASSWORD, or ~/.pgpass); the config file is no place for secrets")
    return v


class SecretError(ValueError):
    """A secret where it must not be: said without the value (the message is the whole error)."""


_SCHEMA: dict[str, dict[str, tuple[Any, str]]] = {
    "smtp": {
        "listen": (parse_address, 'an address and port such as "127.0.0.1:2525", "[::1]:25" or ":25" (every address)'),
        "hostname": (_str, 'the host name for the greeting, e.g. "mx.datafeeds.example.org"'),
        "domains": (_domains, 'a list of domain names, e.g. ["datafeeds.example.org"]'),
        "max_message_size": (parse_size, 'a size such as "40MB"'),
        "tls_cert": (lambda v: Path(_str(v)), "the path of a PEM certificate (chain) file"),
        "tls_key": (lambda v: Path(_str(v)), "the path of a PEM private key file"),
        "require_tls": (_bool, "true or false"),
        "command_timeout": (_seconds, "a number of seconds greater than 0"),
        "session_timeout": (_seconds, "a number of seconds greater than 0"),
        "max_sessions": (_at_least_one, "at least 1 (a whole number of concurrent connections)"),
        "processes": (_positive_int, "a whole number of receiver processes (0: one per core)"),
        "unknown_feeds": (_one_of("accept", "reject"), '"accept" (any prefix) or "reject" (550 5.1.1 for a prefix with no [[feed]])'),
    },
    "storage": {
        "backend": (_str, '"local" or "s3"'),
        "path": (lambda v: Path(_str(v)), "a folder path"),
        "endpoint_url": (_str, 'a URL such as "http://127.0.0.1:9000"'),
        "region": (_str, 'an AWS region name such as "eu-west-2"'),
    },
    "buckets": {name: (_str, 'a bucket name; "{stage}" is replaced by the stage') for name in ("inbox", "amr_data", "unprocessable")},
    "spool": {
        "path": (lambda v: Path(_str(v)), "a folder path"),
        "min_free": (parse_size, 'a size such as "500MB"'),
        "quarantine_days": (_seconds, "a number of days greater than 0"),
    },
    "worker": {
        "processes": (_positive_int, "a whole number of processes (0: one per core)"),
        "max_attempts": (_at_least_one, "at least 1 (a whole number of attempts)"),
        "memory_limit": (parse_size, 'a size such as "2GB" (0: no limit)'),
    },
    "csv": {"ascii_only": (_bool, "true or false")},
    "links": {
        "patterns": (_patterns, "a list of regular expressions, each starting with its scheme and host written out, "
                     'e.g. ["https://datavision\\\\.imserv\\\\.com/imgserver/.+"] (an https link only, unless the pattern says http)'),
        "timeout": (_seconds, "a number of seconds greater than 0"),
        "max_bytes": (parse_size, 'a size such as "100MB"'),
        "attempts": (_at_least_one, "at least 1 (a whole number of tries)"),
    },
    "dns": {
        "nameservers": (_nameservers, 'a list of resolver IP addresses, each with an optional port, e.g. ["127.0.0.1", "[::1]:5353"]'),
        "timeout": (_seconds, "a number of seconds greater than 0 (for all lookups of one message)"),
    },
    "http": {
        "listen": (parse_address, 'an address and port such as "127.0.0.1:9025"'),
        "password_env": (_str, 'the name of the environment variable that holds the page\'s password, e.g. "ESMAIL_HTTP_PASSWORD"'),
    },
    "history": {
        "keep_days": (_seconds, "a number of days greater than 0"),
        "url": (database_url, 'a PostgreSQL URL without a password, e.g. "postgresql://esmail@db.example.org:5432/esmail?sslmode=verify-full"'),
        "password_env": (_str, 'the name of the environment variable that holds the database password, e.g. "ESMAIL_HISTORY_PASSWORD"'),
    },
    "formats": {"path": (lambda v: Path(_str(v)), "the path of the importer's configs as JSON (AmrDataFeedConfig.all.to_json)")},
    "rollbar": {"endpoint": (_str, 'the API URL, "https://api.rollbar.com/api/1/" unless you run your own')},
}
_IMAP_SCHEMA: dict[str, tuple[Any, str]] = {
    "host": (_str, 'the IMAP server\'s name, e.g. "outlook.office365.com"'),
    "port": (_at_least_one, "a port number (default 993 with implicit TLS, else 143)"),
    "tls": (_str, '"implicit" (993), "starttls" or "none" (only for localhost)'),
    "username": (_str, 'the login name, e.g. "feeds@example.org"'),
    "password_env": (_str, 'the name of the environment variable that holds the password, e.g. "IMAP_PASSWORD"'),
    "folder": (_str, 'the folder to fetch from, e.g. "INBOX"'),
    "processed_folder": (_str, 'the folder fetched messages move to, e.g. "Processed"'),
    "poll_interval": (_seconds, "a number of seconds greater than 0"),
    "prefix": (_str, 'a feed prefix such as "sheffield" (a-z 0-9 . _ + -)'),
    "trusted_authserv_id": (_str, 'the authserv-id of the provider\'s Authentication-Results header, e.g. "mx.google.com"'),
    "auth": (_one_of(*IMAP_AUTH), '"password" (default) or "oauth2" (Microsoft 365, Google Workspace)'),
    "token_url": (_str, 'the OAuth2 token endpoint, e.g. "https://login.microsoftonline.com/TENANT/oauth2/v2.0/token"'),
    "client_id": (_str, "the OAuth2 client (application) id"),
    "client_secret_env": (_str, 'the name of the environment variable that holds the OAuth2 client secret, e.g. "IMAP_CLIENT_SECRET"'),
    "refresh_token_env": (_str, 'the name of the environment variable that holds the OAuth2 refresh token, e.g. "IMAP_REFRESH_TOKEN"'),
    "scope": (_str, 'the OAuth2 scope, e.g. "https://outlook.office365.com/.default"'),
}
# Secrets written into a [[imap]] table by mistake: refused, naming the *_env key that should name their variable
_IMAP_SECRETS = {"password": "password_env", "client_secret": "client_secret_env", "refresh_token": "refresh_token_env",
                 "access_token": "client_secret_env"}
_FEED_SCHEMA: dict[str, tuple[Any, str]] = {
    "prefix": (_str, 'the recipient\'s local part, e.g. "sheffield" (a-z 0-9 . _ + -, no leading, trailing or double dot)'),
    "name": (_str, 'a name for people, e.g. "Sheffield City Council"'),
    "senders": (_senders, 'a list of header From address globs such as ["*@sheffield.gov.uk", "exports@npower.example"]'),
    "authenticated": (_bool, "true or false"),
    "expected_every": (parse_duration, 'a duration such as "1d", "12h", "30m" or a number of seconds'),
    "on_header_change": (_one_of("store", "hold"), '"store" (the default: store the CSV and flag it) or "hold" '
                         "(quarantine the message until released)"),
}
_SECTIONS = {
    "smtp": SmtpConfig, "storage": StorageConfig, "buckets": Buckets, "spool": SpoolConfig,
    "worker": WorkerConfig, "csv": CsvConfig, "links": LinksConfig, "dns": DnsConfig, "http": HttpConfig,
    "history": HistoryConfig, "rollbar": RollbarConfig, "formats": FormatsConfig,
}


def load(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the config file (or `$ESMAIL_CONFIG`, or none: the embedded default) and the secrets."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    source = None
    if path is not None:
        source = Path(path)
        try:
            data = tomllib.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found (given by --config or ${CONFIG_ENV})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read the config file: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    where = str(source or "the embedded default")
    config = _build(data, where)
    secrets, ignored = _secrets(config.stage, source, environ, secret_names(config))
    config = replace(config, source=source, secrets=secrets, warnings=config.warnings + tuple(ignored))
    return _checked(config, where)


def _build(data: dict[str, Any], where: str) -> Config:
    known = set(_SCHEMA) | {"stage", "imap", "feed"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}'; known top-level keys: {', '.join(sorted(known))}")
    stage = data.get("stage", "development")
    if not isinstance(stage, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]*", stage):
        raise ConfigError(f"{where}: 'stage' must be lower-case letters, digits and '-', e.g. \"production\"; got {stage!r}")
    sections = {}
    for section, schema in _SCHEMA.items():
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: '{section}' must be a table ([{section}])")
        sections[section] = _SECTIONS[section](**_converted(table, schema, f"[{section}]", where))
    buckets = sections["buckets"]
    sections["buckets"] = Buckets(**{f.name: getattr(buckets, f.name).replace("{stage}", stage) for f in fields(Buckets)})
    feeds = _feeds(data.get("feed", []), where)
    feed_formats, format_warnings = _feed_formats(feeds, sections["formats"], where)
    return Config(stage=stage, imap=_mailboxes(data.get("imap", []), where), feeds=feeds, feed_formats=feed_formats,
                  warnings=_ignored(data, sections["storage"].backend, where) + format_warnings, **sections)


def _ignored(data: dict[str, Any], backend: str, where: str) -> tuple[str, ...]:
    """Keys the chosen storage backend does not use: said at start, not an error (switching backends is normal)."""
    storage = data.get("storage", {})
    unused = ["path"] if backend == "s3" else ["endpoint_url", "region"]
    return tuple(f"{where}: [storage] {key} is ignored with backend = \"{backend}\"" for key in unused if key in storage)


def _converted(table: dict[str, Any], schema: dict[str, tuple[Any, str]], name: str, where: str) -> dict[str, Any]:
    """A table's values through its schema's converters; an unknown key or a bad value names `name` and the key."""
    values = {}
    for key, raw in table.items():
        if key not in schema:
            raise ConfigError(f"{where}: unknown key {name} {key}; known keys: {', '.join(schema)}")
        convert, expected = schema[key]
        try:
            values[key] = convert(raw)
        except SecretError as exc:
            raise ConfigError(f"{where}: {name} {key} {exc}") from None
        except (TypeError, ValueError) as exc:
            detail = f" ({exc})" if isinstance(exc, _Why) else ""
            hint = " (a number: write it without quotes)" if isinstance(raw, str) and _is_number(raw) else ""
            raise ConfigError(f"{where}: {name} {key} must be {expected}; got {raw!r}{hint}{detail}") from None
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _tables(tables: Any, key: str, each: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{where}: '{key}' must be an array of tables ([[{key}]], one per {each})")
    return tables


def _feeds(tables: Any, where: str) -> tuple[FeedConfig, ...]:
    """The `[[feed]]` array of tables: known prefixes, each once."""
    feeds: dict[str, FeedConfig] = {}
    for n, table in enumerate(_tables(tables, "feed", "feed", where), 1):
        name = f"[[feed]] #{n}"
        values = _converted({k: v for k, v in table.items() if k != "format"}, _FEED_SCHEMA, name, where)
        prefix = values.get("prefix")
        if prefix is None:
            raise ConfigError(f"{where}: {name} needs prefix: {_FEED_SCHEMA['prefix'][1]}")
        if prefix_of(prefix) != prefix:
            raise ConfigError(f"{where}: {name} prefix must be {_FEED_SCHEMA['prefix'][1]}; got {prefix!r}")
        if prefix in feeds:
            raise ConfigError(f"{where}: {name} prefix = {prefix!r} is declared twice; merge the two [[feed]] tables into one")
        values.setdefault("authenticated", bool(values.get("senders")))
        if "format" in table:
            values["format"] = _inline_format(table["format"], f"{name} (prefix {prefix!r}) [feed.format]", where)
        feeds[prefix] = FeedConfig(**values)
    return tuple(feeds.values())


def _inline_format(table: Any, name: str, where: str) -> Format:
    """A `[feed.format]` table: the importer's attributes, every one checked (DESIGN §16)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: {name} must be a table of the importer's attributes ([feed.format] under the [[feed]])")
    from esmail import formats

    try:
        return formats.parse(table)
    except formats.FormatError as exc:
        raise ConfigError(f"{where}: {name} {exc}") from None


def _feed_formats(feeds: tuple[FeedConfig, ...], config: FormatsConfig, where: str) -> tuple[dict[str, Format | Unusable], tuple[str, ...]]:
    """prefix → format: the importer's export (`[formats] path`), then each feed's inline format, which wins.

    An export that cannot be read is a config error; an entry of it that
    cannot be checked is a warning, and its prefix's files say `format unusable`.
    """
    if config.path is None and not any(feed.format is not None or feed.on_header_change == "hold" for feed in feeds):
        return {}, ()
    from esmail.formats import Unusable, load_export  # only where some format is configured

    found: dict[str, Format | Unusable] = {}
    warnings: list[str] = []
    if config.path is not None:
        try:
            found, faults = load_export(config.path)
        except ValueError as exc:
            raise ConfigError(f"{where}: [formats] path = '{config.path}' {exc}; export the importer's configs again "
                              "(AmrDataFeedConfig.all.to_json) or remove the key") from None
        warnings += [f"{where}: [formats] path = '{config.path}': {fault}" for fault in faults]
    found.update({feed.prefix: feed.format for feed in feeds if feed.format is not None})
    for feed in feeds:
        if feed.on_header_change == "hold" and feed.prefix not in found:
            raise ConfigError(f'{where}: [[feed]] prefix {feed.prefix!r} has on_header_change = "hold" but no format to compare '
                              "headers with: add its [feed.format] (the importer's configuration), or its entry in [formats] path")
        if feed.on_header_change == "hold" and isinstance(found[feed.prefix], Unusable):
            warnings.append(f'{where}: [[feed]] prefix {feed.prefix!r} has on_header_change = "hold", but its exported format '
                            "is unusable: nothing is held until it is fixed")
    return found, tuple(warnings)


def _mailboxes(tables: Any, where: str) -> tuple[ImapConfig, ...]:
    """The `[[imap]]` array of tables, each checked as a section is."""
    mailboxes = []
    for n, table in enumerate(_tables(tables, "imap", "mailbox", where), 1):
        name = f"[[imap]] #{n}"
        for key in table:
            if key in _IMAP_SECRETS:
                raise ConfigError(f"{where}: {name} {key}: secrets never go in the config file; put it in an environment variable "
                                  f"(or .env.{{stage}}) and name that variable in {_IMAP_SECRETS[key]}")
        values = _converted(table, _IMAP_SCHEMA, name, where)
        auth = values.get("auth", "password")
        needed = ("host", "username", "password_env") if auth == "password" else ("host", "username", "token_url", "client_id", "client_secret_env")
        for key in needed:
            if key not in values:
                hint = ' (auth = "oauth2")' if auth == "oauth2" else ' (or auth = "oauth2" with token_url, client_id, client_secret_env)'
                raise ConfigError(f"{where}: {name} needs {key}{hint}: {_IMAP_SCHEMA[key][1]}")
        if auth == "oauth2" and not _https_or_local(values["token_url"]):
            raise ConfigError(f"{where}: {name} token_url must be an https:// URL (http only to localhost): the client secret is sent there; "
                              f"got {values['token_url']!r}")
        tls = values.get("tls", "implicit")
        if tls not in IMAP_TLS:
            raise ConfigError(f"{where}: {name} tls must be {_IMAP_SCHEMA['tls'][1]}; got {tls!r}")
        if tls == "none" and values["host"] not in LOCALHOST:
            raise ConfigError(f'{where}: {name} tls = "none" sends the password in clear: only for localhost; use "implicit" or "starttls"')
        if "prefix" in values and prefix_of(values["prefix"]) != values["prefix"]:
            raise ConfigError(f"{where}: {name} prefix must be {_IMAP_SCHEMA['prefix'][1]}; got {values['prefix']!r}")
        values.setdefault("port", 993 if tls == "implicit" else 143)
        mailboxes.append(ImapConfig(**values))
    return tuple(mailboxes)


def _checked(config: Config, where: str) -> Config:
    if config.storage.backend not in ("local", "s3"):
        raise ConfigError(f'{where}: [storage] backend must be "local" or "s3"; got {config.storage.backend!r}')
    for f in fields(Buckets):
        name = getattr(config.buckets, f.name)
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", name):
            raise ConfigError(f"{where}: [buckets] {f.name} = {name!r} is not a valid bucket name (3-63 of a-z, 0-9, '.', '-')")
    smtp = config.smtp
    if (smtp.tls_cert is None) != (smtp.tls_key is None):
        raise ConfigError(f"{where}: [smtp] tls_cert and tls_key go together; set both (PEM files) or neither")
    if smtp.require_tls and smtp.tls_cert is None:
        raise ConfigError(f"{where}: [smtp] require_tls = true needs tls_cert and tls_key")
    for n, mailbox in enumerate(config.imap, 1):
        for key, variable in mailbox.secret_keys.items():
            if not config.secrets.get(variable):
                what = {"password_env": "the password", "client_secret_env": "the OAuth2 client secret",
                        "refresh_token_env": "the OAuth2 refresh token"}[key]
                raise ConfigError(f"{where}: [[imap]] #{n} {key} = {variable!r}: that environment variable is not set; "
                                  f"put {what} of {mailbox.username} in it (or in .env.{config.stage})")
    history = config.history
    if history.password_env and not config.secrets.get(history.password_env):
        raise ConfigError(f"{where}: [history] password_env = {history.password_env!r}: that environment variable is not set or empty; "
                          f"put the database password in it (or in .env.{config.stage}), or leave password_env out and use "
                          "PGPASSWORD or ~/.pgpass")
    if history.password_env and not history.url:
        raise ConfigError(f"{where}: [history] password_env needs [history] url (the PostgreSQL database it is the password of)")
    http = config.http
    if http.password_env and not config.secrets.get(http.password_env):
        raise ConfigError(f"{where}: [http] password_env = {http.password_env!r}: that environment variable is not set or empty; "
                          f"put the page's password in it (or in .env.{config.stage})")
    if http.listen and http.listen.port == smtp.listen.port and (http.listen.host == smtp.listen.host or "0.0.0.0" in (http.listen.host, smtp.listen.host)):
        raise ConfigError(f"{where}: [http] listen and [smtp] listen are both {http.listen}: give the page another port, e.g. \"127.0.0.1:9025\"")
    warnings = list(config.warnings)
    for name, value in config.secrets.items():
        if problem := secret_problem(value):
            if is_placeholder(value):
                raise ConfigError(f"{where}: {name} (environment or .env.{config.stage}): {problem}")
            warnings.append(f"{name} (environment or .env.{config.stage}): {problem}")
    token = config.secrets.get("ROLLBAR_ACCESS_TOKEN")
    if token and not re.fullmatch(r"[0-9a-f]{32}", token):
        comment = f" ({secret_problem(token)})" if secret_problem(token) else ""
        raise ConfigError(f"{where}: ROLLBAR_ACCESS_TOKEN (environment or .env.{config.stage}) is not a Rollbar access token "
                          "(32 hexadecimal characters, from Project → Settings → Project Access Tokens, post_server_item); "
                          f"leave it unset to report to nobody{comment}")
    if http.listen and not http.password_env and not is_loopback(http.listen.host):
        raise ConfigError(f"{where}: [http] listen = \"{http.listen}\" is reachable from other hosts, and the page lets people "
                          "read messages and release them: set [http] password_env (HTTP Basic), or listen on 127.0.0.1 "
                          "behind a reverse proxy")
    if smtp.unknown_feeds == "reject" and not config.feeds:
        raise ConfigError(f'{where}: [smtp] unknown_feeds = "reject" refuses every recipient when no [[feed]] is declared; '
                          'declare the feeds (a [[feed]] table with prefix = "…" each) or set unknown_feeds = "accept"')
    if len(set(vars(config.buckets).values())) != 3:
        raise ConfigError(f"{where}: [buckets] inbox, amr_data and unprocessable must be three different buckets")
    return replace(config, warnings=tuple(warnings))


def is_placeholder(value: str) -> bool:
    """A secret's value copied from a template: the example token, or anything with an ellipsis (`AKIA…`)."""
    return value in PLACEHOLDERS or "…" in value


def secret_problem(value: str) -> str | None:
    """What looks wrong with a secret's value as written (a placeholder, a comment kept in it), or None."""
    if is_placeholder(value):
        return "this is the placeholder of a template, not a real value: put the real value in, or remove the line"
    if re.search(r"\s#", value):
        return ("it holds ' #': systemd's EnvironmentFile= (and a .env file) keeps a comment written after a value "
                "as part of the value; put comments on lines of their own")
    return None


def _https_or_local(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return bool(parts.hostname) and (parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.hostname)))


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def secret_names(config: Config) -> list[str]:
    """Every environment variable a secret may come from: the fixed ones, and those the config names."""
    named = [name for mailbox in config.imap for name in mailbox.secret_keys.values()]
    optional = [name for name in (config.http.password_env, config.history.password_env) if name]
    return list(dict.fromkeys([*SECRET_NAMES, *named, *optional]))


def _secrets(stage: str, source: Path | None, environ: Mapping[str, str], names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Secrets from `.env.{stage}` (beside the config file, else the working directory), the environment winning;
    and a note for each line of that file that systemd would ignore."""
    from esmail import envfile

    values, ignored = envfile.read((source.parent if source else Path.cwd()) / f".env.{stage}")
    values.update(environ)
    return {name: values[name] for name in names if values.get(name)}, ignored
