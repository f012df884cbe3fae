"""The part every spectral consumer shares: which signal, which axis, preprocessing of each batch,
the stored spectra, and skipped-point accounting.

A spectral consumer takes one signal of a run: an event data key holding a spectrum per point
(``sig_shape (n_channels,)``; the axis from the descriptor's configuration, :func:`signal_axis`),
or a detector frame series whose frames are spectra (``(n_channels,)``, e.g. an EELS or XRF
spectrum per frame) or, with ``sum_frame_rows``, 2-D frames ``(rows, n_channels)`` summed over
their rows (a spectrometer camera dispersing along its columns; vertical binning). Frames carry no
descriptor: their axis is ``preprocess.energy_range`` when given, else the channel index.

Everything the consumer keeps is a declared buffer: the preprocessed spectra are the private nav
buffer ``spectra`` ``(nav, n_out)`` float64 (NaN where no usable spectrum arrived yet; a re-measured
point replaces its spectrum), and the edge energy found for edge normalisation is the private
``single`` buffer ``prep_e0`` (eV), so a restored instance preprocesses new batches exactly as the
original did. Batch fits work on the stored spectra in nav order, so their result does not depend
on the order in which the points arrived, nor on how the run was split and merged.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field

from ..base import (
    Batch, Buffers, BufferSpec, Consumer, ConsumerParams, NotApplicable, SignalInfo, array_signals,
    main_signal,
)
from .preprocess import AXIS_UNITS, Preprocessor, PreprocessParams, signal_axis


class SpectralParams(ConsumerParams):
    data_key: str | None = None
    """Spectrum data key (or frame source name); default: the first 1-D array signal offered."""
    signal: Literal["any", "event", "frame"] = "any"
    """Which kind of signal to take: event data keys, detector frames, or whichever comes first."""
    sum_frame_rows: bool = False
    """Take 2-D detector frames ``(rows, n_channels)`` as the spectrum summed over their rows."""
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    """Normalisation, energy window, derivative and non-finite handling for this consumer's runs."""


class SpectralConsumer(Consumer):
    """Base of consumers that analyse one spectrum per scan point.

    After :meth:`signal` accepted the spectrum: ``self.key`` (data key or frame source),
    ``self.kind`` (``event``/``frame``), ``self.n_raw`` (raw channels), ``self.prep`` (a
    :class:`Preprocessor`), ``self.axis`` (values of the analysed channels), ``self.axis_name``
    (its kind: ``energy``, ``two_theta``, ``q``, ``d``, ``wavelength`` or ``pixel``, published in
    ``run.axes`` with its units) and ``self.energy`` (the axis in eV when it is an energy axis, else
    None: the absorption-specific steps use it). All of it is configuration, rebuilt by calling
    :meth:`signal` again.
    """

    params: SpectralParams

    def signal(self, info: SignalInfo) -> list[BufferSpec]:
        """Accept the run's spectrum signal (see the module docstring); subclasses extend
        :meth:`setup` and :meth:`spectral_buffers`, not this.

        Returns:
            the shared buffers (``spectra``, ``prep_e0``) and the subclass's.

        Raises:
            NotApplicable: a second spectrum, a signal that is not a spectrum (or not the configured
                one), an axis whose units cannot be converted, or preprocessing that cannot apply.
        """
        p = self.params
        main_signal(self, info, p.data_key)
        if p.signal not in ("any", info.kind):
            raise NotApplicable(f"{info.kind} signals are not configured (signal: {p.signal})")
        self.n_raw = self.spectrum_length(info)
        pre = p.preprocess
        try:
            axis = signal_axis(info.descriptor, info.name, self.n_raw, pre.energy_key, pre.axis_kind) \
                if info.descriptor is not None else None
        except ValueError as exc:
            raise NotApplicable(str(exc)) from None
        if axis is None and pre.energy_range is not None:
            kind = pre.axis_kind or "energy"
            values = np.linspace(*pre.energy_range, self.n_raw)
        elif axis is None:
            kind, values = "pixel", None
        else:
            kind, values = axis.kind, axis.values
        try:
            self.prep = Preprocessor(pre, values, self.n_raw, kind)
        except ValueError as exc:
            raise NotApplicable(str(exc)) from None
        self.axis = self.prep.axis
        self.energy = self.prep.energy
        self.axis_name = self.prep.kind
        self.setup(info)
        self.key, self.kind = info.name, info.kind
        self.run.axes[self.axis_name] = (self.axis, AXIS_UNITS[self.axis_name])
        return [
            BufferSpec("spectra", "nav", (self.prep.n_out,), private=True, units=info.units, axis=self.axis_name,
                       description=f"preprocessed {info.name} spectrum per point"),
            BufferSpec("prep_e0", "single", (1,), units="eV", private=True,
                       description="edge energy of the run's edge normalisation"),
            *self.spectral_buffers(),
        ]

    def spectrum_length(self, info: SignalInfo) -> int:
        """Raw channels of ``info`` taken as a spectrum.

        Raises:
            NotApplicable: ``info`` is not a spectrum this consumer takes.
        """
        if array_signals(info, 1):
            return int(info.sig_shape[0])
        if info.kind == "frame" and self.params.sum_frame_rows and array_signals(info, 2):
            return int(info.sig_shape[1])
        raise NotApplicable(f"{info.kind} signal {info.name!r} of shape {info.sig_shape} is not a spectrum"
                            + (" (2-D frames need sum_frame_rows)" if info.kind == "frame" else ""))

    def setup(self, info: SignalInfo) -> None:
        """Subclass configuration after the spectrum was accepted (raise :class:`NotApplicable`
        to refuse it after all)."""

    def spectral_buffers(self) -> list[BufferSpec]:
        """The subclass's buffers (called after :meth:`setup`)."""
        return []

    def raw(self, batch: Batch) -> np.ndarray:
        """The batch as raw spectra ``(n, n_raw)`` float64 (2-D frames summed over rows)."""
        x = batch.data
        if x.ndim == 3:
            x = x.sum(axis=1, dtype=np.float64)
        return np.asarray(x, dtype=np.float64).reshape(len(batch), self.n_raw)

    def preprocessed(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Preprocess one batch and store its usable spectra in the ``spectra`` buffer.

        Unusable points are counted through ``self.run.skipped`` (``nonfinite``; ``no_edge`` for
        edge normalisation, ``no_signal`` for max / area / l2 with a non-positive divisor). Within a
        batch the last spectrum of a repeated nav index wins.

        Returns:
            ``(y (m, n_out) float64, pos (m,) int64, old (m, n_out))``: the stored spectra, their
            nav indices, and what those points held before (NaN rows for points not measured
            before; statistics must forget the others).
        """
        b = self.buffers
        e0 = float(b.prep_e0[0])
        known = math.isfinite(e0)
        y, ok, dropped = self.prep(self.raw(batch), e0=e0 if known else None)
        if self.prep.e0 is not None and not known and self.prep.mode in ("pre_edge", "edge"):
            b.prep_e0[0] = self.prep.e0
        pos = batch.nav_index
        if not ok.all():  # the usual page has every spectrum usable: no counting, no copies
            self.run.skipped(self.prep.drop_reason, int(dropped.sum()))
            self.run.skipped("nonfinite", int((~ok & ~dropped).sum()))
            pos, y = pos[ok], y[ok]
        if len(pos) > 1:
            keep = last_of_each(pos)
            y, pos = y[keep], pos[keep]
        old = b.spectra[pos]
        b.spectra[pos] = y
        return y, pos, old

    def stored(self, buffers: Buffers | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(x (n, n_out) float64, nav indices (n,) int64)`` of every stored spectrum, in nav order."""
        s = (buffers or self.buffers).spectra
        if not s.size:
            return s[:0], np.zeros(0, dtype=np.int64)
        pos = np.flatnonzero(np.isfinite(s[:, 0]))  # one copy of the candidate rows, checked whole
        x = s[pos]
        ok = np.isfinite(x).all(axis=1)
        if not ok.all():
            x, pos = x[ok], pos[ok]
        return x, pos.astype(np.int64)

    def merge(self, dest: Buffers, src: Buffers) -> None:
        """Default rules, after checking that both parts preprocessed with the same edge energy.

        Raises:
            ValueError: the parts found different edge energies (set ``preprocess.e0`` for runs
                split across instances with edge normalisation), or buffers of different shapes.
        """
        e_dest, e_src = float(dest.prep_e0[0]), float(src.prep_e0[0])
        if np.isfinite(e_dest) and np.isfinite(e_src) and abs(e_dest - e_src) > 1e-6:
            raise ValueError(f"parts normalised at different edge energies ({e_dest:.2f} and {e_src:.2f} eV): "
                             "configure preprocess.e0 to split a run")
        super().merge(dest, src)
        if not np.isfinite(e_dest):
            dest.prep_e0[...] = src.prep_e0


def last_of_each(pos: np.ndarray) -> np.ndarray:
    """Indices into ``pos`` ``(n,)`` int64 that keep the last occurrence of each value, in order
    (a point measured twice within one batch: the later spectrum wins)."""
    if len(np.unique(pos)) == len(pos):
        return np.arange(len(pos))
    _, last = np.unique(pos[::-1], return_index=True)
    return np.sort(len(pos) - 1 - last)


def edge_position(y: np.ndarray, energy: np.ndarray | None, derivative: bool) -> np.ndarray:
    """Edge-energy estimate per spectrum ``(n,)`` in eV (channel index without an energy axis):
    the centroid of the positive part of d(mu)/dE (of ``y`` itself when it already is a derivative),
    with finite differences placed between channels.

    Args:
        y: float ``(n, c)`` preprocessed spectra.
    """
    e = np.arange(y.shape[1], dtype=np.float64) if energy is None else energy
    if derivative:
        d, at = y, e
    else:
        d, at = np.diff(y, axis=1) / np.diff(e), (e[1:] + e[:-1]) / 2
    d = np.clip(d, 0.0, None)
    total = d.sum(axis=1)
    return np.where(total > 0, d @ at / np.where(total > 0, total, 1.0), np.nan)
