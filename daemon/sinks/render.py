"""Rendering result buffers as PNG images with a colour scale (matplotlib, Agg, no pyplot state).

- ``nav`` maps of 2 dimensions, and 2-D ``sig`` buffers without a signal axis (a frame-shaped
  density map): an image in scan order (row 0 at the top, as bluesky's LiveGrid),
  viridis colour scale with a labelled colour bar; unvisited points (NaN) are drawn light grey.
- 1-D ``nav`` buffers and ``sig``/``single`` buffers: line plots, against the signal axis when the
  consumer published one (e.g. energy in eV).
"""
from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from ..results import BufferSnapshot


def render_png(snap: BufferSnapshot, index: int | None = None, dpi: int = 80) -> bytes:
    """Draw one buffer snapshot as a PNG.

    Args:
        snap: the snapshot; ``nav`` data of shape ``(*nav_shape, *extra_shape)``.
        index: for a ``nav`` buffer with an extra dimension, which channel to draw (default 0).

    Returns:
        PNG bytes.
    """
    spec = snap.spec
    data = np.asarray(snap.data, dtype=np.float64)
    fig = Figure(figsize=(5.0, 4.0), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    title = f"{snap.consumer} / {spec.name}"
    label = f"{spec.name} ({spec.units})" if spec.units else spec.name
    if spec.kind == "nav" and spec.extra_shape:
        data = data.reshape(*data.shape[: data.ndim - len(spec.extra_shape)], -1)[..., index or 0]
        title += f" [{index or 0}]"
    image = (spec.kind == "nav" and data.ndim == 2) or (spec.kind == "sig" and data.ndim == 2 and snap.axis is None)
    if image:
        masked = np.ma.masked_invalid(data)
        ax.set_facecolor("#dddddd")
        im = ax.imshow(masked, cmap="viridis", interpolation="nearest", origin="upper")
        fig.colorbar(im, ax=ax, label=label)
        ax.set_xlabel("scan axis 2 (fast) / px" if spec.kind == "nav" else "column bin")
        ax.set_ylabel("scan axis 1 (slow) / px" if spec.kind == "nav" else "row bin")
    else:
        rows = data.reshape(-1, data.shape[-1]) if data.ndim >= 1 else data.reshape(1, 1)
        if snap.axis is not None and snap.axis[0].shape[-1] == rows.shape[-1]:
            x, xunits = snap.axis
            ax.set_xlabel(f"{spec.axis} ({xunits})")
        else:
            x = np.arange(rows.shape[-1])
            ax.set_xlabel("scan point" if spec.kind == "nav" else "index")
        for i, row in enumerate(rows):
            ax.plot(x, row, lw=1.2, label=f"{i + 1}" if len(rows) > 1 else None)
        if len(rows) > 1:
            ax.legend(fontsize="small")
        ax.set_ylabel(label)
    ax.set_title(title, fontsize="medium")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
