"""Benchmark: frames/s of the ``defects`` consumer (driven as the daemon drives a frame consumer:
``series`` -> buffers -> ``frames`` batches -> ``stop``) against a bare onnxruntime loop on the same
model, threads, frames and batch size, measured side by side in one run (alternating rounds, the
fastest round of each).

Prints one JSON line per figure::

    python benchmarks/defects.py --frames 200 --batch 8 --threads 2 --size 256 [--no-background]
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np

from beamlens.consumers.base import Results, RunInfo, SeriesInfo
from beamlens.consumers.defects import DefectsConsumer
from beamlens.models.defect_net import DefectNet, load_card, load_session, normalise
from beamlens.models.stem_sim import DynamicsParams, LatticeParams, Movie, MovieParams


def movie_frames(n: int, size: int, seed: int = 7) -> np.ndarray:
    n_defects = max(4, 12 * size * size // 256**2)
    params = MovieParams(lattice=LatticeParams(shape=(size, size)), dynamics=DynamicsParams(n_defects=n_defects))
    return np.stack([img for img, _ in Movie(params, seed=seed).frames(n)])


def run_consumer(frames: np.ndarray, batch: int, threads: int, background: bool = True) -> float:
    """Seconds to push all frames through a fresh consumer (model load excluded, as at run start)."""
    consumer = DefectsConsumer(DefectsConsumer.Params(threads=threads, providers=["CPUExecutionProvider"],
                                                      background=background),
                               RunInfo(uid="bench", nav_shape=(len(frames),), start_doc={}))
    info = SeriesInfo(source="bench", series_id="1", sig_shape=frames.shape[1:], dtype=str(frames.dtype),
                      n_frames=len(frames), meta={"frame_time_s": 0.5})
    consumer.series(info)
    consumer.results = Results({s.name: s.allocate(len(frames)) for s in consumer.result_buffers()})
    consumer.net.probability(frames[:batch])  # warm-up at the batch shape, as the bare loop gets
    t0 = time.perf_counter()
    for a in range(0, len(frames), batch):
        consumer.frames(frames[a:a + batch], np.arange(a, min(a + batch, len(frames))), info)
    consumer.stop({})
    return time.perf_counter() - t0


def run_bare(session, tiles: np.ndarray, batch_tiles: int) -> float:
    """Seconds for ``session.run`` over pre-normalised, pre-cut tiles, ``batch_tiles`` per call."""
    name = session.get_inputs()[0].name
    session.run(None, {name: tiles[:batch_tiles]})
    t0 = time.perf_counter()
    for a in range(0, len(tiles), batch_tiles):
        session.run(None, {name: tiles[a:a + batch_tiles]})
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8, help="frames per consumer.frames() call")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (both paths)")
    ap.add_argument("--size", type=int, default=256, help="frame side, px")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-background", dest="background", action="store_false",
                    help="post-process in the calling thread (consumer param background=false)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    frames = movie_frames(args.frames, args.size)
    card = load_card()
    net = DefectNet(load_session(providers=["CPUExecutionProvider"], threads=args.threads), card)
    tiling = net.tiling(frames.shape[1:])
    per = len(tiling.origins)
    tiles = np.empty((len(frames) * per, 1, net.tile, net.tile), dtype=np.float32)
    for i, f in enumerate(frames):
        tiling.cut(normalise(f), tiles[i * per:(i + 1) * per])
    consumer_s, bare_s = [], []
    for _ in range(args.rounds):
        consumer_s.append(run_consumer(frames, args.batch, args.threads, args.background))
        bare_s.append(run_bare(net.session, tiles, args.batch * per))
    # the fastest round of each (timeit's rule): on a shared machine the slower rounds measure the neighbours
    fps_c = len(frames) / min(consumer_s)
    fps_b = len(frames) / min(bare_s)
    common = {"frames": args.frames, "frame_px": args.size, "batch": args.batch, "threads": args.threads,
              "tiles_per_frame": per, "background": args.background}
    for figure, value, unit, target in (
        ("consumer_frames_per_second", fps_c, "frames/s", None),
        ("bare_onnxruntime_frames_per_second", fps_b, "frames/s", None),
        ("consumer_to_bare_ratio", fps_c / fps_b, "ratio", ">= 0.9"),
    ):
        print(json.dumps({"benchmark": "defects", "figure": figure, "value": round(value, 4), "unit": unit,
                          "target": target, **common}))


if __name__ == "__main__":
    main()
