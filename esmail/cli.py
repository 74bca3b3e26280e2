"""The `esmail` command line (DESIGN §9). Exit codes: 0 done, 1 something failed, 2 usage or config error.

Each command imports what it uses when it runs: `esmail --help`, `convert`,
`send` and `spool list` must not pay for the daemon, aiohttp, boto or rollbar.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from esmail import __version__, config as config_module, logs, report
from esmail.config import Config
from esmail.errors import ConfigError

log = logging.getLogger("esmail")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logs.setup(getattr(args, "log_level", args.default_log_level), getattr(args, "log_format", "text"))
    if args.run is _env_file:  # reads no config: it sets up the environment a config's secrets come from
        return _env_file(args)
    try:
        config = config_module.load(getattr(args, "config", None))
    except ConfigError as exc:
        return _config_error(exc, getattr(args, "log_format", "text"))
    for warning in config.warnings:
        log.warning("%s", warning)
    if getattr(args, "writes", False) and hasattr(os, "geteuid") and os.geteuid() == 0:
        log.warning("running as root: what it creates (the spool, local buckets) will belong to root, and the service, "
                    "which runs as its own user, cannot use it; run commands as that user (sudo -u esmail …, or esmail-admin)")
    if not report.setup(config):
        log.info("ROLLBAR_ACCESS_TOKEN is not set: problems are logged, not reported to Rollbar")
    try:
        return args.run(config, args)
    except ConfigError as exc:  # found only now: a spool folder that cannot be made or written
        return _config_error(exc, getattr(args, "log_format", "text"))
    except Exception:  # a bug: reported, then the usual traceback and exit 1 (systemd restarts serve)
        report.exception("esmail crashed")
        raise
    finally:
        report.flush()


def _config_error(exc: ConfigError, log_format: str) -> int:
    """Exit 2 with the message: one line of text, or one JSON object with --log-format json."""
    if log_format == "json":
        log.error("config error: %s", exc)
    else:
        print(f"esmail: config error: {exc}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given before the command is not reset by the command's own parser
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help=f"TOML config file (default: ${config_module.CONFIG_ENV}, else the embedded default)")
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"],
                        help="default: info for serve, warning for the others")
    common.add_argument("--log-format", default=argparse.SUPPRESS, choices=["text", "json"],
                        help="text (default): one readable line per event; json: one JSON object per line, for log shippers")
    parser = argparse.ArgumentParser(prog="esmail", description="Receive data feeds by email and store them as clean UTF-8 CSV.", parents=[common])
    parser.add_argument("--version", action="version", version=f"esmail {__version__}")
    parser.set_defaults(default_log_level="warning")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the SMTP server and the worker (the daemon)",
                                description="Receive mail on [smtp] listen, spool each message (fsync'd) before answering 250, "
                                            "and convert and store it. SIGTERM or SIGINT stops it cleanly; SIGHUP reloads the TLS certificate.")
    serve.set_defaults(run=_run(_serve), default_log_level="info", writes=True)

    poll = commands.add_parser("poll", parents=[common], help="fetch from the [[imap]] mailboxes and run the worker, without an SMTP server",
                               description="Watch each [[imap]] mailbox (IDLE, and a poll every poll_interval), spool each message "
                                           "(fsync'd) before moving it to processed_folder, and convert and store it. "
                                           "`esmail serve` does this too, beside its SMTP server.")
    poll.set_defaults(run=_run(_poll), default_log_level="info", writes=True)

    send = commands.add_parser("send", parents=[common], help="mail files as attachments to an esmail server",
                               description="Mail files as attachments of one message, to test a deployment end to end.")
    send.add_argument("files", nargs="+", metavar="FILE", help="files to attach (csv, xlsx, zip, …), one message for all")
    send.add_argument("--to", required=True, metavar="ADDR", help="recipient, e.g. sheffield@datafeeds.example.org")
    send.add_argument("--from", dest="sender", default="esmail-send@localhost", metavar="ADDR", help="sender (default: %(default)s)")
    send.add_argument("--server", metavar="HOST:PORT", help="SMTP server (default: [smtp] listen of the config)")
    send.add_argument("--insecure", action="store_true", help="use STARTTLS without checking the certificate (self-signed test servers)")
    send.set_defaults(run=_send)

    spool = commands.add_parser("spool", parents=[common], help="list spooled messages; retry failed ones, release quarantined ones",
                                description="Inspect the spool: messages waiting to be stored, those that failed for good, "
                                            "and those a feed's policy quarantined.")
    spool_commands = spool.add_subparsers(title="spool commands", required=True, metavar="ACTION")
    spool_list = spool_commands.add_parser("list", parents=[common], help="queued, failed and quarantined entries",
                                           description="One row per queued or failed entry (id, state, age, recipients, attempts, "
                                                       "last error) and per quarantined entry and prefix (the reason names the From).")
    spool_list.set_defaults(run=_spool_list)
    spool_retry = spool_commands.add_parser("retry", parents=[common], help="move failed entries (all, or those named) back to the queue",
                                            description="Move failed entries back to the queue; a running esmail serve or poll takes "
                                                        "them within a minute.")
    spool_retry.add_argument("ids", nargs="*", metavar="ID", help="entry ids from `esmail spool list` (default: every failed entry)")
    spool_retry.set_defaults(run=_spool_retry, writes=True)
    spool_release = spool_commands.add_parser("release", parents=[common], help="let quarantined entries through, as if they had passed",
                                              description="Move quarantined entries back to the queue, to be processed as if their "
                                                          "feed's policy had passed them (the log says which reason was overridden); "
                                                          "a running esmail serve or poll takes them within a minute.")
    spool_release.add_argument("ids", nargs="+", metavar="ID", help="entry ids from `esmail spool list` (state quarantined)")
    spool_release.set_defaults(run=_spool_release, writes=True)

    ingest = commands.add_parser("ingest", parents=[common], help="process .eml files through the spool, worker and store",
                                 description="Process raw messages (.eml) as if they had just been received: every object goes to the "
                                             "configured store, and one line per object is printed (bucket, key, bytes).")
    ingest.add_argument("files", nargs="+", metavar="FILE.eml", help="raw messages; - reads one from standard input "
                        "(aws s3 cp s3://…/X.eml - | esmail ingest -)")
    ingest.add_argument("--recipient", metavar="ADDR", help="envelope recipient, e.g. sheffield@datafeeds.example.org (default: from the headers)")
    ingest.set_defaults(run=_run(_ingest), writes=True)

    history = commands.add_parser("history", parents=[common], help="the history: copy this host's into PostgreSQL",
                                  description="The history behind the page (docs/many-hosts.md).")
    history_commands = history.add_subparsers(title="history commands", required=True, metavar="ACTION")
    history_copy = history_commands.add_parser(
        "copy", parents=[common], help="copy this host's SQLite history into a PostgreSQL database (moving to several hosts)",
        description="Copy {spool}/history.sqlite (every message, file, outcome and feed summary) into the PostgreSQL database at "
                    "URL, made or brought up to date first. Safe to run twice. The password: [history] password_env's variable, "
                    "else PGPASSWORD or ~/.pgpass (never in the URL).")
    history_copy.add_argument("--to", required=True, metavar="URL", help="e.g. postgresql://esmail@db.example.org/esmail?sslmode=verify-full")
    history_copy.set_defaults(run=_history_copy)

    convert = commands.add_parser("convert", parents=[common], help="run the conversion chain alone on local files",
                                  description="Convert files (csv, xlsx, xls, xlsb, ods, zip, winmail.dat, and disguised ones, "
                                              "decided by content as in the daemon) to normalised CSV files in a folder.")
    convert.add_argument("files", nargs="+", metavar="FILE")
    convert.add_argument("--out", metavar="DIR", default=".", help="output folder (default: the current folder)")
    convert.set_defaults(run=_convert)

    check_files = commands.add_parser(
        "check", parents=[common], help="say what the importer will make of files, converted as the daemon would",
        description="Convert each file as the daemon would (csv, xls, xlsx, ods, zip, a raw .eml) and check each CSV the way the "
                    "overnight importer reads it, with the format of --feed (its [feed.format], or its entry in [formats] path): "
                    "rows, what imports, meters, dates, the importer's warnings, and the header against header_example. "
                    "Exit 0 when every file would import, 1 when any is rejected, unusable or its header changed, "
                    "2 on a usage or config error.")
    check_files.add_argument("files", nargs="+", metavar="FILE")
    check_files.add_argument("--feed", required=True, metavar="PREFIX", help="the prefix whose format to read them with, e.g. edf")
    check_files.add_argument("--json", action="store_true", help='print {"files": [report, …]}, one report per CSV (DESIGN §16)')
    check_files.set_defaults(run=_check)

    check = commands.add_parser("check-config", parents=[common], help="print the effective configuration and check every bucket and mailbox",
                                description="Print the effective configuration (secrets masked), check that each bucket is reachable and "
                                            "writable, and log in to each [[imap]] mailbox and count its messages; formats of "
                                            "[formats] path that cannot be checked are warning lines (exit 0).")
    check.set_defaults(run=_run(_check_config), writes=True)

    env_file = commands.add_parser("env-file", help="read an environment file as systemd does; run a command with it",
                                   description="Read FILE as systemd's EnvironmentFile= reads it (KEY=VALUE lines; # or ; "
                                               "starts a comment line; no comments after a value; quotes and backslashes as "
                                               "in docs/configuration.md#environment-files) and run COMMAND with those variables "
                                               "added to the environment (esmail-admin does). Without COMMAND, list each "
                                               "variable with its length (values are not shown). A missing FILE sets nothing.")
    env_file.add_argument("file", metavar="FILE", help="e.g. /etc/esmail/env")
    env_file.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND …", help="the command to run, with its arguments")
    env_file.set_defaults(run=_env_file)
    return parser


def _env_file(args) -> int:
    from esmail import envfile

    try:
        values, ignored = envfile.read(args.file)
    except ConfigError as exc:
        print(f"esmail env-file: {exc}", file=sys.stderr)
        return 2
    for note in ignored:
        print(f"esmail env-file: {note}", file=sys.stderr)
    if args.command:
        try:
            os.execvpe(args.command[0], args.command, {**os.environ, **values})
        except OSError as exc:
            print(f"esmail env-file: cannot run {args.command[0]}: {exc.strerror or exc}", file=sys.stderr)
            return 127
    if not Path(args.file).exists():
        print(f"{args.file}: no such file (systemd starts the service without it: EnvironmentFile=-…)")
    elif not values:
        print(f"{args.file}: no variables (every line is blank or a comment)")
    for name, value in values.items():
        problem = config_module.secret_problem(value)
        print(f"{name}: {logs.counted(len(value), 'character')}{f'; {problem}' if problem else ''}")
    return 0


def _run(coroutine):
    def run(config: Config, args) -> int:
        import asyncio

        return asyncio.run(coroutine(config, args))
    return run


async def _serve(config: Config, args) -> int:
    return await _daemon(config, listen=True)


async def _poll(config: Config, args) -> int:
    if not config.imap:
        print("esmail poll: no [[imap]] mailbox in the config; see config.example.toml", file=sys.stderr)
        return 2
    return await _daemon(config, listen=False)


async def _daemon(config: Config, listen: bool) -> int:
    import asyncio
    import signal

    from esmail.daemon import Daemon
    from esmail.errors import CannotListen

    daemon = Daemon(config, listen)  # a ConfigError (the spool, the TLS pair) is main()'s to say
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    if daemon.smtp:
        loop.add_signal_handler(signal.SIGHUP, daemon.smtp.reload_tls)
    try:
        return await daemon.run()
    except CannotListen as exc:
        print(f"esmail {'serve' if listen else 'poll'}: {exc}", file=sys.stderr)
        return 1


async def _ingest(config: Config, args) -> int:
    from esmail import mail
    from esmail.errors import TemporaryFailure
    from esmail.history import open_history
    from esmail.keys import domain_of, prefix_of
    from esmail.spool import Spool
    from esmail.store import open_store
    from esmail.worker import Worker

    if args.recipient and not prefix_of(args.recipient):
        print(f"esmail ingest: --recipient {args.recipient!r} has no usable local part (a-z 0-9 . _ + -)", file=sys.stderr)
        return 2
    spool = Spool(config.spool.path)
    status = 0
    queued = []
    for name in args.files:
        raw = _read_message(name, config.smtp.max_message_size)
        if raw is None:
            status = 1
            continue
        if args.recipient:
            prefix = prefix_of(args.recipient)
        else:
            address = mail.header_recipient(mail.parse_headers(raw), config.smtp.domains)
            prefix = prefix_of(address) if address else None
            if address and config.smtp.domains and domain_of(address) not in config.smtp.domains:
                log.warning("%s: no recipient in [smtp] domains (%s); the prefix %r comes from %s (X-Forwarded-To, else the "
                            "first To); give --recipient to choose", name, ", ".join(config.smtp.domains), prefix, address)
        if prefix is None:
            print(f"esmail ingest: {name}: no usable recipient in its headers; stored whole in the unprocessable bucket "
                  f"(--recipient ADDR gives it one)", file=sys.stderr)
            status = 1
        envelope = spool.accept(raw, [prefix] if prefix else [], recipients=(args.recipient,) if args.recipient else (), origin="ingest")
        queued.append((name, envelope.id))
    store = open_store(config)
    history = open_history(config)
    worker = Worker(config, spool, store, processes=True, history=history)
    try:
        await worker.remember_checks()
        for name, entry_id in queued:
            try:
                stored = await worker.process_with_retries(entry_id, attempts=3)
            except TemporaryFailure as exc:
                print(f"esmail ingest: {name}: {exc}; it stays in the spool as {entry_id}", file=sys.stderr)
                status = 1
                continue
            for item in stored:
                print(item, flush=True)
            for prefix, reason in spool.held(entry_id).items():
                print(f"quarantined: {prefix}: {reason}", flush=True)
    finally:
        worker.close()
        history.close()
        await store.close()
    return status


def _read_message(name: str, limit: int) -> bytes | None:
    """A message from a file, or from standard input for `-`; None (said on stderr) when it cannot be read or is too big."""
    from esmail.spool import user_name

    try:
        if name == "-":
            raw = sys.stdin.buffer.read(limit + 1)
            size = len(raw)
        else:
            size = Path(name).stat().st_size
            raw = Path(name).read_bytes() if size <= limit else b""
    except OSError as exc:
        hint = f" (esmail runs as {user_name()}: put the file where that user can read it, or pipe it in: esmail ingest - < FILE)" \
            if isinstance(exc, PermissionError) else ""
        print(f"esmail ingest: {name}: {exc.strerror or exc}{hint}", file=sys.stderr)
        return None
    if size > limit:
        print(f"esmail ingest: {name}: {'over ' if name == '-' else ''}{size:,} bytes is over [smtp] max_message_size ({limit:,})", file=sys.stderr)
        return None
    return raw


def _history_copy(config: Config, args) -> int:
    from esmail.history import host_name

    try:
        url = config_module.database_url(args.to)
    except ValueError as exc:
        print(f"esmail history copy: --to {exc if isinstance(exc, config_module.SecretError) else 'must be a postgresql:// URL'}",
              file=sys.stderr)
        return 2
    source = config.spool.path / "history.sqlite"
    if not source.is_file():
        print(f"esmail history copy: there is no history at {source} ([spool] path)", file=sys.stderr)
        return 1
    import psycopg

    from esmail.history.copy import copy

    password = config.secrets.get(config.history.password_env) if config.history.password_env else None
    try:
        count = copy(config.spool.path, host_name(config), url, password)
    except psycopg.Error as exc:
        print(f"esmail history copy: {url}: {str(exc).strip()}", file=sys.stderr)
        return 1
    print(f"copied {logs.counted(count, 'message')} from {source} to {url}")
    return 0


def _read(command: str, name: str) -> bytes | None:
    """A file's bytes; None (said on stderr, naming the command and the file) when it cannot be read."""
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        print(f"esmail {command}: {name}: {exc.strerror or exc}", file=sys.stderr)
        return None


def _convert(config: Config, args) -> int:
    from esmail import chain

    out_dir = Path(args.out)
    status = 0
    for name in args.files:
        data = _read("convert", name)
        if data is None:
            status = 1
            continue
        for output in chain.route(Path(name).name, data, config.csv.ascii_only):
            if output.bucket != chain.AMR_DATA:
                print(f"esmail convert: {name}: {output.name} cannot be converted: {output.reason}", file=sys.stderr)
                status = 1
                continue
            target = out_dir / output.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(output.data)
            print(f"{target}\t{len(output.data)}")
    return status


def _check(config: Config, args) -> int:
    """`esmail check`: each file converted as the daemon would, and the report of each CSV (DESIGN §16)."""
    import json
    from dataclasses import asdict

    from esmail.chain import AMR_DATA
    from esmail.conversion import convert, convert_files
    from esmail.keys import prefix_of

    prefix = prefix_of(args.feed)
    fmt = config.feed_formats.get(prefix or "")
    if fmt is None:
        print(f"esmail check: --feed {args.feed!r} has no format: give its [[feed]] a [feed.format] (the importer's configuration), "
              "or set [formats] path to the importer's export", file=sys.stderr)
        return 2
    reports, status = [], 0
    for name in args.files:
        data = _read("check", name)
        if data is None:
            return 2
        if name.lower().endswith(".eml"):
            converted = convert(data, config.csv.ascii_only, config.links.patterns, {prefix: fmt})
            if converted.links:
                print(f"esmail check: {name}: the message has no attachments but {len(converted.links)} links; "
                      "esmail check does not download them", file=sys.stderr)
        else:
            converted = convert_files([(Path(name).name, data)], config.csv.ascii_only, {prefix: fmt})
        for out in converted.outputs:
            if out.bucket != AMR_DATA:
                print(f"esmail check: {name}: {out.name} would go to unprocessable: {out.reason}", file=sys.stderr)
                status = 1
                continue
            found = converted.checks[prefix][out.name]
            reports.append(found)
            status = status or int(not found.would_import)
    if args.json:
        print(json.dumps({"files": [asdict(found) for found in reports]}, ensure_ascii=False))
    for found in [] if args.json else reports:
        print(f"{found.name}: {found.verdict}\n  {found.summary()}")
        if found.notes:
            print("  notes: " + ", ".join(f"{note} {n}" for note, n in found.notes.items()))
        for example in found.examples:
            print(f"  line {example.line} ({', '.join(example.warnings)}): {example.text[:100]}{'…' if len(example.text) > 100 else ''}")
    return status


async def _check_config(config: Config, args) -> int:
    import asyncio

    from esmail import history, resolver
    from esmail.dns_health import probe_name
    from esmail.imap import count_messages, describe, login_for
    from esmail.store import open_store

    print(config.describe())
    for warning in config.warnings:
        print(f"warning {warning}")
    status = 0
    for check in (_check_spool, _check_tls):
        line = check(config)
        if line is not None:
            print(line)
            status = status or int(line.startswith("FAILED"))
    store = open_store(config)
    try:
        for logical in ("inbox", "amr_data", "unprocessable"):
            bucket = config.buckets.named(logical)
            try:
                await store.check(bucket)
                print(f"ok      {logical}: {bucket} is writable")
            except Exception as exc:
                print(f"FAILED  {logical}: {bucket}: {exc}")
                status = 1
    finally:
        await store.close()
    try:
        print(f"ok      history {await asyncio.to_thread(history.probe, config)}")
    except Exception as exc:
        print(f"FAILED  history {config.history.url or config.spool.path}: {str(exc).strip()}")
        status = 1
    if config.feeds:
        name = probe_name(config)
        try:
            print(f"ok      dns: {await asyncio.to_thread(resolver.probe, config.dns, name)}")
        except resolver.DnsTrouble as exc:
            print(f"FAILED  dns: {exc} ([dns] nameservers; SPF, DKIM and DMARC need a resolver that answers)")
            status = 1
    for box in config.imap:
        login = login_for(box, config.secrets)
        try:
            count = await asyncio.to_thread(count_messages, box, login)
        except Exception as exc:
            print(f"FAILED  imap {box}: {describe(exc, box)}")
            status = 1
            continue
        token = ""
        if box.auth == "oauth2":
            expires = datetime.fromtimestamp(login.tokens.expires_at, timezone.utc)
            token = f"; OAuth2 token ({login.tokens.grant} grant) valid until {expires:%Y-%m-%d %H:%M:%S} UTC"
        print(f"ok      imap {box}: {logs.counted(count, 'message')} in {box.folder}{token}")
    return status


def _check_spool(config: Config) -> str:
    """What `serve` needs of the spool: its folders made and writable, and room above [spool] min_free."""
    from esmail.errors import TemporaryFailure
    from esmail.spool import Spool

    try:
        spool = Spool(config.spool.path, config.spool.min_free)
        spool.check_writable()
    except (ConfigError, TemporaryFailure) as exc:
        return f"FAILED  spool: {exc}"
    return f"ok      spool: {config.spool.path} is writable, {len(spool.pending())} queued, {len(spool.failed_ids())} failed"


def _check_tls(config: Config) -> str | None:
    """The STARTTLS certificate and key load as `serve` loads them."""
    if config.smtp.tls_cert is None:
        return None
    from esmail.smtp import certificate_expiry, tls_context

    try:
        tls_context(config.smtp)
    except ConfigError as exc:
        return f"FAILED  tls: {exc}"
    expires = certificate_expiry(config.smtp.tls_cert)
    until = f", valid until {datetime.fromtimestamp(expires, timezone.utc):%Y-%m-%d %H:%M} UTC" if expires else ""
    return f"ok      tls: {config.smtp.tls_cert} and its key load{until}"


def _send(config: Config, args) -> int:
    import mimetypes
    import smtplib
    import ssl
    from email.message import EmailMessage
    from email.utils import make_msgid

    try:
        host, port = config_module.parse_address(args.server) if args.server else config.smtp.listen
    except ValueError:
        print(f"esmail send: --server {args.server!r} must be HOST:PORT, e.g. mx.example.org:25", file=sys.stderr)
        return 2
    if "@" not in args.to.strip("<>")[1:]:
        print(f"esmail send: --to {args.to!r} needs a domain: the prefix is the local part of a whole address, "
              f"e.g. {args.to.strip('<>@') or 'sheffield'}@datafeeds.example.org", file=sys.stderr)
        return 2
    msg = EmailMessage()
    msg["From"], msg["To"] = args.sender, args.to
    msg["Subject"] = "esmail send: " + ", ".join(Path(name).name for name in args.files)
    msg["Message-ID"] = make_msgid(domain="esmail.send")
    msg["Date"] = datetime.now(timezone.utc)
    msg.set_content(f"{len(args.files)} file(s) attached by esmail send.\n")
    for name in args.files:
        data = _read("send", name)
        if data is None:
            return 1
        maintype, subtype = (mimetypes.guess_type(name)[0] or "application/octet-stream").split("/", 1)
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=Path(name).name)
    try:
        with smtplib.SMTP(host, port, timeout=120) as client:
            client.ehlo()
            if client.has_extn("starttls"):
                context = ssl.create_default_context()
                if args.insecure:
                    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                client.starttls(context=context)
                client.ehlo()
            raw = msg.as_bytes()
            size = [f"SIZE={len(raw)}"] if client.has_extn("size") else []
            steps = (("MAIL FROM", lambda: client.mail(args.sender, size)),
                     ("RCPT TO", lambda: client.rcpt(args.to)),
                     ("DATA", lambda: client.data(raw)))
            for step, send_step in steps:
                code, reply = send_step()
                if code >= 400:
                    print(f"esmail send: {step} refused: {code} {reply.decode(errors='replace')}", file=sys.stderr)
                    return 1
    except ssl.SSLCertVerificationError as exc:
        print(f"esmail send: cannot send to {host}:{port}: its TLS certificate is not trusted ({exc.verify_message}); "
              "for a test server with a self-signed certificate use --insecure, or name its CA in SSL_CERT_FILE", file=sys.stderr)
        return 1
    except (OSError, smtplib.SMTPException) as exc:
        print(f"esmail send: cannot send to {host}:{port}: {exc}", file=sys.stderr)
        return 1
    print(f"{host}:{port}: {code} {reply.decode(errors='replace')}")
    return 0


def _existing_spool(config: Config, command: str):
    from esmail.spool import Spool

    if not config.spool.path.is_dir():
        print(f"esmail spool {command}: there is no spool at {config.spool.path} ([spool] path)", file=sys.stderr)
        return None
    return Spool(config.spool.path)


def _spool_list(config: Config, args) -> int:
    spool = _existing_spool(config, "list")
    if spool is None:
        return 1
    now = datetime.now(timezone.utc)
    rows = [("ID", "STATE", "AGE", "RECIPIENTS", "ATTEMPTS", "LAST ERROR")]
    for state, ids, folder in (("queued", spool.pending(), spool.queue), ("failed", spool.failed_ids(), spool.failed),
                               ("quarantined", spool.quarantined_ids(), spool.quarantine_dir)):
        for entry_id in ids:
            try:
                envelope = spool.envelope(entry_id, folder)
            except (OSError, ValueError):
                continue  # finished while we looked
            age = config_module.describe_age((now - envelope.received_at).total_seconds())
            if state == "quarantined":
                rows += [(entry_id, state, age, prefix, "-", reason) for prefix, reason in envelope.held.items()]
                continue
            entry = spool.read_state(entry_id)
            recipients = ",".join(envelope.recipients) or ",".join(envelope.folders) or "-"
            rows.append((entry_id, state, age, recipients, str(entry.attempts), entry.reason or entry.last_error or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[5])
    return 0


def _spool_release(config: Config, args) -> int:
    spool = _existing_spool(config, "release")
    if spool is None:
        return 1
    missing = [entry_id for entry_id in args.ids if entry_id not in set(spool.quarantined_ids())]
    if missing:
        print(f"esmail spool release: not in {spool.quarantine_dir}: {', '.join(missing)} (see `esmail spool list`)", file=sys.stderr)
        return 1
    try:
        released = spool.release(args.ids, by=_command_user("release"))
    except FileExistsError as exc:
        print(f"esmail spool release: {exc} is still being processed; try again in a minute", file=sys.stderr)
        return 1
    for envelope in released:
        for prefix, reason in envelope.held.items():
            print(f"released {envelope.id} for {prefix} (was: {reason})")
    print("a running esmail serve or poll takes them within a minute")
    return 0


def _command_user(action: str) -> str:
    """Who retried or released an entry from the command line, as the page shows it: `root, esmail spool retry`."""
    from esmail.spool import user_name

    return f"{user_name()}, esmail spool {action}"


def _spool_retry(config: Config, args) -> int:
    spool = _existing_spool(config, "retry")
    if spool is None:
        return 1
    failed = set(spool.failed_ids())
    missing = [entry_id for entry_id in args.ids if entry_id not in failed]
    if missing:
        print(f"esmail spool retry: not in {spool.failed}: {', '.join(missing)} (see `esmail spool list`)", file=sys.stderr)
        return 1
    moved = spool.retry(args.ids or None, by=_command_user("retry"))
    if not moved:
        print("no failed entries to retry")
        return 0
    print(f"{logs.counted(len(moved), 'entry', 'entries')} moved back to the queue; a running esmail serve takes them within a minute")
    return 0
