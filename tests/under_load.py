"""Run the test suite with every core this process may use kept busy (``make test-under-load``).

Starts one busy process per core (``os.sched_getaffinity``; ``--hogs`` to change), each spinning
pure-Python arithmetic at normal priority, runs ``pytest`` ``--runs`` times in a row (default 3, the
issue's "three consecutive green runs") and stops at the first red run (``--keep-going``: run them
all, to see which tests fail in which run). After each run it prints one line with the run's result,
duration and test counts, and the node id of every test that failed or errored in it (read from
the run's JUnit XML report); at the end one line per run again. The hogs are this script's own
children and are terminated, by pid, however the runs end. Extra arguments go to pytest.

    python tests/under_load.py [--runs 3] [--hogs N] [--keep-going] [pytest args...]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path


def _spin() -> None:
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF


def failures(report: Path) -> tuple[dict[str, int], list[str]]:
    """Counts (tests, failures, errors, skipped) and the failed/errored test ids of a JUnit XML
    report written by ``pytest --junitxml``; empty when pytest wrote none (e.g. a usage error)."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    try:
        root = ET.parse(report).getroot()
    except (OSError, ET.ParseError):
        return counts, failed
    for suite in root.iter("testsuite"):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
    for case in root.iter("testcase"):
        for outcome in ("failure", "error"):
            if case.find(outcome) is not None:
                failed.append(node_id(case.get("classname", ""), case.get("name", ""))
                              + (" (error)" if outcome == "error" else ""))
    return counts, failed


def node_id(classname: str, name: str) -> str:
    """pytest's node id (``tests/test_x.py::TestY::test_z``) from a JUnit ``classname``
    (``tests.test_x.TestY``): the longest dotted prefix that names an existing ``.py`` file."""
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if Path(path).is_file():
            return "::".join([path, *parts[i:], name])
    return f"{classname}::{name}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hogs", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--keep-going", action="store_true", help="run every run even after a red one")
    args, pytest_args = ap.parse_known_args(argv)
    ctx = multiprocessing.get_context("spawn")
    hogs = [ctx.Process(target=_spin, name=f"cpu-hog-{i}", daemon=True) for i in range(args.hogs)]
    for h in hogs:
        h.start()
    print(f"{len(hogs)} CPU hogs running (pids {[h.pid for h in hogs]})", flush=True)
    summary: list[str] = []
    worst = 0
    try:
        with tempfile.TemporaryDirectory(prefix="under-load-") as tmp:
            for run in range(1, args.runs + 1):
                report = Path(tmp) / f"run{run}.xml"
                t0 = time.monotonic()
                rc = subprocess.call([sys.executable, "-m", "pytest", "-q", f"--junitxml={report}", *pytest_args])
                counts, failed = failures(report)
                line = (f"run {run}/{args.runs} under load: {'green' if rc == 0 else 'RED'} in {time.monotonic() - t0:.0f} s"
                        f" ({counts['tests']} tests, {counts['failures']} failed, {counts['errors']} errors,"
                        f" {counts['skipped']} skipped)")
                summary.append(line + "".join(f"\n    {f}" for f in failed))
                print(summary[-1], flush=True)
                worst = worst or rc
                if rc != 0 and not args.keep_going:
                    break
    finally:
        for h in hogs:
            h.terminate()
        for h in hogs:
            h.join(5)
    print("under load:\n" + "\n".join(summary), flush=True)
    return worst


if __name__ == "__main__":
    sys.exit(main())
