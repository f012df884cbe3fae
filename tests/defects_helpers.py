"""Drive the ``defects`` consumer as the daemon does: signal() -> Buffers.allocate -> per batch
stage() then process() (results() when process asks for it) -> finish() -> results()."""
from __future__ import annotations

import numpy as np

from beamlens.consumers.base import Batch, Buffers, RunInfo, SeriesInfo, SignalInfo
from beamlens.consumers.defects import DefectsConsumer


def frame_signal(shape: tuple[int, int], n_frames: int | None, frame_time_s: float | None = 0.5,
                 dtype: str = "uint16") -> SignalInfo:
    """The frame signal of a simulated series of ``n_frames`` frames of ``shape`` px."""
    meta = {} if frame_time_s is None else {"frame_time_s": frame_time_s}
    series = SeriesInfo(source="sim", series_id="1", sig_shape=tuple(shape), dtype=dtype, n_frames=n_frames, meta=meta)
    return SignalInfo(name="sim", kind="frame", sig_shape=tuple(shape), dtype=dtype, units="counts", series=series)


def make_consumer(shape: tuple[int, int], n_frames: int, frame_time_s: float = 0.5,
                  **params) -> tuple[DefectsConsumer, SignalInfo]:
    """A consumer that took the frame signal of a series, with buffers for ``n_frames`` frames."""
    consumer = DefectsConsumer(DefectsConsumer.Params(**params), RunInfo(uid="test", nav_shape=(n_frames,), start_doc={}))
    info = frame_signal(shape, n_frames, frame_time_s)
    consumer.buffers = Buffers.allocate(consumer.signal(info), n_frames)
    return consumer, info


def frame_batch(info: SignalInfo, frames: np.ndarray, first: int) -> Batch:
    """Frames ``first, first + 1, ...`` of the series (nav index = frame number = seq_num - 1)."""
    nav = np.arange(first, first + len(frames), dtype=np.int64)
    return Batch(info, frames, nav, nav + 1, np.zeros(len(frames)))


def process(consumer: DefectsConsumer, batch: Batch, staged=None) -> None:
    """One batch as the daemon hands it over: stage (unless given), process, results when asked."""
    if staged is None:
        staged = consumer.stage(batch)
    if consumer.process(batch, staged):
        consumer.results()


def feed(consumer: DefectsConsumer, info: SignalInfo, frames: np.ndarray, batch: int = 4, first: int = 0,
         finish: bool = True) -> None:
    """Frames in batches of ``batch``, then (``finish``) the end of the series."""
    for a in range(0, len(frames), batch):
        process(consumer, frame_batch(info, frames[a:a + batch], first + a))
    if finish:
        end(consumer)


def end(consumer: DefectsConsumer) -> None:
    """The series is complete: finish() and the final results()."""
    consumer.finish()
    consumer.results()
