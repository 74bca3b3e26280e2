"""The `esmail` command line (DESIGN §9). Exit codes: 0 done, 1 something failed, 2 usage or config error."""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from esmail import __version__, chain, config as config_module, mail
from esmail.config import Config
from esmail.errors import ConfigError, TemporaryFailure
from esmail.keys import prefix_of
from esmail.spool import Spool
from esmail.store import open_store
from esmail.worker import Worker

log = logging.getLogger("esmail")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "warning").upper(), format="esmail: %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        config = config_module.load(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"esmail: config error: {exc}", file=sys.stderr)
        return 2
    return args.run(config, args)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given before the command is not reset by the command's own parser
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help=f"TOML config file (default: ${config_module.CONFIG_ENV}, else the embedded default)")
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"], help="default: warning")
    parser = argparse.ArgumentParser(prog="esmail", description="Receive data feeds by email and store them as clean UTF-8 CSV.", parents=[common])
    parser.add_argument("--version", action="version", version=f"esmail {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    ingest = commands.add_parser("ingest", parents=[common], help="process .eml files through the spool, worker and store",
                                 description="Process raw messages (.eml) as if they had just been received: every object goes to the "
                                             "configured store, and one line per object is printed (bucket, key, bytes).")
    ingest.add_argument("files", nargs="+", metavar="FILE.eml")
    ingest.add_argument("--recipient", metavar="ADDR", help="envelope recipient, e.g. sheffield@datafeeds.example.org (default: from the headers)")
    ingest.set_defaults(run=_run(_ingest))

    convert = commands.add_parser("convert", parents=[common], help="run the conversion chain alone on local files",
                                  description="Convert xlsx, xls, csv and zip files to normalised CSV files in a folder.")
    convert.add_argument("files", nargs="+", metavar="FILE")
    convert.add_argument("--out", metavar="DIR", default=".", help="output folder (default: the current folder)")
    convert.set_defaults(run=_convert)

    check = commands.add_parser("check-config", parents=[common], help="print the effective configuration and check every bucket",
                                description="Print the effective configuration (secrets masked) and check that each bucket is reachable and writable.")
    check.set_defaults(run=_run(_check_config))
    return parser


def _run(coroutine):
    return lambda config, args: asyncio.run(coroutine(config, args))


def process_pool(config: Config) -> ProcessPoolExecutor:
    """The pool that runs conversions off the event loop."""
    workers = config.worker.processes or os.cpu_count() or 1
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


async def _ingest(config: Config, args) -> int:
    if args.recipient and not prefix_of(args.recipient):
        print(f"esmail ingest: --recipient {args.recipient!r} has no usable local part (a-z 0-9 . _ + -)", file=sys.stderr)
        return 2
    spool = Spool(config.spool.path)
    status = 0
    queued = []
    for name in args.files:
        try:
            size = Path(name).stat().st_size
            if size > config.smtp.max_message_size:
                print(f"esmail ingest: {name}: {size:,} bytes is over [smtp] max_message_size ({config.smtp.max_message_size:,})", file=sys.stderr)
                status = 1
                continue
            raw = Path(name).read_bytes()
        except OSError as exc:
            print(f"esmail ingest: {name}: {exc.strerror or exc}", file=sys.stderr)
            status = 1
            continue
        if args.recipient:
            prefix = prefix_of(args.recipient)
        else:
            prefix = mail.header_prefix(mail.parse_headers(raw), config.smtp.domains)
        if prefix is None:
            print(f"esmail ingest: {name}: no usable recipient in its headers; stored whole in the unprocessable bucket", file=sys.stderr)
            status = 1
        envelope = spool.accept(raw, [prefix] if prefix else [], recipients=(args.recipient,) if args.recipient else (), origin="ingest")
        queued.append((name, envelope.id))
    store = open_store(config)
    try:
        with process_pool(config) as pool:
            worker = Worker(config, spool, store, pool)
            for name, entry_id in queued:
                try:
                    stored = await worker.process_with_retries(entry_id, attempts=3)
                except TemporaryFailure as exc:
                    print(f"esmail ingest: {name}: {exc}; it stays in the spool as {entry_id}", file=sys.stderr)
                    status = 1
                    continue
                for item in stored:
                    print(item, flush=True)
    finally:
        await store.close()
    return status


def _convert(config: Config, args) -> int:
    out_dir = Path(args.out)
    status = 0
    for name in args.files:
        try:
            data = Path(name).read_bytes()
        except OSError as exc:
            print(f"esmail convert: {name}: {exc.strerror or exc}", file=sys.stderr)
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


async def _check_config(config: Config, args) -> int:
    print(config.describe())
    store = open_store(config)
    status = 0
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
    return status
