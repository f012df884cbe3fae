"""Benchmark: frames/s of the ``defects`` consumer against a bare onnxruntime loop on the same model,
threads, frames and batch size, measured side by side in one run (alternating rounds, the fastest
round of each; the bare figure is the faster of onnxruntime's spin-waiting default and the daemon's
no-spinning setting); the shipped int8 network (``defect_net_int8.onnx``) runs bare in the same rounds, for
the int8/fp32 speed-up. The consumer is measured twice: driven directly as the daemon drives a frame
consumer (``signal`` -> buffers -> per batch ``stage`` on a pool of ``--stage-workers`` threads,
at most that many batches ahead, and ``process`` in batch order -> ``finish``; BLAS limited to one
thread, as the daemon's ``router.blas_threads`` does), and inside a running daemon,
the frames arriving as array-1.0 messages over a ZeroMQ socket (receive, decode, frame queue,
router, consumer); the daemon figure is timed from the first batch processed to the last (a router
listener stamps each batch when its ``process`` has run), so the model load at series start is left
out as it is for the bare loop.

int8 against fp32 is timed call by call, alternating (each ``session.run`` of one model is followed
by the same call on the other), so both see the same neighbours on a shared machine; the ratio is the
median over rounds of each round's fp32/int8 time ratio. CPU seconds per frame (``time.process_time``,
every thread of this process) are printed beside the wall-clock figures: on a loaded machine they
tell the daemon's extra work from the time its threads waited for a core. Precision and recall of
both networks on held-out simulated frames (``--eval-frames`` of a default-parameter movie, seed
``--eval-seed``: neither the training, the calibration nor the model cards' evaluation seed) close
the output, with the int8 network's loss against fp32 (accepted within 0.01, see its model card).

Where onnxruntime has the OpenVINO execution provider (the optional ``beamlens[openvino]``
wheel; ``make bench-openvino`` runs this benchmark in a venv of its own with it), both networks
also run on it in the same rounds (CPU fp32, OpenVINO fp32, OpenVINO int8, call by call, the same
threads), and the OpenVINO int8 network's held-out precision and recall are scored beside fp32's.

Prints one JSON line per figure::

    python benchmarks/defects.py --frames 200 --batch 8 --threads 2 --size 256 [--stage-workers 1]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time

import numpy as np

from beamlens.consumers.base import Batch, Buffers, RunInfo, SeriesInfo, SignalInfo
from beamlens.consumers.defects import DefectsConsumer
from beamlens.models.defect_net import MODELS, DefectNet, evaluate, load_card, load_session, normalise
from beamlens.models.stem_sim import DynamicsParams, LatticeParams, Movie, MovieParams


def movie_frames(n: int, size: int, seed: int = 7) -> np.ndarray:
    n_defects = max(4, 12 * size * size // 256**2)
    params = MovieParams(lattice=LatticeParams(shape=(size, size)), dynamics=DynamicsParams(n_defects=n_defects))
    return np.stack([img for img, _ in Movie(params, seed=seed).frames(n)])


def run_consumer(frames: np.ndarray, batch: int, threads: int, stage_workers: int = 1) -> float:
    """Seconds to push all frames through a fresh consumer (model load excluded, as at run start):
    ``stage`` of the next batches on a pool of ``stage_workers`` threads (0: inline) while
    ``process`` takes the current one, in order, as the daemon does."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    consumer = DefectsConsumer(DefectsConsumer.Params(threads=threads, providers=["CPUExecutionProvider"]),
                               RunInfo(uid="bench", nav_shape=(len(frames),), start_doc={}))
    series = SeriesInfo(source="bench", series_id="1", sig_shape=frames.shape[1:], dtype=str(frames.dtype),
                        n_frames=len(frames), meta={"frame_time_s": 0.5})
    info = SignalInfo("bench", "frame", frames.shape[1:], str(frames.dtype), "counts", series=series)
    consumer.buffers = Buffers.allocate(consumer.signal(info), len(frames))
    consumer.net.probability(frames[:batch])  # warm-up at the batch shape, as the bare loop gets
    batches = [Batch(info, frames[a:a + batch], np.arange(a, min(a + batch, len(frames))),
                     np.arange(a, min(a + batch, len(frames))) + 1, np.zeros(len(frames[a:a + batch])))
               for a in range(0, len(frames), batch)]

    def handle(b: Batch, staged) -> None:
        if consumer.process(b, staged):
            consumer.results()

    from threadpoolctl import threadpool_limits

    blas = threadpool_limits(1, user_api="blas")  # as the daemon's router.blas_threads (default 1)
    t0 = time.perf_counter()
    if stage_workers == 0:
        for b in batches:
            handle(b, consumer.stage(b))
    else:
        with ThreadPoolExecutor(stage_workers) as pool:
            ahead: deque = deque()
            for b in batches:
                ahead.append((b, pool.submit(consumer.stage, b)))
                if len(ahead) > stage_workers:
                    done, future = ahead.popleft()
                    handle(done, future.result())
            while ahead:
                done, future = ahead.popleft()
                handle(done, future.result())
    consumer.finish()
    consumer.results()
    elapsed = time.perf_counter() - t0
    blas.restore_original_limits()
    return elapsed


def run_bare(session, tiles: np.ndarray, batch_tiles: int) -> float:
    """Seconds for ``session.run`` over pre-normalised, pre-cut tiles, ``batch_tiles`` per call."""
    name = session.get_inputs()[0].name
    session.run(None, {name: tiles[:batch_tiles]})
    t0 = time.perf_counter()
    for a in range(0, len(tiles), batch_tiles):
        session.run(None, {name: tiles[a:a + batch_tiles]})
    return time.perf_counter() - t0


def run_paired(sessions: list, tiles: np.ndarray, batch_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """Each ``session.run`` call of the first session followed by the same call on the others:
    wall and CPU seconds (``time.process_time``) of each session over all tiles, float ``(n_sessions,)``."""
    name = sessions[0].get_inputs()[0].name
    for s in sessions:
        s.run(None, {name: tiles[:batch_tiles]})
    wall, cpu = np.zeros(len(sessions)), np.zeros(len(sessions))
    for a in range(0, len(tiles), batch_tiles):
        feed = {name: tiles[a:a + batch_tiles]}
        for i, s in enumerate(sessions):
            w, c = time.perf_counter(), time.process_time()
            s.run(None, feed)
            wall[i] += time.perf_counter() - w
            cpu[i] += time.process_time() - c
    return wall, cpu


def run_daemon(frames: np.ndarray, batch: int, threads: int) -> tuple[float, float]:
    """Frames/s of the defects consumer inside a running daemon fed over ZeroMQ (array-1.0), and
    CPU seconds per frame of this process (daemon and emulator) over the same span."""
    from beamlens.daemon.app import Daemon
    from beamlens.daemon.config import load_config
    from beamlens.daemon.sim.detectors import DetectorEmulator

    stamps: list[tuple[float, float, int]] = []  # (wall, cpu, frames processed so far)
    processed = [0]
    all_done = threading.Event()

    def listener(name: str, run, doc: dict) -> None:  # router thread, after the batch's process()
        if name == "results" and doc.get("consumer") == "defects":
            processed[0] += len(doc.get("seq_num", ()))
            stamps.append((time.perf_counter(), time.process_time(), processed[0]))
            if processed[0] >= len(frames):
                all_done.set()

    with DetectorEmulator("array-1.0") as emu:
        config = load_config(text=f"""
http: {{port: 0}}
log_level: WARNING
sources:
  frames:
    - {{name: stem, format: array-1.0, address: "{emu.address}", max_batch: {batch}}}
consumers:
  - {{name: defects, class: defects, params: {{threads: {threads}, providers: [CPUExecutionProvider], frame_time_s: 0.5}}}}
""", environ={})
        daemon = Daemon(config)
        daemon.router.listeners.append(listener)
        daemon.start()
        try:
            emu.send_series(frames, source="bench")
            all_done.wait(600)
        finally:
            daemon.stop()
    if not all_done.is_set() or len(stamps) < 2:
        raise RuntimeError(f"the daemon processed {processed[0]} of {len(frames)} frames")
    (w0, c0, n0), (w1, c1, n1) = stamps[0], stamps[-1]
    return (n1 - n0) / (w1 - w0), (c1 - c0) / (n1 - n0)


def openvino_sessions(threads: int, int8_model, int8_card) -> tuple | None:
    """``(fp32, int8)`` sessions on onnxruntime's OpenVINO execution provider (no spin-waiting, as
    in the daemon), or None where this onnxruntime has none (the ``onnxruntime-openvino`` wheel,
    ``make bench-openvino``)."""
    import onnxruntime as ort

    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        return None
    ov = ["OpenVINOExecutionProvider"]
    return (load_session(providers=ov, threads=threads, spinning=False),
            load_session(int8_model, load_card(int8_card), providers=ov, threads=threads, spinning=False))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8, help="frames per batch (stage + process)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (both paths)")
    ap.add_argument("--size", type=int, default=256, help="frame side, px")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stage-workers", type=int, default=1,
                    help="threads staging batches ahead of process() in the direct measurement (0: inline)")
    ap.add_argument("--eval-frames", type=int, default=40, help="held-out frames for precision/recall (0: skip)")
    ap.add_argument("--eval-seed", type=int, default=2026)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    frames = movie_frames(args.frames, args.size)
    card = load_card()
    net = DefectNet(load_session(providers=["CPUExecutionProvider"], threads=args.threads), card)
    fp32_quiet = load_session(providers=["CPUExecutionProvider"], threads=args.threads, spinning=False)
    tiling = net.tiling(frames.shape[1:])
    per = len(tiling.origins)
    tiles = np.empty((len(frames) * per, 1, net.tile, net.tile), dtype=np.float32)
    for i, f in enumerate(frames):
        tiling.cut(normalise(f), tiles[i * per:(i + 1) * per])
    int8_model, int8_card = MODELS["int8"]
    int8 = load_session(int8_model, load_card(int8_card), providers=["CPUExecutionProvider"], threads=args.threads,
                        spinning=False)
    consumer_s, bare_s, daemon_fps, daemon_cpu, quiet_s, quiet_cpu, int8_s, int8_cpu, paired = ([] for _ in range(9))
    openvino = openvino_sessions(args.threads, int8_model, int8_card)
    ov_s, ov_paired, ov_cpu_paired = [], [], []
    for _ in range(args.rounds):
        consumer_s.append(run_consumer(frames, args.batch, args.threads, args.stage_workers))
        bare_s.append(run_bare(net.session, tiles, args.batch * per))
        fps, cpu = run_daemon(frames, args.batch, args.threads)
        daemon_fps.append(fps)
        daemon_cpu.append(cpu)
        # fp32 and int8 with the daemon's session settings (no spin-waiting), call by call
        wall, cpu = run_paired([fp32_quiet, int8], tiles, args.batch * per)
        quiet_s.append(wall[0])
        int8_s.append(wall[1])
        quiet_cpu.append(cpu[0] / len(frames))
        int8_cpu.append(cpu[1] / len(frames))
        paired.append(wall[0] / wall[1])
        if openvino:  # the same three calls in turn: CPU fp32, OpenVINO fp32, OpenVINO int8
            wall, _ = run_paired([fp32_quiet, *openvino], tiles, args.batch * per)
            ov_s.append(wall[1:])
            ov_paired.append(wall[1] / wall[2])
            ov_cpu_paired.append(wall[0] / wall[2])
    # the fastest round of each (timeit's rule): on a shared machine the slower rounds measure the neighbours
    fps_c = len(frames) / min(consumer_s)
    # the bare reference is the faster of onnxruntime's spinning default and the daemon's no-spinning
    # setting (on a loaded machine spinning threads lose; the daemon must not look good against that)
    fps_b = len(frames) / min(min(bare_s), min(quiet_s))
    fps_d = max(daemon_fps)
    common = {"frames": args.frames, "frame_px": args.size, "batch": args.batch, "threads": args.threads,
              "tiles_per_frame": per, "stage_workers": args.stage_workers}
    figures = [
        ("consumer_frames_per_second", fps_c, "frames/s", None),
        ("bare_onnxruntime_frames_per_second", fps_b, "frames/s", None),
        ("bare_onnxruntime_spinning_frames_per_second", len(frames) / min(bare_s), "frames/s", None),
        ("consumer_to_bare_ratio", fps_c / fps_b, "ratio", ">= 0.9"),
        ("daemon_frames_per_second", fps_d, "frames/s", None),
        ("daemon_to_bare_ratio", fps_d / fps_b, "ratio", ">= 0.85"),
        ("daemon_cpu_seconds_per_frame", min(daemon_cpu), "s", None),
        ("bare_fp32_cpu_seconds_per_frame", min(quiet_cpu), "s", None),
        ("daemon_to_bare_cpu_ratio", min(quiet_cpu) / min(daemon_cpu), "ratio", None),
        ("bare_fp32_no_spinning_frames_per_second", len(frames) / min(quiet_s), "frames/s", None),
        ("bare_int8_frames_per_second", len(frames) / min(int8_s), "frames/s", None),
        ("int8_to_fp32_ratio", statistics.median(paired), "ratio", ">= 1.5"),
        ("int8_to_fp32_fastest_rounds_ratio", min(quiet_s) / min(int8_s), "ratio", None),
        ("bare_int8_cpu_seconds_per_frame", min(int8_cpu), "s", None),
        ("int8_to_fp32_cpu_ratio", min(quiet_cpu) / min(int8_cpu), "ratio", None),
    ]
    if openvino:
        fastest = np.min(ov_s, axis=0)
        figures += [
            ("openvino_fp32_frames_per_second", len(frames) / fastest[0], "frames/s", None),
            ("openvino_int8_frames_per_second", len(frames) / fastest[1], "frames/s", None),
            ("openvino_int8_to_fp32_ratio", statistics.median(ov_paired), "ratio", ">= 1.5"),
            ("openvino_int8_to_cpu_provider_fp32_ratio", statistics.median(ov_cpu_paired), "ratio", None),
        ]
    if args.eval_frames:
        nets = {"fp32": DefectNet(fp32_quiet, card), "int8": DefectNet(int8, load_card(int8_card))}
        if openvino:
            nets["openvino_int8"] = DefectNet(openvino[1], load_card(int8_card))
        scores = {k: evaluate(n, args.eval_frames, args.eval_seed) for k, n in nets.items()}
        for k in nets:
            figures += [(f"{k}_held_out_precision", scores[k]["precision"], "ratio", None),
                        (f"{k}_held_out_recall", scores[k]["recall"], "ratio", None)]
        figures += [(f"{k}_{m}_loss", scores["fp32"][m] - scores[k][m], "ratio", "<= 0.01")
                    for k in nets if k != "fp32" for m in ("precision", "recall")]
        common_eval = {"eval_frames": args.eval_frames, "eval_seed": args.eval_seed,
                       "eval_defects": scores["fp32"]["defects"]}
    else:
        common_eval = {}
    for figure, value, unit, target in figures:
        extra = common_eval if "held_out" in figure or figure.endswith("_loss") else {}
        print(json.dumps({"benchmark": "defects", "figure": figure, "value": round(value, 6 if unit == "s" else 4),
                          "unit": unit, "target": target, **common, **extra}))


if __name__ == "__main__":
    main()
