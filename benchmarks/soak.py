"""Soak: an accelerated night of acquisition through one daemon, watching for leaks and losses.

Runs back to back, alternating:

- a spectral map run (``--points`` spectra of the real STXM data, 123 channels) published as
  Bluesky documents through a real bluesky 0MQ Proxy, analysed by ``stats`` and ``pca``;
- a detector series (``--frames-per-run`` frames of ``--frame-px`` square uint16, DECTRIS stream v2,
  bitshuffle-LZ4) from an emulated detector over a PUSH socket, analysed by ``frame_stats``.

After each run it checks the accounting: events sent = processed + counted missing, frames sent =
processed + counted dropped + counted undecodable; anything else is an unaccounted loss. It samples
the process's resident memory, open file descriptors and threads, prints a timeline to stderr and
the summary figures as JSON lines on stdout. "Hours equivalent" assumes one run per
``--nominal-run-s`` of real beamtime (default 120 s).

    python benchmarks/soak.py                          # ~1,000,000 frames, several minutes
    python benchmarks/soak.py --runs 20 --frames-per-run 500   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from bluesky.callbacks.zmq import Publisher
from event_model import compose_run

from beamlens.daemon.app import Daemon
from beamlens.daemon.config import load_config
from beamlens.daemon.documents import msgpack_serializer
from beamlens.daemon.sim.beamline import wait_until_subscribed
from beamlens.daemon.sim.datasets import stxm_map
from beamlens.daemon.sim.detectors import DetectorEmulator, synthetic_frames
from beamlens.daemon.sim.proxy import ProxyProcess

CONFIG = """
http: {{port: 0}}
log_level: WARNING
sources:
  bluesky:
    - {{name: soak, address: "{proxy}"}}
  frames:
    - {{name: det, format: dectris-v2, address: "{detector}", overflow: block}}
consumers:
  - {{name: stats, class: stats}}
  - {{name: pca, class: pca, params: {{batch_size: 64}}}}
  - {{name: fs, class: frame_stats}}
router: {{keep_runs: 5}}
"""


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Ledger:
    events_sent: int = 0
    frames_sent: int = 0
    samples: list[dict] = field(default_factory=list)

    def sample(self, run: int, daemon: Daemon) -> dict:
        s = {"run": run, "t": time.monotonic(), "rss": rss_bytes(), "fds": open_fds(), "threads": threading.active_count(),
             "events": value(daemon, "beamlens_events_processed_total"),
             "frames": value(daemon, "beamlens_frames_processed_total", source="det")}
        self.samples.append(s)
        return s


def value(daemon: Daemon, name: str, **labels: str) -> float:
    v = daemon.metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def total(daemon: Daemon, name: str, **labels: str) -> float:
    """Sum of a counter over all label values matching ``labels``."""
    out = 0.0
    for metric in daemon.metrics.registry.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out += s.value
    return out


def wait(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("soak: the daemon did not catch up")
        time.sleep(0.005)


def spectral_run(pub: Publisher, spectra: np.ndarray, daemon: Daemon, ledger: Ledger) -> None:
    side = int(np.sqrt(len(spectra)))
    bundle = compose_run(metadata={"plan_name": "grid_scan", "shape": [side, len(spectra) // side], "snaking": [False, True]})
    desc = bundle.compose_descriptor(name="primary", data_keys={"xas_spectrum": {"source": "sim", "dtype": "array",
                                                                                 "shape": [spectra.shape[1]]}})
    pub("start", bundle.start_doc)
    pub("descriptor", desc.descriptor_doc)
    n = side * (len(spectra) // side)
    for row in spectra[:n]:
        pub("event", desc.compose_event(data={"xas_spectrum": row}, timestamps={"xas_spectrum": 0.0}))
    pub("stop", bundle.compose_stop())
    ledger.events_sent += n
    uid = bundle.start_doc["uid"]
    if not daemon.store.wait_finished(uid, 120):
        raise TimeoutError(f"spectral run {uid} did not finish")


def frames_accounted(daemon: Daemon) -> float:
    """Frames the daemon has processed, or dropped or refused and counted."""
    return (value(daemon, "beamlens_frames_processed_total", source="det")
            + total(daemon, "beamlens_frames_dropped_total", source="det")
            + total(daemon, "beamlens_frame_decode_errors_total", source="det"))


def frame_run(emu: DetectorEmulator, frames: list[np.ndarray], series: int, daemon: Daemon, ledger: Ledger) -> None:
    before = frames_accounted(daemon)
    emu.send_series(frames, series=series, n_frames=len(frames))
    ledger.frames_sent += len(frames)
    try:
        wait(lambda: frames_accounted(daemon) >= before + len(frames) and not daemon.store.open_runs())
    except TimeoutError:  # frames lost without a count: the summary's unaccounted_losses says so
        print(f"series {series}: {before + len(frames) - frames_accounted(daemon):.0f} frame(s) unaccounted", file=sys.stderr)


def soak(runs: int = 400, points: int = 400, frames_per_run: int = 5000, frame_px: int = 64,
         nominal_run_s: float = 120.0, log=sys.stderr) -> dict:
    """Run the soak; returns the summary figures (see module docstring)."""
    stxm = stxm_map()
    spectra = stxm.spectra.reshape(-1, stxm.spectra.shape[-1]).astype(np.float64)[:points]
    frames = list(synthetic_frames(frames_per_run, (frame_px, frame_px), seed=1))
    ledger = Ledger()
    with ProxyProcess() as proxy, DetectorEmulator("dectris-v2") as emu:
        daemon = Daemon(load_config(text=CONFIG.format(proxy=proxy.out_address, detector=emu.address), environ={}))
        daemon.start()
        pub = Publisher(proxy.in_address, serializer=msgpack_serializer)
        try:
            wait_until_subscribed(proxy.in_address, lambda n: daemon.sources[0].probe_seen(n))
            t0 = time.monotonic()
            print(f"{'run':>5} {'min':>6} {'RSS MiB':>8} {'fds':>5} {'threads':>7} {'events':>9} {'frames':>10}", file=log)
            for run in range(runs):
                if run % 2 == 0:
                    spectral_run(pub, spectra, daemon, ledger)
                else:
                    frame_run(emu, frames, run, daemon, ledger)
                if run % max(1, runs // 20) == 0 or run == runs - 1:
                    s = ledger.sample(run, daemon)
                    print(f"{run:5d} {(s['t'] - t0) / 60:6.1f} {s['rss'] / 2**20:8.1f} {s['fds']:5d} {s['threads']:7d} "
                          f"{int(s['events']):9d} {int(s['frames']):10d}", file=log, flush=True)
            elapsed = time.monotonic() - t0
            missing = value(daemon, "beamlens_events_missing_total")
            events = value(daemon, "beamlens_events_processed_total")
            frames_done = value(daemon, "beamlens_frames_processed_total", source="det")
            dropped = total(daemon, "beamlens_frames_dropped_total", source="det")
            undecodable = total(daemon, "beamlens_frame_decode_errors_total", source="det")
        finally:
            pub.close()
            daemon.stop()
    warm = ledger.samples[min(1, len(ledger.samples) - 1)]
    end = ledger.samples[-1]
    losses = {"events_missing": missing, "frames_dropped": dropped, "frames_undecodable": undecodable,
              "unaccounted_events": ledger.events_sent - events - missing,
              "unaccounted_frames": ledger.frames_sent - frames_done - dropped - undecodable}
    return {
        "runs": runs, "elapsed_s": elapsed, "hours_equivalent": runs * nominal_run_s / 3600,
        "events_sent": ledger.events_sent, "events_processed": events,
        "frames_sent": ledger.frames_sent, "frames_processed": frames_done,
        "rss_start_bytes": warm["rss"], "rss_end_bytes": end["rss"], "rss_growth_bytes": end["rss"] - warm["rss"],
        "fds_growth": end["fds"] - warm["fds"], "threads_growth": end["threads"] - warm["threads"],
        **losses, "unaccounted_losses": losses["unaccounted_events"] + losses["unaccounted_frames"],
    }


FIGURES = [  # figure, unit, target
    ("hours_equivalent", "h", None), ("elapsed_s", "s", None),
    ("events_processed", "events", None), ("frames_processed", "frames", None),
    ("rss_start_bytes", "bytes", None), ("rss_end_bytes", "bytes", None),
    ("rss_growth_bytes", "bytes", "<= 67108864"), ("fds_growth", "fds", "<= 0"), ("threads_growth", "threads", "<= 0"),
    ("events_missing", "events", None), ("frames_dropped", "frames", None), ("frames_undecodable", "frames", None),
    ("unaccounted_losses", "items", "== 0"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--points", type=int, default=400)
    parser.add_argument("--frames-per-run", type=int, default=5000)
    parser.add_argument("--frame-px", type=int, default=64)
    parser.add_argument("--nominal-run-s", type=float, default=120.0)
    parser.add_argument("--summary", type=Path, help="also write the summary as JSON here")
    args = parser.parse_args()
    result = soak(args.runs, args.points, args.frames_per_run, args.frame_px, args.nominal_run_s)
    for figure, unit, target in FIGURES:
        print(json.dumps({"benchmark": "soak", "figure": figure, "value": result[figure], "unit": unit, "target": target}))
    if args.summary:
        args.summary.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
