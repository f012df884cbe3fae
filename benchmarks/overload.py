"""Overload soak: array-1.0 frames streamed as fast as a socket takes them into the ``defects``
consumer (overflow policy ``latest``) of a daemon started as users start it (``beamlens run
--config``), for ``--duration`` seconds (default 10 minutes). The frame numbers climb for the whole
soak, so the open-ended run's map must become a rolling window instead of following them.

Every ``--every`` seconds one JSON line reports the daemon's RSS and its frame counters; at the end
one line per figure:

- ``rss_growth_mib``: RSS at the end less RSS after the first 10 s, target ``<=`` the configured
  ``limits.memory_budget_mib`` (the daemon must hold its budget);
- ``rss_max_mib``: the highest RSS sampled;
- ``counter_identity_gap``: image messages received - (processed + dropped by reason except gap +
  rejected), after the sender stopped and the daemon went quiet; target ``== 0``;
- ``frames_received_per_s``, ``frames_processed_per_s``;
- ``alive``: 1 if the daemon was live (``/health/live`` 200) at the end.

    python benchmarks/overload.py --duration 60
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import DaemonProcess, http_get, rss_mib, scrape  # noqa: E402

from beamlens.daemon.sim.detectors import DetectorEmulator  # noqa: E402


def counters(url: str) -> dict[str, float]:
    m = scrape(url)
    out = {"received": 0.0, "processed": 0.0, "rejected": 0.0, "gap": 0.0}
    for (name, labels), v in m.items():
        lab = dict(labels)
        if name == "beamlens_frames_received_total":
            out["received"] += v
        elif name == "beamlens_frames_processed_total":
            out["processed"] += v
        elif name == "beamlens_frames_dropped_total":
            key = "gap" if lab["reason"] == "gap" else f"dropped_{lab['reason']}"
            out[key] = out.get(key, 0.0) + v
        elif name == "beamlens_frame_decode_errors_total":
            out["rejected"] += v
        elif name == "beamlens_internal_errors_total":
            out["internal_errors"] = out.get("internal_errors", 0.0) + v
        elif name == "beamlens_result_buffer_bytes":
            out["result_buffer_mib"] = round(v / 2**20, 1)
    out["identity_gap"] = out["received"] - out["processed"] - out["rejected"] - sum(
        v for k, v in out.items() if k.startswith("dropped_"))
    return out


def emit(figure: str, value: float, unit: str, target: str | None) -> None:
    print(json.dumps({"benchmark": "overload", "figure": figure, "value": value, "unit": unit, "target": target}),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of streaming")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between progress lines")
    ap.add_argument("--size", type=int, default=256, help="frame edge, px")
    ap.add_argument("--budget-mib", type=float, default=1024.0, help="limits.memory_budget_mib of the daemon")
    args = ap.parse_args()

    from defects import movie_frames
    frames = movie_frames(16, args.size).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp, DetectorEmulator("array-1.0", sndhwm=64) as emu:
        config = Path(tmp) / "overload.yaml"
        config.write_text(f"""
log_level: INFO
http: {{port: 0}}
sources:
  frames:
    - {{name: stem, format: array-1.0, address: "{emu.address}", overflow: latest}}
consumers:
  - {{name: defects, class: defects, params: {{threads: 1, providers: [CPUExecutionProvider]}}}}
limits: {{memory_budget_mib: {args.budget_mib}}}
""")
        daemon = DaemonProcess(config)
        stop = threading.Event()
        sent = [0]

        def sender() -> None:
            header = {"htype": "array-1.0", "type": "float32", "shape": [args.size, args.size], "source": "overload"}
            n = 0
            while not stop.is_set():
                frame = frames[n % len(frames)]
                emu.socket.send_multipart([json.dumps({**header, "frame": n}).encode(), frame], copy=False)
                n += 1
            sent[0] = n

        t = threading.Thread(target=sender, daemon=True)
        t0 = time.monotonic()
        t.start()
        rss_base = rss_max = rss_mib(daemon.proc.pid)
        based = False
        try:
            next_line = t0 + args.every
            while time.monotonic() - t0 < args.duration:
                time.sleep(min(1.0, max(0.0, next_line - time.monotonic())))
                rss = rss_mib(daemon.proc.pid)
                rss_max = max(rss_max, rss)
                if not based and time.monotonic() - t0 >= 10:
                    rss_base, based = rss, True
                if time.monotonic() >= next_line:
                    next_line += args.every
                    print(json.dumps({"benchmark": "overload", "t_s": round(time.monotonic() - t0, 1),
                                      "rss_mib": round(rss, 1), **counters(daemon.url)}), flush=True)
            stop.set()
            t.join(30)
            elapsed = time.monotonic() - t0
            last, quiet_since = None, time.monotonic()
            while time.monotonic() - quiet_since < 3 and time.monotonic() - t0 < args.duration + 120:
                c = counters(daemon.url)
                if c != last:
                    last, quiet_since = c, time.monotonic()
                time.sleep(0.5)
            c = counters(daemon.url)
            print(json.dumps({"benchmark": "overload", "final": True, "sent": sent[0], **c}), flush=True)
            rss = rss_mib(daemon.proc.pid)
            emit("rss_start_mib", round(rss_base, 1), "MiB", None)
            emit("rss_end_mib", round(rss, 1), "MiB", None)
            emit("rss_growth_mib", round(rss - rss_base, 1), "MiB", f"<= {args.budget_mib:g}")
            emit("rss_max_mib", round(rss_max, 1), "MiB", None)
            emit("counter_identity_gap", c["identity_gap"], "frames", "== 0")
            emit("frames_received_per_s", round(c["received"] / elapsed, 1), "1/s", None)
            emit("frames_processed_per_s", round(c["processed"] / elapsed, 1), "1/s", None)
            status, _, _ = http_get(daemon.url + "/health/live")
            emit("alive", 1.0 if status == 200 and daemon.proc.poll() is None else 0.0, "bool", "== 1")
        finally:
            stop.set()
            daemon.close()


if __name__ == "__main__":
    main()
