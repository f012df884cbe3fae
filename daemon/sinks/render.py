"""Rendering result buffers as PNG images with a colour scale (matplotlib, Agg, no pyplot state).

- ``nav`` maps of 2 dimensions: an image as bluesky's LiveGrid draws it (``origin="lower"``, the
  motor extents of the run when known, each axis increasing right/upwards), viridis colour scale
  with a labelled colour bar; unvisited points (NaN) are drawn light grey. 2-D ``sig`` buffers
  without a signal axis (a frame-shaped density map) are drawn as frames are, row 0 at the top.
- 1-D ``nav`` buffers and ``sig``/``single`` buffers: line plots, against the signal axis when the
  consumer published one (e.g. energy in eV).
"""
from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from ..results import BufferSnapshot


def render_png(snap: BufferSnapshot, index: int | None = None, dpi: int = 80,
               axes: list[dict] | None = None) -> bytes:
    """Draw one buffer snapshot as a PNG.

    Args:
        snap: the snapshot; ``nav`` data of shape ``(*nav_shape, *extra_shape)``.
        index: for a ``nav`` buffer with an extra dimension, which channel to draw (default 0).
        axes: the run's scan axes (:func:`beamlens.daemon.sinks.live.axes_json`); motor axes set
            the image extent and labels.

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
        if spec.kind == "nav":
            by_dim = {a.get("dim"): a for a in (axes or []) if a.get("motor")}
            ya, xa = by_dim.get(0), by_dim.get(1)
            extent = None
            if ya and xa and ya.get("num") == data.shape[0] and xa.get("num") == data.shape[1]:
                dy = (ya["stop"] - ya["start"]) / max(1, ya["num"] - 1)
                dx = (xa["stop"] - xa["start"]) / max(1, xa["num"] - 1)
                extent = [xa["start"] - dx / 2, xa["stop"] + dx / 2, ya["start"] - dy / 2, ya["stop"] + dy / 2]
            im = ax.imshow(masked, cmap="viridis", interpolation="nearest", origin="lower", extent=extent,
                           aspect="auto" if extent else None)
            x0, x1 = ax.get_xlim()
            y0, y1 = ax.get_ylim()
            ax.set_xlim(min(x0, x1), max(x0, x1))  # LiveGrid's x_positive="right", y_positive="up"
            ax.set_ylim(min(y0, y1), max(y0, y1))
            unit = lambda a: f"{a['name']} ({a['units']})" if a.get("units") else a["name"]  # noqa: E731
            ax.set_xlabel(unit(xa) if extent else "scan axis 2 (fast), point")
            ax.set_ylabel(unit(ya) if extent else "scan axis 1 (slow), point")
        else:
            im = ax.imshow(masked, cmap="viridis", interpolation="nearest", origin="upper")
            ax.set_xlabel("column bin")
            ax.set_ylabel("row bin")
        fig.colorbar(im, ax=ax, label=label)
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
