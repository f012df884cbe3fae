"""``features``: interpretable image statistics of grey-level cross-section micrographs (battery
electrodes in SEM), per frame: void area and fraction, mean particle area, particle count,
surface-layer area and thickness, mean pore diameter.

Following the electrode study of ``../shared/science.md`` §3, each frame is segmented into three
phases — pore/void (darkest), surface layer (mid grey), active particles (brightest) by default;
the order is configurable — with thresholds from multi-Otsu (``skimage.filters.threshold_multiotsu``,
Liao, Chen & Chung 2001) or fixed ones from the config, after a median filter of radius
``smooth_px`` (``skimage.filters.median``; it removes shot noise without moving phase edges). Mid-grey
specks outside connected layer regions of at least ``min_layer_px`` pixels (noise, edges) go to the
nearer of the other two phases by grey level. Statistics come from ``skimage.measure.label`` /
``regionprops`` (4-connected regions): :func:`phase_features` defines them, and the simulated
electrode (:mod:`beamlens.daemon.sim.electrode`) computes its ground truth with the same function.

Units: areas in µm² and lengths in µm when the pixel size is known — ``pixel_size_um`` in the
params, else the frame series' header field named by ``pixel_size_key`` (``pixel_size_um``) — and
in px² / px otherwise (the published ``units`` say which).

Buffers: nav (one value per frame) ``void_area``, ``void_fraction``, ``mean_particle_area``,
``particle_count``, ``surface_layer_area``, ``surface_layer_thickness``, ``mean_pore_diameter``,
and ``cycle`` (the series header's ``x_key`` field, e.g. the cycle number, when present); sig
``segmentation`` (uint8 phase codes 0 pore, 1 particle, 2 layer, of the newest frame); single
``latest`` (the newest frame's features, exported as ``beamlens_image_feature{feature=...}``).
Mergeable: per-frame values merge by fill; ``segmentation`` and ``latest`` follow the frame with the
highest nav index (a private ``newest`` buffer records which).

With ``forecasts``, each named feature is trended against the header's x (the cycle number) and
forecast as the ``trends`` consumer does (:func:`beamlens.consumers.trends.update_forecast`; the
same ``<name>_forecast``, ``crossing``… buffers and ``beamlens_forecast_*`` gauges); with a
``store`` the series spans runs — an electrode imaged once per cycle, one series (run) per cycle.
Forecast buffers are written per frame (a merged partial shows the forecast of its own last frame).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from pydantic import Field, ValidationInfo, model_validator
from skimage.filters import median, threshold_multiotsu
from skimage.measure import label, regionprops
from skimage.morphology import disk, remove_small_objects

from .base import (
    Batch, BufferSpec, Buffers, Consumer, ConsumerParams, NotApplicable, SignalInfo, array_signals,
    main_signal,
)
from .trend_store import TrendStore, default_store
from .trends import ForecastConfig, count_points, forecast_specs, update_forecast

PORE, PARTICLE, LAYER = 0, 1, 2
PHASE_CODES = {"pore": PORE, "particle": PARTICLE, "layer": LAYER}
FEATURES = ("void_area", "void_fraction", "mean_particle_area", "particle_count", "surface_layer_area",
            "surface_layer_thickness", "mean_pore_diameter")


def phase_features(phases: np.ndarray, pixel_size: float = 1.0, min_particle_px: int = 20,
                   min_pore_px: int = 4) -> dict[str, float]:
    """Features of a phase map.

    Args:
        phases: uint8 ``(rows, cols)`` of ``PORE`` / ``PARTICLE`` / ``LAYER`` codes.
        pixel_size: length of a pixel in the output length unit (µm; 1.0: px).
        min_particle_px: particle regions smaller than this (px) are not counted (noise specks).
        min_pore_px: void regions smaller than this (px) do not enter the mean pore diameter.

    Returns:
        ``void_area`` (pore pixels × pixel area), ``void_fraction`` (pore pixels / all pixels),
        ``particle_count`` and ``mean_particle_area`` (4-connected particle regions of at least
        ``min_particle_px``; NaN without any), ``surface_layer_area`` and
        ``surface_layer_thickness`` (= layer area / frame width: the mean thickness of a layer
        spanning the frame), ``mean_pore_diameter`` (mean ``equivalent_diameter_area`` of the
        4-connected void regions of at least ``min_pore_px``; NaN without any).
    """
    a = pixel_size**2
    void = phases == PORE
    parts = [r.area for r in regionprops(label(phases == PARTICLE, connectivity=1)) if r.area >= min_particle_px]
    pores = [r.equivalent_diameter_area for r in regionprops(label(void, connectivity=1)) if r.area >= min_pore_px]
    layer = float((phases == LAYER).sum())
    return {
        "void_area": float(void.sum()) * a,
        "void_fraction": float(void.mean()),
        "mean_particle_area": float(np.mean(parts)) * a if parts else math.nan,
        "particle_count": float(len(parts)),
        "surface_layer_area": layer * a,
        "surface_layer_thickness": layer / phases.shape[1] * pixel_size,
        "mean_pore_diameter": float(np.mean(pores)) * pixel_size if pores else math.nan,
    }


Feature = Literal["void_area", "void_fraction", "mean_particle_area", "particle_count", "surface_layer_area",
                  "surface_layer_thickness", "mean_pore_diameter"]
assert get_args(Feature) == FEATURES


class FeatureForecast(ForecastConfig):
    """A forecast of one feature against the series header's x (``x_key``, e.g. the cycle number)."""

    feature: Feature
    name: str = Field("", pattern=r"^[a-z0-9_]{0,40}$", description="label (default: the feature's name)")

    @model_validator(mode="after")
    def _name(self) -> FeatureForecast:
        if not self.name:
            self.name = self.feature
        return self


class FeaturesParams(ConsumerParams):
    data_key: str | None = None
    """Frame source name or 2-D event data key to analyse; default: the first 2-D array signal."""
    phase_order: tuple[Literal["pore", "particle", "layer"], ...] = ("pore", "layer", "particle")
    """The three phases from darkest to brightest."""
    thresholds: tuple[float, float] | None = None
    """Fixed grey-level thresholds (two, increasing); default: multi-Otsu per frame."""
    smooth_px: int = Field(1, ge=0, le=10)
    """Median-filter radius before thresholding, px (0: none)."""
    min_particle_px: int = Field(20, ge=1)
    min_pore_px: int = Field(4, ge=1)
    min_layer_px: int = Field(200, ge=1)
    """Connected mid-grey regions smaller than this are not surface layer (noise, phase edges)."""
    pixel_size_um: float | None = Field(None, gt=0)
    """µm per px; default: the series header's ``pixel_size_key`` field, else results in px."""
    pixel_size_key: str = "pixel_size_um"
    x_key: str = "cycle"
    """Series header field copied into the ``cycle`` nav buffer (the x of trends), if present."""
    forecasts: list[FeatureForecast] = Field(default_factory=list, max_length=len(FEATURES))
    """Features to trend and forecast against the header's x (GP, as the trends consumer does)."""
    store: Path | Literal[False] | None = None
    """Trend-store file: each frame's features are stored (``features/<feature>``, also readable
    as series of the ``trends`` consumer) and the forecasts use every stored frame of the key,
    across runs (one series per cycle) and restarts. Default (null):
    ``<state.directory>/trends.sqlite`` when the daemon has a state directory, else none; false:
    none — forecasts use only this run's frames."""

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> FeaturesParams:
        self.store = default_store(self.store, info.context)
        if sorted(self.phase_order) != ["layer", "particle", "pore"]:
            raise ValueError(f"phase_order must name pore, particle and layer once each (got {list(self.phase_order)})")
        if len({f.name for f in self.forecasts}) != len(self.forecasts):
            raise ValueError("forecast names must be unique")
        if self.thresholds is not None and not self.thresholds[0] < self.thresholds[1]:
            raise ValueError(f"thresholds must increase (got {list(self.thresholds)})")
        return self


def segment(image: np.ndarray, params: FeaturesParams) -> np.ndarray:
    """Phase map (uint8 ``(rows, cols)``: 0 pore, 1 particle, 2 layer) of one grey-level frame.

    Raises:
        ValueError: a frame with fewer than three distinct grey levels and no fixed thresholds
            (multi-Otsu is undefined).
    """
    img = np.asarray(image)
    if img.dtype.kind == "f":
        img = np.nan_to_num(img, nan=float(np.nanmin(img)) if np.isfinite(img).any() else 0.0)
    if params.smooth_px:
        img = median(img, footprint=disk(params.smooth_px))
    if params.thresholds is not None:
        t = np.asarray(params.thresholds, dtype=np.float64)
    else:
        t = threshold_multiotsu(img, classes=3)
    cls = np.digitize(img, t).astype(np.uint8)  # 0 darkest .. 2 brightest
    lut = np.array([PHASE_CODES[p] for p in params.phase_order], dtype=np.uint8)
    phases = lut[cls]
    layer = phases == LAYER
    real = remove_small_objects(layer, max_size=params.min_layer_px - 1, connectivity=1) if params.min_layer_px > 1 else layer
    specks = layer & ~real
    if specks.any():  # to the nearer of the other two phases (by the thresholds' midpoint)
        others = [c for c in range(3) if lut[c] != LAYER]
        mid = 0.5 * (t[0] + t[1]) if others == [0, 2] else (t[1] if others == [1, 2] else t[0])
        low, high = lut[others[0]], lut[others[1]]
        phases[specks] = np.where(img[specks] < mid, low, high)
    return phases


class FeaturesConsumer(Consumer):
    """Per-frame electrode image features; see the module docstring.

    Input: one 2-D array signal (a frame series, or a 2-D event data key), any real dtype.
    Frames with non-finite values only, or too few grey levels for multi-Otsu, are skipped and
    counted (``nonfinite``, ``flat_frame``).
    """

    name = "features"
    Params = FeaturesParams
    params: FeaturesParams

    def signal(self, info: SignalInfo) -> list[BufferSpec]:
        p = self.params
        main_signal(self, info, p.data_key)
        if not array_signals(info, 2):
            raise NotApplicable(f"{info.kind} signal {info.name!r} of shape {info.sig_shape} is not a 2-D image")
        meta = info.series.meta if info.series is not None else {}
        size = p.pixel_size_um
        if size is None:
            v = meta.get(p.pixel_size_key)
            size = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e6 else None
        self.key, self.pixel_size = info.name, (size or 1.0)
        x = meta.get(p.x_key)
        self.x_value = float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else math.nan
        area, length = ("um^2", "um") if size else ("px^2", "px")
        units = {"void_area": area, "void_fraction": "", "mean_particle_area": area, "particle_count": "",
                 "surface_layer_area": area, "surface_layer_thickness": length, "mean_pore_diameter": length}
        specs = [BufferSpec(f, "nav", units=units[f], description=f.replace("_", " ") + " of each frame") for f in FEATURES]
        specs += [
            BufferSpec("cycle", "nav", description=f"series header {p.x_key!r} (the x of trends)"),
            BufferSpec("segmentation", "sig", extra_shape=tuple(info.sig_shape), dtype="uint8", merge=None,
                       description="phases of the newest frame: 0 pore/void, 1 particle, 2 surface layer"),
            BufferSpec("latest", "single", extra_shape=(len(FEATURES),), merge=None, metric="image_feature",
                       labels=FEATURES, description="features of the newest frame"),
            BufferSpec("newest", "single", extra_shape=(1,), private=True, merge=None,
                       description="nav index of the frame in segmentation"),
        ]
        if p.forecasts:
            specs += forecast_specs(p.forecasts)
        return specs

    def process(self, batch: Batch, staged: object = None) -> bool:
        b, p = self.buffers, self.params
        for img, pos in zip(batch.data, batch.nav_index):
            if img.dtype.kind == "f" and not np.isfinite(img).any():
                self.run.skipped("nonfinite", 1)
                continue
            try:
                phases = segment(img, p)
            except ValueError:
                self.run.skipped("flat_frame", 1)
                continue
            f = phase_features(phases, self.pixel_size, p.min_particle_px, p.min_pore_px)
            for name in FEATURES:
                b[name][pos] = f[name]
            b.cycle[pos] = self.x_value
            if not pos < b.newest[0]:  # NaN (nothing yet) or a later frame
                b.newest[0] = pos
                b.segmentation[...] = phases
            if (p.forecasts or p.store is not None) and math.isfinite(self.x_value):
                self._forecast(int(pos), f)
        return True

    def _forecast(self, pos: int, features: dict[str, float]) -> None:
        """Store the frame's features (every one, ``features/<feature>``, x the header's
        ``x_key``, seq ``pos + 1``: the ``trends`` consumer reads them with ``reads: store``) and
        update each forecast (see :class:`FeaturesParams`)."""
        b, p = self.buffers, self.params
        store = TrendStore(p.store) if p.store is not None else None
        try:
            if store is not None:
                for name in FEATURES:
                    store.add(f"features/{name}", self.run.uid, [pos + 1], [self.x_value], [features[name]])
            for cfg in p.forecasts:
                key = f"features/{cfg.feature}"
                if store is not None:
                    runs = store.runs(key)
                    x = np.concatenate([r.x for r in runs])
                    y = np.concatenate([r.value for r in runs])
                else:
                    ok = np.isfinite(b.cycle) & np.isfinite(b[cfg.feature])
                    x, y = b.cycle[ok], b[cfg.feature][ok]
                o = np.argsort(x, kind="stable")
                count_points(b, cfg, 1)
                update_forecast(b, p.forecasts, cfg, x[o], y[o])
        finally:
            if store is not None:
                store.close()

    def merge(self, dest: Buffers, src: Buffers) -> None:
        super().merge(dest, src)
        if np.isfinite(src.newest[0]) and not src.newest[0] < dest.newest[0]:
            dest.newest[0] = src.newest[0]
            dest.segmentation[...] = src.segmentation

    def results(self) -> None:
        b = self.buffers
        if "newest" in b and np.isfinite(b.newest[0]):  # nothing declared: the run had no image for us
            i = int(b.newest[0])
            b.latest[...] = [b[name][i] for name in FEATURES]
