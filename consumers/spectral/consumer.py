"""The part every spectral consumer shares: which data key, which energy axis, preprocessing of
each EventPage, and skipped-point accounting."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import Field

from ..base import Consumer, ConsumerParams, NotApplicable, first_array_key, stack_rows
from .preprocess import AXIS_UNITS, Preprocessor, PreprocessParams, signal_axis


class SpectralParams(ConsumerParams):
    data_key: str | None = None
    """Spectrum data key; default: the first inline 1-D array key."""
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    """Normalisation, energy window, derivative and non-finite handling for this consumer's runs."""


class SpectralConsumer(Consumer):
    """Base of consumers that analyse one spectrum per scan point.

    After :meth:`descriptor`: ``self.key`` (data key), ``self.n_raw`` (raw channels), ``self.prep``
    (a :class:`Preprocessor`), ``self.axis`` (values of the analysed channels), ``self.axis_name``
    (its kind: ``energy``, ``two_theta``, ``q``, ``d``, ``wavelength`` or ``pixel``, published in
    ``run.axes`` with its units) and ``self.energy`` (the axis in eV when it is an energy axis,
    else None: the absorption-specific steps use it).
    """

    params: SpectralParams

    def descriptor(self, doc: Mapping[str, Any]) -> None:
        """Set up from the first primary descriptor; a later one (e.g. a restarted stream) keeps
        the run's setup. Subclasses extend :meth:`setup`, not this."""
        if not hasattr(self, "prep"):
            self.setup(doc)

    def setup(self, doc: Mapping[str, Any]) -> None:
        """Data key, preprocessing and energy axis from the run's first primary descriptor.

        Raises:
            NotApplicable: no usable 1-D data key, or preprocessing that cannot apply.
        """
        self.key = self.params.data_key or first_array_key(doc, ndim=1)
        if self.key not in doc["data_keys"]:
            raise NotApplicable(f"data key {self.key!r} not in the primary descriptor")
        shape = tuple(doc["data_keys"][self.key].get("shape") or ())
        if len(shape) != 1:
            raise NotApplicable(f"data key {self.key!r} has shape {shape}, not a spectrum")
        self.n_raw = shape[0]
        pre = self.params.preprocess
        try:
            axis = signal_axis(doc, self.key, self.n_raw, pre.energy_key, pre.axis_kind)
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
            self.prep = Preprocessor(self.params.preprocess, values, self.n_raw, kind)
        except ValueError as exc:
            raise NotApplicable(str(exc)) from None
        self.axis = self.prep.axis
        self.energy = self.prep.energy
        self.axis_name = self.prep.kind
        self.run.axes[self.axis_name] = (self.axis, AXIS_UNITS[self.axis_name])

    def preprocessed(self, doc: Mapping[str, Any], positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stack, preprocess and filter one EventPage.

        Returns:
            ``(y (m, n_out) float64, pos (m,) int64)`` for the usable points; unusable ones are
            counted through ``self.run.skipped`` (``nonfinite``; ``no_edge`` for edge normalisation,
            ``no_signal`` for max / area / l2 with a non-positive divisor).

        Raises:
            BadData: values that do not match the declared shape.
        """
        x = stack_rows(doc["data"][self.key], (self.n_raw,))
        y, ok, no_edge = self.prep(x)
        self.run.skipped(self.prep.drop_reason, int(no_edge.sum()))
        self.run.skipped("nonfinite", int((~ok & ~no_edge).sum()))
        keep = ok & (positions >= 0)
        return y[keep], positions[keep]


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
