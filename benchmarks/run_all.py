"""Run every benchmark in turn (``make bench``); each prints its own JSON lines on stdout.

The soak benchmark (``benchmarks/soak.py``) runs for hours and is left out: run it by hand.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"run_all.py", "soak.py", "overload.py"}


def main() -> int:
    failed = []
    for script in sorted(HERE.glob("*.py")):
        if script.name in SKIP:
            continue
        result = subprocess.run([sys.executable, str(script)], stderr=subprocess.DEVNULL)
        if result.returncode:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
