"""Run the shipped defect-segmentation network (ONNX) on frames of any size: verified loading,
normalisation, tiling/stitching, and defect positions from the probability map.

The network (trained by :mod:`beamlens.models.train_defects`) maps a z-scored frame tile
``(n, 1, T, T)`` float32 to a per-pixel defect probability of the same shape (Maksov et al., npj
Comput. Mater. 5, 12 (2019): fully convolutional segmentation, then threshold, connected blobs and
their centres of mass). Its model card (``defect_net.json``) records the tile size, the normalisation
and the file's sha256; :func:`load_session` refuses a file whose hash differs.

Only numpy, scipy and onnxruntime are used here, so the daemon and the tests need no PyTorch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

log = logging.getLogger(__name__)

MODEL_DIR = Path(str(files("beamlens.models")))
MODEL_PATH = MODEL_DIR / "defect_net.onnx"
CARD_PATH = MODEL_DIR / "defect_net.json"
MODELS = {"fp32": (MODEL_PATH, CARD_PATH),
          "int8": (MODEL_DIR / "defect_net_int8.onnx", MODEL_DIR / "defect_net_int8.json")}
"""The shipped networks by precision: the trained fp32 network and its int8 static quantisation
(:mod:`beamlens.models.quantize_defects`), each with its model card."""
REAL_FRAMES_DIR = MODEL_DIR / "data" / "stem_mos2_scilink"


_EIGHT = np.ones((3, 3), dtype=bool)


class ModelIntegrityError(RuntimeError):
    """The model file's sha256 differs from the one in its model card (tampered or corrupted)."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_card(card_path: Path = CARD_PATH) -> dict[str, Any]:
    """Read a model card (JSON)."""
    return json.loads(Path(card_path).read_text())


def available_cores() -> int:
    """CPU cores this process may run on: ``os.sched_getaffinity`` (honours taskset, cgroup cpusets
    and container CPU pinning, unlike ``os.cpu_count``), capped by the cgroup CPU quota rounded up
    (``docker run --cpus``, Kubernetes CPU limits; :func:`cgroup_cpu_limit`), which the affinity
    mask does not show: threads beyond the quota are only throttled."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        cores = max(1, os.cpu_count() or 1)
    quota = cgroup_cpu_limit()
    return cores if quota is None else max(1, min(cores, math.ceil(quota - 1e-9)))


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time this process's cgroups allow (quota / period), the smallest along its
    cgroup path up to the root, or None when unlimited or unreadable.

    Follows the kernel's cgroup v2 ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``) and
    cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: unlimited), with the paths named
    in ``/proc/self/cgroup`` (Linux ``Documentation/admin-guide/cgroup-v2.rst``, ``cgroup-v1/cpu``).
    """
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base, read = root, _cpu_max
        elif "cpu" in controllers.split(","):
            base = next((root / d for d in (controllers, "cpu", "cpu,cpuacct") if (root / d).is_dir()), None)
            if base is None:
                continue
            read = _cfs_quota
        else:
            continue
        here = base / path.lstrip("/")
        for d in (here, *here.parents):
            limit = read(d)
            if limit is not None:
                limits.append(limit)
            if d == base:
                break
    return min(limits) if limits else None


def _cpu_max(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _cfs_quota(d: Path) -> float | None:
    try:
        quota, period = int((d / "cpu.cfs_quota_us").read_text()), int((d / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def load_session(model_path: Path = MODEL_PATH, card: dict[str, Any] | None = None,
                 providers: list[str] | None = None, threads: int = 0, spinning: bool = True):
    """Open an onnxruntime session on a model after checking its sha256 against its card.

    Args:
        model_path: the ``.onnx`` file.
        card: the model card; default: ``defect_net.json`` next to the shipped model.
        providers: onnxruntime execution providers in order of preference; those not available in
            this onnxruntime build are dropped (so ``["CUDAExecutionProvider", "CPUExecutionProvider"]``
            runs on CUDA where present, on CPU otherwise). Default: CUDA if available, else CPU.
        threads: ``intra_op_num_threads`` (0: the cores this process may use, :func:`available_cores`).
        spinning: let idle intra-op threads spin-wait for the next call (onnxruntime's default,
            ``session.intra_op.allow_spinning``); inside the daemon, where other threads need the
            cores between network calls, False leaves them the CPU.

    Returns:
        ``onnxruntime.InferenceSession``.

    Raises:
        ModelIntegrityError: if the file's sha256 differs from ``card["sha256"]``.
        ValueError: if none of ``providers`` is available.
    """
    import onnxruntime as ort

    card = card if card is not None else load_card()
    digest = sha256_file(Path(model_path))
    if digest != card["sha256"]:
        raise ModelIntegrityError(
            f"refusing to load {model_path}: its sha256 is {digest}, the model card says {card['sha256']} "
            "(the file was modified or corrupted; reinstall beamlens or retrain and rewrite the card)")
    available = ort.get_available_providers()
    wanted = providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise ValueError(f"none of the execution providers {wanted} is available (available: {available})")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or available_cores()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_path), sess_options=opts,
                                   providers=provider_entries(chosen, opts.intra_op_num_threads))
    log.info("defect network %s loaded (sha256 %s..., providers %s)", Path(model_path).name, digest[:12], session.get_providers())
    return session


def provider_entries(providers: list[str], threads: int) -> list[str | tuple[str, dict[str, str]]]:
    """onnxruntime's ``providers`` argument for ``providers`` (names, in order) with ``threads``
    intra-op threads: the OpenVINO execution provider keeps a thread pool of its own, sized to
    every core of the host unless told (``num_of_threads``, onnxruntime's OpenVINO EP provider
    options), so it is given the same count as the CPU provider's ``intra_op_num_threads``."""
    return [(p, {"num_of_threads": str(threads)}) if p == "OpenVINOExecutionProvider" else p for p in providers]


def normalise(frame: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The network's input normalisation: per-frame z-score, float32 ``(rows, cols)``.

    Args:
        frame: ``(rows, cols)`` any real dtype.
        out: optional float32 ``(rows, cols)`` buffer to write into (no allocation per frame).

    Raises:
        ValueError: if the frame is constant or not finite (``out`` may then hold garbage).
    """
    if out is None:
        out = np.empty(frame.shape, dtype=np.float32)
    np.copyto(out, frame, casting="unsafe")
    mean = out.mean(dtype=np.float64)
    np.subtract(out, np.float32(mean), out=out)
    sd = float(np.sqrt(np.vdot(out.ravel(), out.ravel()) / out.size))
    if not np.isfinite(sd) or sd == 0:
        raise ValueError("frame is constant or has non-finite values")
    np.multiply(out, np.float32(1.0 / sd), out=out)
    return out


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Start indices of tiles of ``tile`` px covering ``length`` px with at least ``overlap`` px of
    overlap; the last tile ends exactly at ``length``.

    Raises:
        ValueError: if ``length < tile`` or ``overlap >= tile``.
    """
    if length < tile:
        raise ValueError(f"frame side {length} px is smaller than the model tile {tile} px")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, {tile})")
    step = tile - overlap
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


@dataclass(frozen=True)
class Tiling:
    """Tiles of a frame shape and the part of each tile kept when stitching.

    Each output pixel is taken from the tile whose centre is nearest along each axis (so a tile's
    outer ``overlap / 2`` px, where the network sees no context, are dropped except at frame edges).
    """

    shape: tuple[int, int]
    tile: int
    overlap: int

    def __post_init__(self) -> None:
        rows = tile_origins(self.shape[0], self.tile, self.overlap)
        cols = tile_origins(self.shape[1], self.tile, self.overlap)
        object.__setattr__(self, "origins", [(r, c) for r in rows for c in cols])
        object.__setattr__(self, "_rows", _keep_ranges(rows, self.tile, self.shape[0]))
        object.__setattr__(self, "_cols", _keep_ranges(cols, self.tile, self.shape[1]))

    def cut(self, frame: np.ndarray, out: np.ndarray) -> None:
        """Write the tiles of ``frame`` ``(rows, cols)`` into ``out`` ``(n_tiles, 1, T, T)``."""
        t = self.tile
        for k, (r, c) in enumerate(self.origins):
            out[k, 0] = frame[r:r + t, c:c + t]

    def stitch(self, tiles: np.ndarray, out: np.ndarray) -> None:
        """Assemble ``tiles`` ``(n_tiles, 1, T, T)`` into ``out`` ``(rows, cols)``."""
        k = 0
        for r0, (ra, rb) in self._rows:
            for c0, (ca, cb) in self._cols:
                out[ra:rb, ca:cb] = tiles[k, 0, ra - r0:rb - r0, ca - c0:cb - c0]
                k += 1


def _keep_ranges(starts: list[int], tile: int, length: int) -> list[tuple[int, tuple[int, int]]]:
    centres = [s + tile / 2 for s in starts]
    bounds = [0] + [int(round((a + b) / 2)) for a, b in zip(centres, centres[1:])] + [length]
    return [(s, (bounds[i], bounds[i + 1])) for i, s in enumerate(starts)]


class DefectNet:
    """The segmentation network applied to whole frames.

    Args:
        session: an onnxruntime session of a network with input ``(n, 1, T, T)`` float32.
        card: its model card (``input.tile``, ``postprocessing``).
        overlap: tile overlap for frames larger than ``T``, px (default: the card's).
        batch_tiles: tiles per ``session.run`` call.

    Frames smaller than the tile are refused (ValueError from :func:`tile_origins`).
    """

    def __init__(self, session, card: dict[str, Any], overlap: int | None = None, batch_tiles: int = 16):
        self.session = session
        self.card = card
        self.tile = int(card["input"]["tile"])
        self.overlap = int(card["input"]["overlap"] if overlap is None else overlap)
        self.batch_tiles = batch_tiles
        self.input_name = session.get_inputs()[0].name
        self._tilings: dict[tuple[int, int], Tiling] = {}

    def tiling(self, shape: tuple[int, int]) -> Tiling:
        if shape not in self._tilings:
            self._tilings[shape] = Tiling(tuple(shape), self.tile, self.overlap)
        return self._tilings[shape]

    def probability(self, frames: np.ndarray) -> np.ndarray:
        """Per-pixel defect probability of each frame.

        Args:
            frames: ``(n, rows, cols)`` any real dtype, rows and cols >= the tile size.

        Returns:
            float32 ``(n, rows, cols)`` in [0, 1].
        """
        return self.probability_normalised([normalise(f) for f in np.asarray(frames)])

    def probability_normalised(self, frames: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """As :meth:`probability`, for frames already passed through :func:`normalise`
        (float32 ``(rows, cols)`` each, or one float32 ``(n, rows, cols)`` array). Frames of
        exactly one tile go to the network without cutting or stitching (no copy of the batch)."""
        n = len(frames)
        shape = tuple(frames[0].shape)
        tiling = self.tiling(shape)
        per = len(tiling.origins)
        if per == 1 and isinstance(frames, np.ndarray) and frames.dtype == np.float32 and frames.flags.c_contiguous \
                and len(frames) <= max(self.batch_tiles, 1):
            return self.session.run(None, {self.input_name: frames[:, None]})[0][:, 0]
        tiles = np.empty((n * per, 1, self.tile, self.tile), dtype=np.float32)
        for i, f in enumerate(frames):
            tiling.cut(f, tiles[i * per:(i + 1) * per])
        out = np.empty((n * per, 1, self.tile, self.tile), dtype=np.float32)
        step = max(self.batch_tiles, 1)
        for a in range(0, len(tiles), step):
            out[a:a + step] = self.session.run(None, {self.input_name: tiles[a:a + step]})[0]
        prob = np.empty((n, *shape), dtype=np.float32)
        for i in range(n):
            tiling.stitch(out[i * per:(i + 1) * per], prob[i])
        return prob


def find_defects(prob: np.ndarray, threshold: float = 0.5, min_area: int = 4, max_area: int = 700) -> np.ndarray:
    """Defect centres from a probability map: threshold, 8-connected components (scipy.ndimage),
    probability-weighted centre of mass of each blob with ``min_area <= area <= max_area`` px
    (Maksov et al. 2019 keep 5 < area < 700).

    Args:
        prob: float ``(rows, cols)`` probability map.

    Returns:
        float64 ``(n, 2)`` sub-pixel centres (row, col), px.
    """
    mask = prob > threshold
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return np.empty((0, 2))
    # one pass of bincounts over the blob pixels (ndimage.center_of_mass rescans the image per label)
    rr, cc = np.nonzero(mask)
    lab = labels[rr, cc]
    w = prob[rr, cc].astype(np.float64)
    area = np.bincount(lab, minlength=n + 1)[1:]
    mass = np.bincount(lab, w, minlength=n + 1)[1:]
    centres = np.stack([np.bincount(lab, w * rr, minlength=n + 1)[1:],
                        np.bincount(lab, w * cc, minlength=n + 1)[1:]], axis=1) / mass[:, None]
    keep = (area >= min_area) & (area <= max_area)
    return centres[keep]


def match_points(found: np.ndarray, true: np.ndarray, radius: float) -> tuple[int, int, int]:
    """One-to-one matching of detections to true positions (Hungarian, scipy linear_sum_assignment)
    within ``radius`` px.

    Args:
        found, true: ``(n, 2)`` and ``(m, 2)`` positions, px.

    Returns:
        ``(true_positives, false_positives, false_negatives)``.
    """
    if len(found) == 0 or len(true) == 0:
        return 0, len(found), len(true)
    d = np.hypot(*(found[:, None, :] - true[None, :, :]).transpose(2, 0, 1))
    cost = np.where(d <= radius, d, 1e6)
    r, c = linear_sum_assignment(cost)
    tp = int((d[r, c] <= radius).sum())
    return tp, len(found) - tp, len(true) - tp


def evaluate(net: DefectNet, n_frames: int, seed: int) -> dict[str, float]:
    """Precision/recall of a network on held-out default-parameter simulated movies
    (:class:`beamlens.models.stem_sim.Movie`, 256 x 256 px), post-processed as its card says
    (threshold, minimum blob area), matching within half the column spacing.

    Returns:
        ``{"precision", "recall", "frames", "defects", "match_radius_px"}``.
    """
    from .stem_sim import Movie, MovieParams

    post = net.card["postprocessing"]
    tp = fp = fn = 0
    params = MovieParams()
    radius = 0.5 * params.lattice.column_spacing_px
    for img, truth in Movie(params, seed=seed).frames(n_frames):
        found = find_defects(net.probability(img[None])[0], float(post["threshold"]), int(post["min_area_px"]))
        a, b, c = match_points(found, truth.positions, radius)
        tp, fp, fn = tp + a, fp + b, fn + c
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "frames": n_frames,
            "defects": tp + fn, "match_radius_px": radius}
