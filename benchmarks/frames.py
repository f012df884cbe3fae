"""Frame-path benchmarks: 512 x 512 uint16 frames over ipc, sender in its own process.

Figures (one JSON line each on stdout, ``{"benchmark", "figure", "value", "unit", "target"}``):

- R1 ingest ratio (median over rounds of the paired ratio): daemon frames/s (array-1.0 PUSH -> PULL, policy block, ``frame_stats`` consumer,
  metrics on) / raw pyzmq transport frames/s (same sender, same socket type, ipc,
  ``recv_multipart(copy=False)`` + ``np.frombuffer``), medians of interleaved rounds; target >= 0.85.
  Also the daemon's absolute frames/s and GB/s.
- R2 freshness under 2x overload, policy ``latest``: the sender runs at twice the rate the consumers
  can take (a probe consumer spends a fixed time per frame); p99 of (processed - sent) time against
  2 x the measured per-frame processing time + 5 ms; and sent - processed - counted drops (must be 0).
- R3 memory growth under the same overload for ``--duration`` s (default 60; ``--short``: 10 s),
  for policies latest and block: peak RSS - RSS before sending; target <= 64 MiB.
- R6 metrics overhead: daemon frames/s with metrics / with every metric replaced by a no-op,
  interleaved rounds; target >= 0.99.

Usage: ``python benchmarks/frames.py [--short] [--rounds 5] [--frames 3000] [--duration 60]``.
Compare ratios only within one run (``shared/reference/performance.md``: this host is noisy).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

SHAPE = (512, 512)
DTYPE = "uint16"
FRAME_BYTES = SHAPE[0] * SHAPE[1] * 2
EXTRA = os.environ.get("BENCH_SOURCE_EXTRA", "")


def emit(figure: str, value: float, unit: str, target: str | None, benchmark: str = "frames", **extra: Any) -> None:
    print(json.dumps({"benchmark": benchmark, "figure": figure, "value": round(float(value), 6), "unit": unit,
                      "target": target, **extra}), flush=True)


# -- sender process ----------------------------------------------------------------------------
def sender_main(address: str, conn) -> None:
    """Bind PUSH at ``address``; on ("send", n, rate, max_s) send n array-1.0 frames (paced when
    rate; stopping after max_s seconds), reply with the send times (time.time(), s)."""
    import zmq

    from beamlens.daemon.sim.detectors import synthetic_frames
    frames = list(synthetic_frames(16, SHAPE, DTYPE))
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 100)
    sock.bind(address)
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd[0] == "quit":
            break
        _, n, rate, max_s = cmd
        sent = np.empty(n)
        period = 1.0 / rate if rate else 0.0
        t_next = t_end = time.perf_counter()
        t_end += max_s or float("inf")
        for i in range(n):
            if time.perf_counter() > t_end:
                sent = sent[:i]
                break
            if period:  # sleep most of the wait (frees the core), spin the last 0.3 ms (precision)
                wait = t_next - time.perf_counter()
                if wait > 3e-4:
                    time.sleep(wait - 3e-4)
                while time.perf_counter() < t_next:
                    pass
                t_next += period
            header = json.dumps({"htype": "array-1.0", "type": DTYPE, "shape": list(SHAPE), "frame": i}).encode()
            sent[i] = time.time()
            sock.send_multipart([header, frames[i % 16]], copy=False)
        conn.send(sent)
    sock.close(1000)


class Sender:
    def __init__(self, address: str):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=sender_main, args=(address, child), daemon=True)
        self.proc.start()
        assert self.conn.recv() == "ready"

    def start(self, n: int, rate: float | None = None, max_s: float | None = None) -> None:
        self.conn.send(("send", n, rate, max_s))

    def sent_times(self) -> np.ndarray:
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(("quit",))
        self.proc.join(10)


# -- receivers ---------------------------------------------------------------------------------
def transport_fps(address: str, sender: Sender, n: int) -> float:
    """Raw pyzmq: PULL connect, recv_multipart(copy=False), np.frombuffer on the data part."""
    import zmq
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 16)
    sock.connect(address)
    sender.start(n)
    t0 = 0.0
    for i in range(n):
        parts = sock.recv_multipart(copy=False)
        json.loads(parts[0].bytes)
        np.frombuffer(parts[1].buffer, dtype=DTYPE).reshape(SHAPE)
        if i == 0:
            t0 = time.perf_counter()
    dt = time.perf_counter() - t0
    sender.sent_times()
    sock.close(0)
    return (n - 1) / dt


class NoopMetric:
    """Stands in for a prometheus metric: every method returns itself and does nothing."""

    def labels(self, *a: Any, **k: Any) -> NoopMetric:
        return self

    def inc(self, *a: Any) -> None: ...
    def set(self, *a: Any) -> None: ...
    def observe(self, *a: Any) -> None: ...


def without_metrics(metrics) -> None:
    from prometheus_client.metrics import MetricWrapperBase
    for name, value in list(vars(metrics).items()):
        if isinstance(value, MetricWrapperBase):
            setattr(metrics, name, NoopMetric())
        elif name == "science":
            setattr(metrics, name, {k: NoopMetric() for k in value})


def make_daemon(address: str, consumers: str, overflow: str = "block", metrics: bool = True):
    from beamlens.daemon import app
    from beamlens.daemon.config import load_config
    config = load_config(text=f"""
log_level: WARNING
http: {{port: 0}}
sources:
  frames:
    - {{name: det, format: array-1.0, address: '{address}', overflow: {overflow}{EXTRA}}}
consumers:
{consumers}
""", environ={})
    original = app.Metrics
    if not metrics:
        def factory(registry=None):
            m = original(registry)
            without_metrics(m)
            return m
        app.Metrics = factory
    try:
        daemon = app.Daemon(config)
    finally:
        app.Metrics = original
    daemon.start()
    return daemon


def processed_counter(daemon):
    """A zero-cost reader of frames processed (works with metrics on or off)."""
    src = daemon.frame_sources[0]
    if isinstance(daemon.metrics.frames_processed, NoopMetric):
        return lambda: sum(r.frames_done for r in daemon.store.open_runs())
    child = daemon.metrics.frames_processed.labels(src.name)
    return lambda: child._value.get()


def daemon_fps(address: str, sender: Sender, n: int, metrics: bool = True) -> float:
    daemon = make_daemon(address, "  - {name: fs, class: frame_stats}", metrics=metrics)
    done = processed_counter(daemon)
    try:
        sender.start(n)
        while done() < 1:
            time.sleep(0.0005)
        t0 = time.perf_counter()
        while done() < n:
            time.sleep(0.002)
        dt = time.perf_counter() - t0
        sender.sent_times()
    finally:
        daemon.stop()
    return (n - 1) / dt


# -- R2 / R3 probe consumer --------------------------------------------------------------------
from beamlens.consumers.base import Consumer, ConsumerParams, NotApplicable  # noqa: E402


class ProbeParams(ConsumerParams):
    seconds_per_frame: float = 0.002


class Probe(Consumer):
    """Takes a fixed time per frame, with the GIL released as numpy/numba/onnxruntime kernels do
    (``time.sleep``), and records (frame number, time processed)."""

    name = "probe"
    Params = ProbeParams
    params: ProbeParams
    records: list[tuple[int, float]] = []

    def signal(self, info):
        if info.kind != "frame":
            raise NotApplicable("frames only")
        return []

    def process(self, batch, staged=None) -> None:
        for k in batch.nav_index:
            time.sleep(self.params.seconds_per_frame)
            Probe.records.append((int(k), time.time()))


PROBE = "  - {name: fs, class: frame_stats}\n  - {name: probe, class: '__main__:Probe', params: {seconds_per_frame: 0.002}}"


def freshness(address: str, sender: Sender, seconds: float) -> None:
    Probe.records = []
    daemon = make_daemon(address, PROBE, overflow="latest")
    rate = 1000.0  # frames/s sent; the probe alone limits the consumers to < 500/s
    n = int(rate * seconds)
    try:
        sender.start(n, rate)
        sent = sender.sent_times()
        deadline = time.time() + 10
        m = daemon.metrics.registry.get_sample_value
        while time.time() < deadline:
            received = m("beamlens_frames_received_total", {"source": "det"}) or 0
            processed = m("beamlens_frames_processed_total", {"source": "det"}) or 0
            dropped = sum(m("beamlens_frames_dropped_total", {"source": "det", "reason": r}) or 0
                          for r in ("overflow", "gap", "stale_series", "run_closed"))
            errors = 0
            if received == n and processed + dropped >= n:
                break
            time.sleep(0.05)
    finally:
        daemon.stop()
    records = np.array(Probe.records[len(Probe.records) // 10:])  # skip the first 10 % (start-up)
    ages = records[:, 1] - sent[records[:, 0].astype(int)]
    per_frame = float(np.median(np.diff(records[:, 1])))
    p99 = float(np.percentile(ages, 99))
    emit("R2_p99_age_latest", p99 * 1e3, "ms", f"<= {2 * per_frame * 1e3 + 5:.2f} (2 x {per_frame * 1e3:.2f} ms + 5 ms)",
         median_age_ms=round(float(np.median(ages)) * 1e3, 3), sent_hz=rate,
         processed_hz=round(1 / per_frame, 1))
    emit("R2_unaccounted_frames", n - processed - dropped - errors, "frames", "== 0",
         sent=n, processed=int(processed), dropped=int(dropped))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def memory_growth(address: str, sender: Sender, seconds: float, overflow: str) -> None:
    Probe.records = []
    daemon = make_daemon(address, PROBE, overflow=overflow)
    try:
        time.sleep(0.5)
        base = peak = rss_bytes()
        sender.start(int(1000 * seconds), 1000.0, seconds)
        while not sender.conn.poll(0.25):
            peak = max(peak, rss_bytes())
        sent = len(sender.sent_times())
        peak = max(peak, rss_bytes())
    finally:
        daemon.stop()
    emit(f"R3_memory_growth_{overflow}", (peak - base) / 2**20, "MiB", "<= 64", seconds=seconds,
         baseline_mib=round(base / 2**20, 1), frames_sent=sent)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--frames", type=int, default=3000, help="frames per throughput round")
    p.add_argument("--duration", type=float, default=60.0, help="R3 soak per policy, s")
    p.add_argument("--short", action="store_true", help="3 rounds of 1500 frames, 10 s soak")
    p.add_argument("--only", default="R1,R2,R3", help="comma-separated subset of R1 (with R6), R2, R3")
    args = p.parse_args()
    only = set(args.only.split(","))
    if args.short:
        args.rounds, args.frames, args.duration = 3, 1500, 10.0
    tmp = tempfile.mkdtemp(prefix="beamlens-bench-")
    address = f"ipc://{os.path.join(tmp, 'frames')}"
    sender = Sender(address)
    try:
        daemon_fps(address, sender, 200)  # warm-up: numba compile/cache load, page cache
        if "R1" in only:
            throughput(address, sender, args.rounds, args.frames)
        if "R2" in only:
            freshness(address, sender, 5.0 if args.short else 10.0)
        if "R3" in only:
            for policy in ("latest", "block"):
                memory_growth(address, sender, args.duration, policy)
    finally:
        sender.close()
    return 0


def throughput(address: str, sender: Sender, rounds: int, frames: int) -> None:
    """R1 and R6 from interleaved rounds (transport, daemon, daemon without metrics)."""
    transport, with_m, without_m = [], [], []
    for _ in range(rounds):
        transport.append(transport_fps(address, sender, frames))
        with_m.append(daemon_fps(address, sender, frames, metrics=True))
        without_m.append(daemon_fps(address, sender, frames, metrics=False))
    t, d, d0 = (statistics.median(x) for x in (transport, with_m, without_m))
    # each round's daemon figure is divided by the transport figure measured just before it; the
    # median of those paired ratios is less sensitive to load drifting on a shared host
    r1 = [a / b for a, b in zip(with_m, transport)]
    r6 = [a / b for a, b in zip(with_m, without_m)]
    emit("R1_ingest_ratio", statistics.median(r1), "ratio", ">= 0.85", daemon_fps=round(d, 1),
         transport_fps=round(t, 1), ratio_of_medians=round(d / t, 3), rounds=rounds, frames=frames,
         per_round=[round(x, 3) for x in r1])
    emit("daemon_frames_per_second", d, "frames/s", None, frame="512x512 uint16")
    emit("daemon_throughput", d * FRAME_BYTES / 1e9, "GB/s", None, frame="512x512 uint16")
    emit("transport_frames_per_second", t, "frames/s", None, frame="512x512 uint16")
    emit("R6_metrics_overhead_ratio", statistics.median(r6), "ratio", ">= 0.99", with_metrics_fps=round(d, 1),
         without_metrics_fps=round(d0, 1), ratio_of_medians=round(d / d0, 3), per_round=[round(x, 3) for x in r6])


if __name__ == "__main__":
    sys.exit(main())
