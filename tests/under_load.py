"""Run the test suite with every core this process may use kept busy (``make test-under-load``).

Starts one busy process per core (``os.sched_getaffinity``; ``--hogs`` to change), each spinning
pure-Python arithmetic at normal priority, runs ``pytest`` ``--runs`` times in a row (default 3, the
issue's "three consecutive green runs") and stops at the first red run. The hogs are this script's
own children and are terminated, by pid, however the runs end. Extra arguments go to pytest.

    python tests/under_load.py [--runs 3] [--hogs N] [pytest args...]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time


def _spin() -> None:
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hogs", type=int, default=len(os.sched_getaffinity(0)))
    args, pytest_args = ap.parse_known_args(argv)
    ctx = multiprocessing.get_context("spawn")
    hogs = [ctx.Process(target=_spin, name=f"cpu-hog-{i}", daemon=True) for i in range(args.hogs)]
    for h in hogs:
        h.start()
    print(f"{len(hogs)} CPU hogs running (pids {[h.pid for h in hogs]})", flush=True)
    try:
        for run in range(1, args.runs + 1):
            t0 = time.monotonic()
            rc = subprocess.call([sys.executable, "-m", "pytest", "-q", *pytest_args])
            print(f"run {run}/{args.runs} under load: {'green' if rc == 0 else 'RED'} in {time.monotonic() - t0:.0f} s", flush=True)
            if rc != 0:
                return rc
        return 0
    finally:
        for h in hogs:
            h.terminate()
        for h in hogs:
            h.join(5)


if __name__ == "__main__":
    sys.exit(main())
