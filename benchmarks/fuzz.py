"""The fuzzer's long mode: tests/test_fuzz.py with many more examples than CI runs.

    python benchmarks/fuzz.py                 # 5,000 mutated messages, 1,250 arbitrary byte strings
    python benchmarks/fuzz.py --examples 50000

A failure prints the smallest input hypothesis found; it is also kept in
.hypothesis/ so that the next plain `python -m pytest` tries it first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5_000, help="mutated messages to try (default 5,000)")
    args = parser.parse_args()
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_fuzz.py", "-q", "-p", "no:warnings", "--hypothesis-show-statistics"],
                            cwd=ROOT, env={**os.environ, "ESMAIL_FUZZ_EXAMPLES": str(args.examples)})
    print(f"\n{args.examples:,} mutated messages and {max(args.examples // 4, 20):,} arbitrary byte strings "
          f"in {time.monotonic() - started:.0f}s: {'no invariant broken' if result.returncode == 0 else 'FAILED'}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
