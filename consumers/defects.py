"""``defects``: live point-defect detection, classification and tracking on atomically resolved
microscope frames (Maksov et al., npj Comput. Mater. 5, 12 (2019)).

Per batch of frames:

1. the shipped segmentation network (``beamlens/models/defect_net.onnx``, sha256 checked against its
   model card at load) gives a per-pixel defect probability; frames larger than the network's tile
   are cut into overlapping tiles and stitched (:class:`beamlens.models.defect_net.DefectNet`);
2. threshold + 8-connected components (scipy.ndimage) -> sub-pixel centres (probability-weighted
   centre of mass);
3. a square patch of the z-scored frame around each centre is projected on principal components
   (PCA, fitted once on the first ``fit_after`` patches) and classified by a Gaussian mixture
   (scikit-learn), fitted on the first frames and refitted every ``refit_every`` frames from its
   previous parameters (``warm_start``) on a reservoir of recent patches, so class labels stay put.
   Classes are numbered by increasing mean patch-centre intensity (class 0: darkest centre);
4. defects are tracked between consecutive frames (:class:`beamlens.consumers.tracking.DefectTracker`)
   -> per-class diffusion coefficients (lag-1 MSD estimator) and the class transition matrix.

Steps 2-4 of a batch run in a worker thread (``background``) while step 1 runs on the next batch,
as ``Consumer`` allows; at most one batch is in post-processing, and its errors are raised in the
daemon's thread at the next ``frames`` or ``stop`` call.

Frames that arrive before the mixture is fitted are held (at most ``fit_after`` defects' worth, a few
frames) and analysed as soon as it is.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sklearn
from pydantic import Field
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from beamlens.models.defect_net import MODELS, DefectNet, find_defects, load_card, load_session, normalise

from .base import BadData, BufferSpec, Consumer, ConsumerParams, NotApplicable, Results, RunInfo, SeriesInfo
from .tracking import DefectTracker

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
    """onnxruntime intra-op threads (0: the cores this process may run on, ``os.sched_getaffinity``)."""
    spinning: bool = False
    """Let onnxruntime's idle threads spin-wait between calls (faster alone, slower beside the
    daemon's receive, decode and post-processing threads, which then lose their cores)."""
    threshold: float | None = Field(None, gt=0, lt=1)
    """Probability threshold; default: the model card's."""
    n_classes: int = Field(3, ge=1, le=12)
    patch_px: int = Field(24, ge=8, le=128)
    """Side of the square patch classified around each defect, px."""
    pca_components: int = Field(4, ge=1, le=32)
    fit_after: int = Field(80, ge=4)
    """Defects collected before PCA and the mixture are first fitted."""
    refit_every: int = Field(100, ge=1)
    """Frames between mixture updates."""
    reservoir: int = Field(1000, ge=10)
    """Most recent patches kept for the updates."""
    max_displacement_px: float = Field(26.0, gt=0)
    """Largest displacement linked between consecutive frames, px (above the lattice hop, below the
    typical distance between defects)."""
    frame_time_s: float | None = Field(None, gt=0)
    """Time between frames, s; default: the series metadata (``frame_time_s``), else 1 s."""
    map_bin_px: int = Field(8, ge=1)
    """Bin size of the defect-density map, px."""
    max_defects: int = Field(256, ge=1)
    """Defects kept per frame in the ``positions`` buffer (further ones are counted but not listed)."""
    seed: int = 0
    """Random state of PCA and the mixture (reproducible classes)."""
    background: bool = True
    """Post-process each batch (blobs, classes, tracks) in a worker thread while the network runs
    on the next batch; results of a batch then land shortly after ``frames`` returns (at the latest
    when the next batch or ``stop`` arrives). Same results either way."""


class DefectsConsumer(Consumer):
    """Point defects of each frame, their classes, tracks and statistics.

    Input: frames ``(n, rows, cols)``, any real dtype (HAADF intensity), rows and cols at least the
    network tile (256 px for the shipped model).

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

    Raises (from :meth:`series`): NotApplicable for frames that are not 2-D or smaller than the
    tile; ``ModelIntegrityError`` (from the model loader) for a model whose sha256 differs from its
    card.
    """

    name = "defects"
    Params = DefectsParams
    params: DefectsParams
    inputs = "frames"

    # -- lifecycle ---------------------------------------------------------------------------
    def series(self, info: SeriesInfo) -> None:
        p = self.params
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
        self.model_path, self.card = model, card
        self.model_sha256 = str(card["sha256"])  # recorded in run files and derived documents
        post = card["postprocessing"]
        self.threshold = p.threshold or float(post["threshold"])
        self.min_area, self.max_area = int(post["min_area_px"]), int(post["max_area_px"])
        self.shape = tuple(int(s) for s in info.sig_shape)
        self.frame_time = p.frame_time_s or next(
            (float(info.meta[k]) for k in FRAME_TIME_KEYS if k in info.meta), None)
        if self.frame_time is None:
            self.log.warning("no frame time in the series metadata nor in params: diffusion in px^2 per frame")
            self.frame_time = 1.0
        self.tracker = DefectTracker(p.n_classes, p.max_displacement_px, self.frame_time)
        self.map_shape = tuple(-(-s // p.map_bin_px) for s in self.shape)
        self.map_counts = np.zeros(self.map_shape)
        self.frame_bin = -(-max(self.shape) // FRAME_PREVIEW_PX)
        self.frame_preview_shape = tuple(-(-s // self.frame_bin) for s in self.shape)
        self.newest: tuple[int, np.ndarray] | None = None
        self.n_frames = 0
        self.frame_index = -1
        self.pca: PCA | None = None
        self.gmm: GaussianMixture | None = None
        self.pending: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # (frame index, position, centres, patches)
        self.reservoir = np.empty((0, p.pca_components))
        self.patch_sums = np.zeros((p.n_classes, p.patch_px, p.patch_px))
        self.patch_n = np.zeros(p.n_classes)
        self.frames_since_fit = 0
        self._future: Future | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="defects-post") if p.background else None
        self._buffers: list[np.ndarray] = []  # two normalised batches: one in the network, one in post-processing

    def result_buffers(self) -> list[BufferSpec]:
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

    def frames(self, frames: np.ndarray, positions: np.ndarray, info: SeriesInfo) -> None:
        if frames.ndim != 3 or tuple(frames.shape[1:]) != self.shape:
            raise BadData("wrong_shape", f"frames of shape {frames.shape[1:]} in a series of {self.shape}")
        z = self._normalised(frames)
        usable = np.ones(len(frames), dtype=bool)
        for i, f in enumerate(frames):
            try:
                normalise(f, out=z[i])
            except ValueError:  # constant or not finite
                usable[i] = False
        if not usable.all():
            self.run.skipped("constant_frame", int((~usable).sum()))
            z, positions = z[usable], positions[usable]
            if not len(z):
                return
        prob = self.net.probability_normalised(z)
        self._wait()  # at most one batch in post-processing; its errors surface here
        if self._pool is None:
            self._postprocess(z, prob, positions)
        else:
            self._future = self._pool.submit(self._postprocess, z, prob, positions)

    def _normalised(self, frames: np.ndarray) -> np.ndarray:
        """A float32 ``(n, rows, cols)`` buffer for this batch, alternating between two that are
        reused from batch to batch (the other one may still be read by post-processing, which
        :meth:`frames` waits for before it hands over the next batch)."""
        n = len(frames)
        if not getattr(self, "_buffers", None) or len(self._buffers[0]) < n:
            self._buffers = [np.empty((n, *self.shape), dtype=np.float32) for _ in range(2)]
        self._buffers.reverse()
        return self._buffers[0][:n]

    def _postprocess(self, z: np.ndarray, prob: np.ndarray, positions: np.ndarray) -> None:
        for frame, pmap, pos in zip(z, prob, positions):
            self.frame_index = int(pos) if pos >= 0 else self.frame_index + 1
            centres = find_defects(pmap, self.threshold, self.min_area, self.max_area)
            patches = self._patches(frame, centres)
            self.pending.append((self.frame_index, int(pos), centres, patches))
        self.newest = (self.frame_index, _bin_mean(z[-1], self.frame_bin))
        if self.gmm is None:
            # fit on the frames up to the one where fit_after defects are reached, whatever the batching
            reached = np.cumsum([len(c) for _, _, c, _ in self.pending]) >= max(self.params.fit_after, self.params.n_classes)
            if reached.any():
                self._first_fit(self.pending[:int(np.argmax(reached)) + 1])
        if self.gmm is not None:
            self._drain()

    # -- checkpoints -------------------------------------------------------------------------
    transient = ("net", "_pool", "_future", "_buffers")

    def __getstate__(self) -> dict[str, Any]:
        self._wait()  # the frame being post-processed in the background is part of the state
        return super().__getstate__()

    def restored(self, run: RunInfo, results: Results) -> None:
        """Reload the (sha256-verified) network and restart the post-processing worker."""
        super().restored(run, results)
        if hasattr(self, "card"):
            p = self.params
            self.net = DefectNet(load_session(self.model_path, self.card, p.providers, p.threads, p.spinning), self.card)
            self._future = None
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="defects-post") if p.background else None

    def stop(self, doc: Mapping[str, Any]) -> None:
        if getattr(self, "_pool", None) is not None:
            try:
                self._wait()
            finally:
                self._pool.shutdown()
        if getattr(self, "pending", None) and self.gmm is None:
            n = sum(len(c) for _, _, c, _ in self.pending)
            if n >= self.params.n_classes and n >= self.params.pca_components:
                self._first_fit(self.pending)
                self._drain()
            else:
                self.log.info("only %d defects in the series: too few to classify", n)

    # -- internals ---------------------------------------------------------------------------
    def _wait(self) -> None:
        if getattr(self, "_future", None) is not None:
            future, self._future = self._future, None
            future.result()

    def _patches(self, frame: np.ndarray, centres: np.ndarray) -> np.ndarray:
        p = self.params.patch_px
        h = p // 2
        padded = np.pad(frame, h, mode="reflect")
        out = np.empty((len(centres), p, p), dtype=np.float32)
        for i, (r, c) in enumerate(np.round(centres).astype(int)):
            out[i] = padded[r:r + p, c:c + p]
        return out

    def _first_fit(self, held: list[tuple[int, int, np.ndarray, np.ndarray]]) -> None:
        p = self.params
        x = np.concatenate([q.reshape(len(q), -1) for _, _, _, q in held])
        self.pca = PCA(n_components=min(p.pca_components, len(x), x.shape[1]), random_state=p.seed).fit(x)
        feats = self.pca.transform(x)
        self.gmm = GaussianMixture(p.n_classes, covariance_type="full", reg_covar=1e-3, n_init=2,
                                   random_state=p.seed, warm_start=True)
        self._fit_gmm(feats)
        centre = x.reshape(len(x), p.patch_px, p.patch_px)[:, p.patch_px // 2 - 1:p.patch_px // 2 + 1,
                                                           p.patch_px // 2 - 1:p.patch_px // 2 + 1].mean(axis=(1, 2))
        labels = self.gmm.predict(feats)
        order = np.argsort([centre[labels == k].mean() if (labels == k).any() else np.inf for k in range(p.n_classes)])
        _permute_gmm(self.gmm, order)
        self.gmm.max_iter = 10  # updates start from the current fit and need few EM steps
        self.reservoir = feats[-p.reservoir:]
        self.log.info("defect classes fitted on %d defects (%d frames)", len(x), len(held))

    def _drain(self) -> None:
        for frame_index, pos, centres, patches in self.pending:
            self._analyse(frame_index, pos, centres, patches)
        self.pending = []
        self.results.diffusion[...] = self.tracker.diffusion()
        self.results.diffusion_steps[...] = self.tracker.steps
        self.results.transition_matrix[...] = self.tracker.transition_matrix()
        with np.errstate(invalid="ignore"):
            self.results.class_patches[...] = self.patch_sums / self.patch_n[:, None, None]
        self.results.density_map[...] = self.map_counts / (max(self.n_frames, 1) * self.params.map_bin_px**2)

    def _analyse(self, frame_index: int, pos: int, centres: np.ndarray, patches: np.ndarray) -> None:
        p = self.params
        k = p.n_classes
        if len(centres):
            with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
                feats = self.pca.transform(patches.reshape(len(patches), -1))
                classes = self.gmm.predict(feats)
            self.reservoir = np.concatenate([self.reservoir, feats])[-p.reservoir:]
            for c in np.unique(classes):
                sel = classes == c
                self.patch_sums[c] += patches[sel].sum(axis=0)
                self.patch_n[c] += sel.sum()
        else:
            classes = np.empty(0, dtype=np.int64)
        if self.newest is not None and self.newest[0] == frame_index:
            self.results.frame[...] = self.newest[1]
            self.results.frame_bin[0] = self.frame_bin
            shown = self.results.frame_defects
            shown[...] = np.nan
            m = min(len(centres), p.max_defects)
            shown[:m, :2] = centres[:m]
            shown[:m, 2] = classes[:m]
        self.tracker.update(frame_index, centres, classes)
        counts = np.bincount(classes, minlength=k).astype(float)
        bins = np.clip((centres // p.map_bin_px).astype(int), 0, np.array(self.map_shape) - 1)
        np.add.at(self.map_counts, (bins[:, 0], bins[:, 1]), 1)
        self.n_frames += 1
        self.results.defects[...] = counts
        self.results.density[0] = len(centres) / (self.shape[0] * self.shape[1])
        if pos >= 0:
            self.results.counts[pos] = counts
            self.results.total[pos] = len(centres)
            row = self.results.positions[pos]
            row[...] = np.nan
            m = min(len(centres), p.max_defects)
            row[:m, :2] = centres[:m]
            row[:m, 2] = classes[:m]
        self.frames_since_fit += 1
        if self.frames_since_fit >= p.refit_every and len(self.reservoir) >= 2 * k:
            self._fit_gmm(self.reservoir)  # warm start from the current parameters: labels stay put
            self.frames_since_fit = 0

    def _fit_gmm(self, feats: np.ndarray) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.gmm.fit(feats)
        if not self.gmm.converged_:
            self.log.warning("defect-class mixture did not converge on %d patches; keeping its last iterate", len(feats))


def _bin_mean(frame: np.ndarray, f: int) -> np.ndarray:
    """Block means of ``f x f`` px (edge blocks over the pixels they have)."""
    rows, cols = frame.shape
    pr, pc = -rows % f, -cols % f
    padded = np.pad(np.asarray(frame, dtype=np.float64), ((0, pr), (0, pc)), constant_values=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(padded.reshape(padded.shape[0] // f, f, padded.shape[1] // f, f), axis=(1, 3))


def _permute_gmm(gmm: GaussianMixture, order: np.ndarray) -> None:
    """Renumber a fitted mixture's components: new component i is old component ``order[i]``."""
    for attr in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
        setattr(gmm, attr, getattr(gmm, attr)[order])
