"""How fast the short commands start: `esmail --help`, `convert`, `send`, `spool list`, `check` (target: ≤ 0.1 s of imports).

    python benchmarks/start.py [--runs 15]

For each command, in one run: the seconds its imports take (`python -X
importtime`, everything imported after the interpreter's own start-up, the
command's lazy imports included), and its whole-process wall time (median of
--runs), against `python -c pass` as the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = "import sys; from esmail.cli import main; sys.argv[0] = 'esmail'; sys.exit(main(sys.argv[1:]))"


def import_seconds(argv: list[str], env: dict) -> float:
    """Seconds of imports that `-X importtime` reports after `site` (the interpreter's own start-up)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", RUN, *argv], capture_output=True, text=True, env=env)
    total, after_site = 0, False
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        if name.strip() == "site" and not name.startswith("  "):
            after_site = True
            continue
        if after_site and not name[1:].startswith(" "):  # a top-level import: its cumulative time includes its children
            total += int(cumulative)
    return total / 1e6


def wall_seconds(argv: list[str], env: dict, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, capture_output=True, env=env)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="esmail-start-"))
    try:
        (work / "readings.csv").write_bytes(b"MPAN,00:30\r\n2200013680374,1.5\r\n")
        (work / "esmail.toml").write_text(f'[spool]\npath = "{work / "spool"}"\n[storage]\npath = "{work / "data"}"\n'
                                          '[[feed]]\nprefix = "sheffield"\n[feed.format]\nheader_example = "MPAN,00:30"\n'
                                          'date_format = "%d/%m/%Y"\nmpan_mprn_field = "MPAN"\nreading_date_field = "MPAN"\n'
                                          'reading_fields = ["00:30"]\nrow_per_reading = true\n')
        (work / "spool").mkdir()
        env = {**os.environ, "ESMAIL_CONFIG": str(work / "esmail.toml")}
        commands = {
            "--help": ["--help"],
            "convert": ["convert", "--out", str(work / "out"), str(work / "readings.csv")],
            "send": ["send", "--server", "127.0.0.1:9", "--to", "a@datafeeds.example.org", str(work / "readings.csv")],  # refused: imports, then exit 1
            "spool list": ["spool", "list"],
            "check": ["check", "--feed", "sheffield", str(work / "readings.csv")],  # what the importer makes of it (DESIGN §16)
        }
        baseline = wall_seconds([sys.executable, "-c", "pass"], env, args.runs)
        print(f"python -c pass: {baseline * 1000:.0f} ms (the interpreter's own start, the baseline)\n")
        print(f"{'command':17} {'imports ms':>10} {'wall ms':>8}   wall over the baseline   (target: imports ≤ 100 ms)")
        for name, argv in commands.items():
            imports = statistics.median(import_seconds(argv, env) for _ in range(5))
            wall = wall_seconds([sys.executable, "-c", RUN, *argv], env, args.runs)
            print(f"esmail {name:10} {imports * 1000:10.0f} {wall * 1000:8.0f}   +{(wall - baseline) * 1000:.0f} ms ({wall / baseline:.1f}×)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
