"""``defects``: live point-defect detection, classification and tracking on atomically resolved
microscope frames (Maksov et al., npj Comput. Mater. 5, 12 (2019)).

Per frame:

1. the shipped segmentation network (``beamlens/models/defect_net.onnx``, sha256 checked against its
   model card at load) gives a per-pixel defect probability; frames larger than the network's tile
   are cut into overlapping tiles and stitched (:class:`beamlens.models.defect_net.DefectNet`);
2. threshold + 8-connected components (scipy.ndimage) -> sub-pixel centres (probability-weighted
   centre of mass), and a square patch of the z-scored frame around each centre;
3. each patch is projected on principal components (PCA, fitted once on the first ``fit_after``
   patches) and classified by a Gaussian mixture (scikit-learn), fitted on the first frames and
   refitted every ``refit_every`` frames from its previous parameters (``warm_start``) on a
   reservoir of recent patches, so class labels stay put. Classes are numbered by increasing mean
   patch-centre intensity (class 0: darkest centre);
4. defects are tracked between consecutive frames (:class:`beamlens.consumers.tracking.DefectTracker`)
   -> per-class diffusion coefficients (lag-1 MSD estimator) and the class transition matrix.

Steps 1-2 are :meth:`DefectsConsumer.stage`: stateless, so the daemon runs them on its pool,
concurrently for several batches, pipelined: at most ``cores // threads`` network calls at once (one
with the default ``threads: 0``, which gives each call every core), so one batch's blobs and patches
overlap the next batch's inference rather than two inferences sharing the cores; steps 3-4 are
:meth:`DefectsConsumer.process`, order-dependent, on the daemon's thread in batch order
(``mergeable = False``). The consumer starts no thread.

State: everything is a declared buffer (private ones for the PCA projection, the mixture's
parameters, the reservoir, the patch sums, the tracker, the counters and the held frames), so a
checkpoint is arrays and a fresh instance given the same :meth:`DefectsConsumer.signal` continues
exactly where the old one stopped. The mixture is rebuilt from its buffers at each batch (setting
scikit-learn's fitted attributes), the projection is ``(x - mean) @ components.T``.

Frames that arrive before the mixture is fitted are held, as buffers: their frame and nav index,
their defects' centres and patches (at most ``max(fit_after, n_classes) - 1`` defects: the frame
that reaches ``fit_after`` is fitted on together with the held ones, from the stage's result), at
most ``hold_frames`` frames. They are analysed as soon as the mixture is fitted; when ``hold_frames``
is reached first (frames with few defects), the mixture is fitted on the defects held if there are
at least ``n_classes`` and ``pca_components``, else the oldest held frame is dropped and counted
(skipped, reason ``too_few_defects``). :meth:`DefectsConsumer.finish` fits on what is held at the
end of a series in the same way (on the daemon's pool, through ``run.submit``). Held frames keep
their nav index: an open-ended series whose rolling window moves on while frames are still held
(possible only with ``hold_frames`` near ``limits.open_ended_max_points``) would place them wrongly.
"""
from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from beamlens.models.defect_net import (MODELS, DefectNet, available_cores, find_defects, load_card, load_session,
                                       normalise)

from .base import BadData, Batch, BufferSpec, Consumer, ConsumerParams, NotApplicable, SignalInfo
from .tracking import DefectTracker, diffusion, transition_matrix

log = logging.getLogger(__name__)

#: Series-metadata keys read, in order, for the time between frames when ``frame_time_s`` is not set.
FRAME_TIME_KEYS = ("frame_time_s", "frame_time", "frame_period_s")
#: The newest frame is published binned to at most this many px per side.
FRAME_PREVIEW_PX = 256


class DefectsParams(ConsumerParams):
    precision: Literal["fp32", "int8"] = "fp32"
    """Which shipped network to run when ``model`` is not set: ``fp32`` (``defect_net.onnx``) or its
    int8 static quantisation ``int8`` (``defect_net_int8.onnx``; same precision/recall on held-out
    simulated frames within 0.01, see its model card; faster on CPUs with VNNI/AMX)."""
    model: str | None = None
    """Path of an ONNX model; default: the shipped network of ``precision``."""
    card: str | None = None
    """Path of its model card (JSON with ``sha256``); default: ``<model stem>.json`` beside the model."""
    providers: list[str] = ["CUDAExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider"]
    """onnxruntime execution providers, in order of preference; unavailable ones are skipped
    (OpenVINO with the optional ``beamlens[openvino]`` extra)."""
    threads: int = Field(0, ge=0)
    """onnxruntime intra-op threads per inference call (0: the cores this process may run on,
    ``os.sched_getaffinity`` capped by the cgroup CPU quota). The daemon may run stages of several
    batches at once; at most ``cores // threads`` of them (at least one) are in the network at a time."""
    spinning: bool = False
    """Let onnxruntime's idle threads spin-wait between calls (faster alone, slower beside the
    daemon's receive, decode and post-processing threads, which then lose their cores)."""
    threshold: float | None = Field(None, gt=0, lt=1)
    """Probability threshold; default: the model card's."""
    n_classes: int = Field(3, ge=1, le=12)
    patch_px: int = Field(24, ge=8, le=128)
    """Side of the square patch classified around each defect, px."""
    pca_components: int = Field(4, ge=1, le=32)
    fit_after: int = Field(80, ge=4, le=10_000)
    """Defects collected before PCA and the mixture are first fitted."""
    hold_frames: int = Field(64, ge=1, le=10_000)
    """Most frames held while the mixture is not fitted yet (see the module docstring)."""
    refit_every: int = Field(100, ge=1)
    """Frames between mixture updates."""
    reservoir: int = Field(1000, ge=10, le=100_000)
    """Most recent patches kept for the updates."""
    max_displacement_px: float = Field(26.0, gt=0)
    """Largest displacement linked between consecutive frames, px (above the lattice hop, below the
    typical distance between defects)."""
    frame_time_s: float | None = Field(None, gt=0)
    """Time between frames, s; default: the series metadata (``frame_time_s``), else 1 s."""
    map_bin_px: int = Field(8, ge=1)
    """Bin size of the defect-density map, px."""
    max_defects: int = Field(256, ge=1, le=10_000)
    """Defects listed per frame in the ``positions`` buffer and linked to the next frame by the
    tracker (further ones are counted and classified, but neither listed nor linked)."""
    seed: int = 0
    """Random state of PCA and the mixture (reproducible classes)."""


@dataclass(frozen=True)
class StagedFrames:
    """What :meth:`DefectsConsumer.stage` found in a batch (read-only by convention).

    Attributes:
        usable: bool ``(n,)``: frames that could be normalised (not constant, finite).
        centres: per usable frame, float64 ``(m, 2)`` defect centres (row, col), px.
        patches: per usable frame, float32 ``(m, p, p)`` z-scored patches around the centres.
        preview: float64 block means of the last usable z-scored frame (the ``frame`` buffer's
            shape), or None when no frame was usable.
    """

    usable: np.ndarray
    centres: list[np.ndarray]
    patches: list[np.ndarray]
    preview: np.ndarray | None


class DefectsConsumer(Consumer):
    """Point defects of each frame, their classes, tracks and statistics.

    Input: one frame signal (``kind == "frame"``) ``(n, rows, cols)``, any real dtype (HAADF
    intensity), rows and cols at least the network tile (256 px for the shipped model).

    Output buffers (K = ``n_classes``):

    - ``counts`` (nav, ``(K,)``): defects per class in each frame; ``total`` (nav): all defects of
      the frame (every defect is classified, so ``total == counts.sum(-1)``);
    - ``positions`` (nav, ``(max_defects, 3)``, px): row, col, class of each defect, NaN-padded;
    - ``defects`` (single, ``(K,)``, metric ``beamlens_defects``): counts of the newest frame;
    - ``density`` (single, ``(1,)``, metric ``beamlens_defect_density_per_square_pixel``): defects
      per px^2 in the newest frame;
    - ``density_map`` (sig, ``(ceil(rows/b), ceil(cols/b))``): mean defects per px^2 per frame, in
      bins of ``map_bin_px``;
    - ``diffusion`` (single, ``(K,)``, px^2/s) and ``diffusion_steps`` (single, ``(K,)``);
    - ``transition_matrix`` (single, ``(K, K)``): P(class j in the next frame | class i);
    - ``class_patches`` (single, ``(K, p, p)``): mean z-scored patch of each class;
    - ``frame`` (sig, ``(ceil(rows/f), ceil(cols/f))``, f = ceil(max(rows, cols) / 256)): the newest
      analysed frame, z-scored and block-averaged by f, and ``frame_defects`` (single,
      ``(max_defects, 3)``, px of the full frame): row, col, class of its defects (NaN-padded), and
      ``frame_bin`` (single, ``(1,)``, px): f; for the live page's picture of the newest frame.

    ``density_map``, ``diffusion``, ``diffusion_steps``, ``transition_matrix`` and ``class_patches``
    are derived from the private state by :meth:`results`. Frames are tracked by frame number
    (``seq_num - 1``), so a dropped frame breaks the tracks.

    Raises (from :meth:`signal`): NotApplicable for event signals, frames that are not 2-D or
    smaller than the tile, and a second frame series; ``ModelIntegrityError`` (from the model
    loader) for a model whose sha256 differs from its card. (From :meth:`process`): BadData
    ``wrong_shape`` for frames of another shape than the series'.
    """

    name = "defects"
    Params = DefectsParams
    params: DefectsParams
    mergeable = False
    has_stage = True

    # -- the contract ------------------------------------------------------------------------
    def signal(self, info: SignalInfo) -> list[BufferSpec]:
        p = self.params
        if info.kind != "frame":
            raise NotApplicable(f"defects analyses detector frames, not the event data key {info.name!r}")
        if getattr(self, "source", None) is not None:
            raise NotApplicable(f"already analysing the frames of {self.source!r}")
        if len(info.sig_shape) != 2:
            raise NotApplicable(f"defects needs 2-D frames, the series has shape {info.sig_shape}")
        shipped_model, shipped_card = MODELS[p.precision]
        model = Path(p.model) if p.model else shipped_model
        card_path = Path(p.card) if p.card else (shipped_card if p.model is None else model.with_suffix(".json"))
        card = load_card(card_path)
        tile = int(card["input"]["tile"])
        if min(info.sig_shape) < tile:
            raise NotApplicable(f"frames of {info.sig_shape} px are smaller than the model tile {tile} px")
        self.net = DefectNet(load_session(model, card, p.providers, p.threads, p.spinning), card)
        intra = max(1, int(self.net.session.get_session_options().intra_op_num_threads))
        self.inference_slots = max(1, available_cores() // intra)
        """Network calls of concurrent stages allowed at once: the cores this process may use over the
        intra-op threads of one call (1 by default, where one call takes every core), so the daemon's
        pool overlaps one batch's blob finding and patches with the next batch's inference instead of
        running two inferences that share the cores (and the caches) with each other."""
        self._inference = threading.BoundedSemaphore(self.inference_slots)
        self.model_path, self.card = model, card
        self.model_sha256 = str(card["sha256"])  # recorded in run files and derived documents
        post = card["postprocessing"]
        self.threshold = p.threshold or float(post["threshold"])
        self.min_area, self.max_area = int(post["min_area_px"]), int(post["max_area_px"])
        self.shape = tuple(int(s) for s in info.sig_shape)
        meta = info.series.meta if info.series is not None else {}
        self.frame_time = p.frame_time_s or next((float(meta[k]) for k in FRAME_TIME_KEYS if k in meta), None)
        if self.frame_time is None:
            self.log.warning("no frame time in the series metadata nor in params: diffusion in px^2 per frame")
            self.frame_time = 1.0
        self.map_shape = tuple(-(-s // p.map_bin_px) for s in self.shape)
        self.frame_bin = -(-max(self.shape) // FRAME_PREVIEW_PX)
        self.frame_preview_shape = tuple(-(-s // self.frame_bin) for s in self.shape)
        self.fit_at = max(p.fit_after, p.n_classes)
        self.source = info.name
        return self._result_specs() + self._state_specs()

    def _result_specs(self) -> list[BufferSpec]:
        k, p = self.params.n_classes, self.params.patch_px
        return [
            BufferSpec("counts", "nav", (k,), units="defects", description="defects per class in each frame"),
            BufferSpec("total", "nav", units="defects", description="defects in each frame"),
            BufferSpec("positions", "nav", (self.params.max_defects, 3), units="px",
                       description="row, col, class of each defect in each frame (NaN-padded)"),
            BufferSpec("defects", "single", (k,), units="defects", metric="defects",
                       description="defects per class in the newest frame"),
            BufferSpec("density", "single", (1,), units="1/px^2", metric="defect_density_per_square_pixel",
                       description="defects per px^2 in the newest frame"),
            BufferSpec("density_map", "sig", self.map_shape, units="1/px^2",
                       description=f"mean defects per px^2 per frame, {self.params.map_bin_px} px bins"),
            BufferSpec("diffusion", "single", (k,), units="px^2/s",
                       description="diffusion coefficient per class (lag-1 mean squared displacement)"),
            BufferSpec("diffusion_steps", "single", (k,), units="steps",
                       description="same-class frame-to-frame links behind each diffusion coefficient"),
            BufferSpec("transition_matrix", "single", (k, k),
                       description="probability that a defect of class i is of class j in the next frame"),
            BufferSpec("class_patches", "single", (k, p, p), description="mean z-scored patch of each class"),
            BufferSpec("frame", "sig", self.frame_preview_shape,
                       description=f"newest analysed frame, z-scored, {self.frame_bin} x {self.frame_bin} px bins"),
            BufferSpec("frame_defects", "single", (self.params.max_defects, 3), units="px",
                       description="row, col, class of each defect in the newest analysed frame (NaN-padded)"),
            BufferSpec("frame_bin", "single", (1,), units="px", description="frame px per pixel of the newest-frame picture"),
        ]

    def _state_specs(self) -> list[BufferSpec]:
        p = self.params
        k, c, d = p.n_classes, p.pca_components, p.patch_px * p.patch_px

        def state(name: str, shape: tuple[int, ...], dtype: str = "float64", units: str = "", what: str = "") -> BufferSpec:
            return BufferSpec(name, "single", shape, dtype, units=units, description=what, private=True)

        return [
            state("frames_seen", (1,), "int64", "frames", "usable frames that reached process (held or analysed)"),
            state("frames_analysed", (1,), "int64", "frames", "frames classified and tracked"),
            state("frames_since_fit", (1,), "int64", "frames", "frames since the last mixture update"),
            state("map_counts", self.map_shape, units="defects", what="defects per density-map bin, all frames"),
            state("patch_sums", (k, p.patch_px, p.patch_px), what="sum of the z-scored patches of each class"),
            state("patch_n", (k,), "int64", "defects", "patches summed per class"),
            state("pca_k", (1,), "int64", what="principal components fitted (0: not fitted yet)"),
            state("pca_mean", (d,), what="mean patch (PCA)"),
            state("pca_components", (c, d), what="principal axes of the patches (rows; the first pca_k used)"),
            state("gmm_weights", (k,), what="mixture weights"),
            state("gmm_means", (k, c), what="mixture means in PCA space"),
            state("gmm_covariances", (k, c, c), what="mixture covariances in PCA space"),
            state("gmm_precisions_cholesky", (k, c, c), what="Cholesky factors of the mixture precisions"),
            state("gmm_lower_bound", (1,), what="log-likelihood lower bound of the last EM fit"),
            state("gmm_converged", (1,), "int64", what="whether the last EM fit converged"),
            state("reservoir", (p.reservoir, c), what="PCA features of the most recent patches (oldest first)"),
            state("reservoir_n", (1,), "int64", "defects", "rows of the reservoir filled"),
            state("held_frames", (p.hold_frames, 3), "int64", what="frame index, nav index, defects of each held frame"),
            state("held_n", (1,), "int64", "frames", "frames held until the mixture is fitted"),
            state("held_centres", (self.fit_at - 1, 2), units="px", what="row, col of the held frames' defects"),
            state("held_patches", (self.fit_at - 1, p.patch_px, p.patch_px), "float32",
                  what="z-scored patches of the held frames' defects"),
            state("newest", self.frame_preview_shape, what="picture of the newest frame received"),
            state("newest_index", (1,), what="frame index of the newest frame received (NaN: none)"),
            *DefectTracker.specs(k, p.max_defects),
        ]

    @property
    def tracker(self) -> DefectTracker:
        """The tracker over this consumer's buffers (built per call: it keeps no array)."""
        return DefectTracker(self.params.n_classes, self.params.max_displacement_px, self.frame_time, self.buffers)

    def stage(self, batch: Batch) -> StagedFrames | None:
        """Network inference, blob finding and patch extraction of a batch; pure (reads only params
        and what :meth:`signal` set up), so batches may be staged concurrently and in any order.

        Returns:
            :class:`StagedFrames`, or None for frames of the wrong shape (:meth:`process` then
            raises BadData).
        """
        frames = batch.data
        if frames.ndim != 3 or tuple(frames.shape[1:]) != self.shape:
            return None
        z = np.empty((len(frames), *self.shape), dtype=np.float32)
        usable = np.ones(len(frames), dtype=bool)
        for i, f in enumerate(frames):
            try:
                normalise(f, out=z[i])
            except ValueError:  # constant or not finite
                usable[i] = False
        z = z[usable] if not usable.all() else z
        if not len(z):
            return StagedFrames(usable, [], [], None)
        with self._inference:
            prob = self.net.probability_normalised(z)
        centres = [find_defects(pmap, self.threshold, self.min_area, self.max_area) for pmap in prob]
        patches = [self._patches(frame, c) for frame, c in zip(z, centres)]
        return StagedFrames(usable, centres, patches, _bin_mean(z[-1], self.frame_bin))

    def process(self, batch: Batch, staged: StagedFrames | None = None) -> bool:
        frames = batch.data
        if frames.ndim != 3 or tuple(frames.shape[1:]) != self.shape:
            raise BadData("wrong_shape", f"frames of shape {frames.shape[1:]} in a series of {self.shape}")
        if staged is None:  # called without the daemon's stage (the result is the same)
            staged = self.stage(batch)
        b = self.buffers
        if b.frames_seen[0] == 0:
            self._initialise()
        if not staged.usable.all():
            self.run.skipped("constant_frame", int((~staged.usable).sum()))
        index = (batch.seq_num[staged.usable] - 1).astype(np.int64)  # frame numbers
        pos = batch.nav_index[staged.usable]
        if not len(index):
            return False
        b.frames_seen[0] += len(index)
        b.newest[...] = staged.preview
        b.newest_index[0] = index[-1]
        analysed = False
        for f, n, centres, patches in zip(index, pos, staged.centres, staged.patches):
            if b.pca_k[0] == 0:
                held = int(b.held_frames[:b.held_n[0], 2].sum())
                if held + len(centres) >= self.fit_at:
                    self._first_fit(patches)
                    self._drain()
                else:
                    if b.held_n[0] == len(b.held_frames):
                        self._held_full()
                    if b.pca_k[0] == 0:
                        self._hold(int(f), int(n), centres, patches)
                        continue
                    self._drain()
            self._analyse(int(f), int(n), centres, patches)
            analysed = True
        return analysed

    def results(self) -> None:
        b, p = self.buffers, self.params
        derived = (b.diffusion, b.diffusion_steps, b.transition_matrix, b.class_patches, b.density_map)
        if b.frames_analysed[0] == 0:
            for array in derived:
                array[...] = np.nan
            return
        b.diffusion[...] = diffusion(b.track_sum_sq, b.track_steps, self.frame_time)
        b.diffusion_steps[...] = b.track_steps
        b.transition_matrix[...] = transition_matrix(b.track_transitions)
        with np.errstate(invalid="ignore", divide="ignore"):
            b.class_patches[...] = b.patch_sums / b.patch_n[:, None, None]
        b.density_map[...] = b.map_counts / (b.frames_analysed[0] * p.map_bin_px**2)

    def finish(self) -> None:
        """End of the series: classify the frames still held, if they have enough defects (the fit
        runs on the daemon's pool; its result is installed, and the held frames analysed, on the
        daemon's thread)."""
        b = self.buffers
        if "held_n" not in b or b.held_n[0] == 0 or b.pca_k[0] > 0:
            return
        if not self._enough_held():
            n = int(b.held_frames[:b.held_n[0], 2].sum())
            self.log.info("only %d defects in the series: too few to classify", n)
            self.run.skipped("too_few_defects", int(b.held_n[0]))
            b.held_n[0] = 0
            return
        self.run.submit(fit_classes, self._held_x(self._no_patches()), self.params, then=self._finished_fit)

    def _finished_fit(self, fit: ClassFit) -> None:
        self._install(fit, int(self.buffers.held_n[0]))
        self._drain()
        self.results()

    # -- held frames -------------------------------------------------------------------------
    def _hold(self, frame: int, pos: int, centres: np.ndarray, patches: np.ndarray) -> None:
        b = self.buffers
        h = int(b.held_n[0])
        start = int(b.held_frames[:h, 2].sum())
        b.held_frames[h] = (frame, pos, len(centres))
        b.held_centres[start:start + len(centres)] = centres
        b.held_patches[start:start + len(centres)] = patches
        b.held_n[0] = h + 1

    def _held(self) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        """The held frames, oldest first: (frame index, nav index, centres, patches); copies."""
        b = self.buffers
        out, start = [], 0
        for frame, pos, m in b.held_frames[:b.held_n[0]]:
            out.append((int(frame), int(pos), b.held_centres[start:start + m].copy(), b.held_patches[start:start + m].copy()))
            start += m
        return out

    def _held_full(self) -> None:
        """``hold_frames`` frames held and not enough defects for ``fit_after``: fit on them if
        possible, else drop the oldest held frame (counted)."""
        if self._enough_held():
            self._first_fit(self._no_patches())
            return
        b = self.buffers
        held = self._held()[1:]
        b.held_n[0] = 0
        for item in held:
            self._hold(*item)
        self.run.skipped("too_few_defects", 1)

    def _enough_held(self) -> bool:
        """Whether the held defects alone are enough to fit on (``n_classes`` and ``pca_components``)."""
        b, p = self.buffers, self.params
        n = int(b.held_frames[:b.held_n[0], 2].sum())
        return n >= max(p.n_classes, p.pca_components, 2)

    def _no_patches(self) -> np.ndarray:
        return np.empty((0, self.params.patch_px, self.params.patch_px), dtype=np.float32)

    def _drain(self) -> None:
        held = self._held()
        self.buffers.held_n[0] = 0
        for item in held:
            self._analyse(*item)

    # -- internals ---------------------------------------------------------------------------
    def _initialise(self) -> None:
        """Zero the sums and counters of freshly allocated buffers (floats are allocated NaN)."""
        b = self.buffers
        for name in ("map_counts", "patch_sums", "patch_n", "pca_k", "reservoir_n", "held_n", "frames_analysed",
                     "frames_since_fit", "gmm_converged"):
            b[name][...] = 0
        DefectTracker.reset(b)

    def _patches(self, frame: np.ndarray, centres: np.ndarray) -> np.ndarray:
        """float32 ``(m, p, p)`` patches of ``frame`` around the rounded ``centres``, mirrored at
        the frame edges (``np.pad(frame, p // 2, mode="reflect")``, without padding a copy of
        the whole frame for every frame: only the patches' pixels are read)."""
        p = self.params.patch_px
        offsets = np.arange(p) - p // 2
        idx = np.round(centres).astype(np.intp)
        rows = _reflect(idx[:, :1] + offsets, frame.shape[0])
        cols = _reflect(idx[:, 1:] + offsets, frame.shape[1])
        return frame[rows[:, :, None], cols[:, None, :]].astype(np.float32, copy=False)

    def _project(self, patches: np.ndarray) -> np.ndarray:
        """PCA features float64 ``(m, pca_k)`` of float ``(m, p, p)`` patches."""
        b = self.buffers
        return project(patches.reshape(len(patches), -1), b.pca_mean, b.pca_components[:int(b.pca_k[0])])

    def _held_x(self, current: np.ndarray) -> np.ndarray:
        """float64 ``(n, p * p)``: the held patches, oldest first, then ``current`` (``(m, p, p)``)."""
        d = self.params.patch_px ** 2
        return np.concatenate([q.reshape(-1, d) for *_, q in self._held()] + [current.reshape(-1, d)]).astype(np.float64)

    def _first_fit(self, current: np.ndarray) -> None:
        """Fit PCA and the mixture on the held patches plus ``current`` (float32 ``(m, p, p)``, the
        patches of the frame being processed), now."""
        self._install(fit_classes(self._held_x(current), self.params), int(self.buffers.held_n[0]) + (len(current) > 0))

    def _install(self, fit: ClassFit, frames: int) -> None:
        """Write a fit into the buffers and start the reservoir with the features it was fitted on."""
        b, p = self.buffers, self.params
        k = len(fit.pca_components)
        b.pca_k[0] = k
        b.pca_mean[...] = fit.pca_mean
        b.pca_components[...] = np.nan
        b.pca_components[:k] = fit.pca_components
        self._store_gmm(fit.gmm)
        keep = fit.feats[-p.reservoir:]
        b.reservoir[:len(keep), :k] = keep
        b.reservoir_n[0] = len(keep)
        self.log.info("defect classes fitted on %d defects (%d frames)", len(fit.feats), frames)

    def _gmm(self) -> GaussianMixture:
        """The mixture rebuilt from its buffers (scikit-learn's fitted attributes), ready to predict
        and to be updated from its parameters (``warm_start``, at most 10 EM steps)."""
        b, p = self.buffers, self.params
        k = int(b.pca_k[0])
        gmm = GaussianMixture(p.n_classes, covariance_type="full", reg_covar=1e-3, n_init=2, random_state=p.seed,
                              warm_start=True, max_iter=10)
        gmm.weights_ = b.gmm_weights.copy()
        gmm.means_ = b.gmm_means[:, :k].copy()
        gmm.covariances_ = b.gmm_covariances[:, :k, :k].copy()
        gmm.precisions_cholesky_ = b.gmm_precisions_cholesky[:, :k, :k].copy()
        gmm.precisions_ = gmm.precisions_cholesky_ @ gmm.precisions_cholesky_.transpose(0, 2, 1)
        gmm.converged_ = bool(b.gmm_converged[0])
        gmm.lower_bound_ = float(b.gmm_lower_bound[0])
        gmm.n_iter_ = 0
        gmm.n_features_in_ = k
        return gmm

    def _store_gmm(self, gmm: GaussianMixture) -> None:
        b = self.buffers
        k = gmm.means_.shape[1]
        b.gmm_weights[...] = gmm.weights_
        b.gmm_means[:, :k] = gmm.means_
        b.gmm_covariances[:, :k, :k] = gmm.covariances_
        b.gmm_precisions_cholesky[:, :k, :k] = gmm.precisions_cholesky_
        b.gmm_lower_bound[0] = gmm.lower_bound_
        b.gmm_converged[0] = int(gmm.converged_)

    def _analyse(self, frame_index: int, pos: int, centres: np.ndarray, patches: np.ndarray) -> None:
        b, p = self.buffers, self.params
        k = p.n_classes
        if len(centres):
            feats = self._project(patches)
            kc = feats.shape[1]
            classes = classify(feats, b.gmm_weights, b.gmm_means[:, :kc], b.gmm_precisions_cholesky[:, :kc, :kc])
            n_res = int(b.reservoir_n[0])
            kept = np.concatenate([b.reservoir[:n_res, :kc], feats])[-p.reservoir:]
            b.reservoir[:len(kept), :kc] = kept
            b.reservoir_n[0] = len(kept)
            for c in np.unique(classes):
                sel = classes == c
                b.patch_sums[c] += patches[sel].sum(axis=0)
                b.patch_n[c] += sel.sum()
        else:
            classes = np.empty(0, dtype=np.int64)
        m = min(len(centres), p.max_defects)
        if b.newest_index[0] == frame_index:
            b.frame[...] = b.newest
            b.frame_bin[0] = self.frame_bin
            b.frame_defects[...] = np.nan
            b.frame_defects[:m, :2] = centres[:m]
            b.frame_defects[:m, 2] = classes[:m]
        self.tracker.update(frame_index, centres, classes)
        counts = np.bincount(classes, minlength=k).astype(float)
        bins = np.clip((centres // p.map_bin_px).astype(int), 0, np.array(self.map_shape) - 1)
        np.add.at(b.map_counts, (bins[:, 0], bins[:, 1]), 1)
        b.frames_analysed[0] += 1
        b.defects[...] = counts
        b.density[0] = len(centres) / (self.shape[0] * self.shape[1])
        b.counts[pos] = counts
        b.total[pos] = len(centres)
        b.positions[pos] = np.nan
        b.positions[pos, :m, :2] = centres[:m]
        b.positions[pos, :m, 2] = classes[:m]
        b.frames_since_fit[0] += 1
        if b.frames_since_fit[0] >= p.refit_every and b.reservoir_n[0] >= 2 * k:
            gmm = self._gmm()  # warm start from the current parameters: labels stay put
            _fit_gmm(gmm, b.reservoir[:b.reservoir_n[0], :int(b.pca_k[0])])
            self._store_gmm(gmm)
            b.frames_since_fit[0] = 0



@dataclass(frozen=True)
class ClassFit:
    """PCA and mixture fitted on a set of patches (:func:`fit_classes`).

    Attributes:
        pca_mean: float64 ``(p * p,)`` mean patch.
        pca_components: float64 ``(k, p * p)`` principal axes, k <= ``pca_components``.
        gmm: the fitted mixture, components numbered by increasing mean patch-centre intensity.
        feats: float64 ``(n, k)`` PCA features of the patches fitted on, in their order.
    """

    pca_mean: np.ndarray
    pca_components: np.ndarray
    gmm: GaussianMixture
    feats: np.ndarray


def fit_classes(x: np.ndarray, params: DefectsParams) -> ClassFit:
    """First fit of the defect classes: PCA (``pca_components``) of the patches, then a full-covariance
    Gaussian mixture of ``n_classes`` (scikit-learn, two initialisations, ``seed``), renumbered so
    that class 0 has the darkest mean patch centre (the central 2 x 2 px). Pure: safe on a pool.

    Args:
        x: float64 ``(n, p * p)`` z-scored patches, ``n >= max(n_classes, 2)``.
        params: the consumer's parameters.

    Returns:
        :class:`ClassFit`.
    """
    p = params
    pca = PCA(n_components=min(p.pca_components, len(x), x.shape[1]), random_state=p.seed).fit(x)
    feats = project(x, pca.mean_, pca.components_)
    gmm = GaussianMixture(p.n_classes, covariance_type="full", reg_covar=1e-3, n_init=2, random_state=p.seed,
                          warm_start=True)
    _fit_gmm(gmm, feats)
    c = p.patch_px // 2
    centre = x.reshape(len(x), p.patch_px, p.patch_px)[:, c - 1:c + 1, c - 1:c + 1].mean(axis=(1, 2))
    labels = gmm.predict(feats)
    order = np.argsort([centre[labels == j].mean() if (labels == j).any() else np.inf for j in range(p.n_classes)])
    for attr in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
        setattr(gmm, attr, getattr(gmm, attr)[order])
    return ClassFit(pca.mean_, pca.components_, gmm, feats)


def project(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """PCA features ``(x - mean) @ components.T``, float64 ``(n, k)``, of float ``(n, d)`` rows,
    for a float64 ``(d,)`` mean and ``(k, d)`` principal axes."""
    return (np.asarray(x, dtype=np.float64) - mean) @ components.T


def classify(feats: np.ndarray, weights: np.ndarray, means: np.ndarray, precisions_cholesky: np.ndarray) -> np.ndarray:
    """Most probable mixture component of each row: what ``GaussianMixture.predict`` returns for a
    full-covariance mixture (scikit-learn's ``_estimate_weighted_log_prob``: log weight plus the
    Gaussian log density through the Cholesky factor of the precision, argmax, first on ties),
    computed from the mixture's arrays without rebuilding the estimator or its input validation
    per frame (a few hundred microseconds each, on the daemon's thread).

    Args:
        feats: float64 ``(m, k)`` features.
        weights: ``(K,)`` mixture weights; means: ``(K, k)``; precisions_cholesky: ``(K, k, k)``.

    Returns:
        int64 ``(m,)`` component indices.
    """
    k = feats.shape[1]
    log_prob = np.empty((len(feats), len(weights)))
    for j, (mu, chol) in enumerate(zip(means, precisions_cholesky)):
        y = feats @ chol - mu @ chol
        log_prob[:, j] = np.einsum("ij,ij->i", y, y)
    log_det = np.log(np.diagonal(precisions_cholesky, axis1=1, axis2=2)).sum(axis=1)
    log_prob = -0.5 * (k * np.log(2 * np.pi) + log_prob) + log_det + np.log(weights)
    return log_prob.argmax(axis=1).astype(np.int64)


def _fit_gmm(gmm: GaussianMixture, feats: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(feats)
    if not gmm.converged_:
        log.warning("defect-class mixture did not converge on %d patches; keeping its last iterate", len(feats))


def _reflect(index: np.ndarray, n: int) -> np.ndarray:
    """Indices outside ``[0, n)`` mirrored about the edge pixels (numpy's ``reflect`` padding:
    -1 -> 1, n -> n - 2), for indices within ``n - 1`` of the frame."""
    index = np.abs(index)
    return np.where(index > n - 1, 2 * (n - 1) - index, index)


def _bin_mean(frame: np.ndarray, f: int) -> np.ndarray:
    """Block means of ``f x f`` px (edge blocks over the pixels they have), float64. Warning-free
    (no ``warnings.catch_warnings``, which is not thread-safe): it runs in concurrent stages."""
    rows, cols = frame.shape
    pr, pc = -rows % f, -cols % f
    padded = np.pad(np.asarray(frame, dtype=np.float64), ((0, pr), (0, pc)))
    ones = np.pad(np.ones((rows, cols)), ((0, pr), (0, pc)))
    shape = (padded.shape[0] // f, f, padded.shape[1] // f, f)
    return padded.reshape(shape).sum(axis=(1, 3)) / ones.reshape(shape).sum(axis=(1, 3))
