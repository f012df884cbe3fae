"""Drive a frame consumer as the daemon does (series -> buffers -> frames batches -> stop)."""
from __future__ import annotations

import numpy as np

from beamlens.consumers.base import Results, RunInfo, SeriesInfo
from beamlens.consumers.defects import DefectsConsumer


def make_consumer(shape: tuple[int, int], n_frames: int, frame_time_s: float = 0.5,
                  **params) -> tuple[DefectsConsumer, SeriesInfo]:
    consumer = DefectsConsumer(DefectsConsumer.Params(**params), RunInfo(uid="test", nav_shape=(n_frames,), start_doc={}))
    info = SeriesInfo(source="sim", series_id="1", sig_shape=shape, dtype="uint16", n_frames=n_frames,
                      meta={"frame_time_s": frame_time_s})
    consumer.series(info)
    consumer.results = Results({s.name: s.allocate(n_frames) for s in consumer.result_buffers()})
    return consumer, info


def feed(consumer: DefectsConsumer, info: SeriesInfo, frames: np.ndarray, batch: int = 4) -> None:
    for a in range(0, len(frames), batch):
        consumer.frames(frames[a:a + batch], np.arange(a, min(a + batch, len(frames)), dtype=np.int64), info)
    consumer.stop({})
