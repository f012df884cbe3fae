"""Checkpoints of open runs, so that a restarted daemon resumes their analysis instead of starting
blind. A checkpoint is data, never objects: no pickle anywhere on this path.

Each open run is one file ``<state_dir>/<run uid>.ckpt`` (uids that are not plain names are hashed,
see :meth:`Checkpointer.path`). The file is a zip archive in numpy's ``.npz`` layout: one ``.npy``
member per buffer (read back with ``allow_pickle=False``) and ``checkpoint.json``, a versioned JSON
document with the run's state (RunStart, descriptors, placement, event bookkeeping) and, per
consumer slot, the signals it accepted (:func:`beamlens.daemon.signals.signal_json`, axis values
included), each buffer's spec and layout (:meth:`BufferSpec.layout`), its published axes, failure
count and quarantine, and a SHA-256 of every array's bytes. It is written to a temporary name,
fsynced and renamed (POSIX ``rename`` is atomic), so a crash mid-write leaves the previous
checkpoint intact, and JSON and arrays can never come from two different saves.

Restoring a consumer (:func:`restore_consumer`) follows the contract: a fresh instance, ``start(doc)``,
``signal(info)`` again for each saved signal, the declared specs checked against the saved layouts,
the arrays bound, ``results()``. A checkpoint that is not of this format (an older beamlens' pickle
``.ckpt``), of another format version, or whose JSON, arrays or layouts do not match
(:class:`CheckpointError`) is refused as a whole with one log line naming the reason, and moved
aside as ``*.ckpt.bad``; the run is then analysed from where it can be (its later documents join it
mid-run). A run's file is removed when the run ends.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from beamlens.consumers.base import BufferSpec, Consumer, NotApplicable, SignalInfo

from . import __version__
from .limits import inside, safe_stem
from .signals import signal_from_json, signal_json

log = logging.getLogger(__name__)

FORMAT = 2
"""Checkpoint format version (1: pickled consumers, refused since)."""
SUFFIX = ".ckpt"
STATE_MEMBER = "checkpoint.json"
MAX_STATE_BYTES = 64 * 2**20
"""A ``checkpoint.json`` larger than this is refused before it is parsed."""
_SPEC_FIELDS = ("units", "description", "axis", "metric", "merge")


class CheckpointError(Exception):
    """A checkpoint that cannot be used (old format, tampered, layouts that do not match)."""


def jsonable(value: Any) -> Any:
    """``value`` with numpy arrays and scalars as lists and numbers, tuples as lists, and anything
    else JSON cannot hold as its ``repr`` (documents are metadata; nothing is lost that matters)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).view(np.uint8).reshape(-1)).hexdigest()


def consumer_record(consumer: Consumer, signals: list[SignalInfo], key: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """What a checkpoint keeps of one consumer: its accepted signals, buffer specs with layouts and
    digests, published axes (JSON), and its arrays (named ``<key>.<buffer>``)."""
    buffers, arrays = {}, {}
    for name, spec in consumer.buffers.specs.items():
        arr = consumer.buffers[name]
        member = f"{key}.{name}"
        arrays[member] = arr
        buffers[name] = {**spec.layout(), **{f: getattr(spec, f) for f in _SPEC_FIELDS},
                         "member": member, "shape": list(arr.shape), "sha256": _digest(arr)}
    axes = {a: [np.asarray(v, dtype=np.float64).tolist(), u] for a, (v, u) in consumer.run.axes.items()}
    return {"signals": [jsonable(signal_json(s)) for s in signals], "buffers": buffers, "axes": axes}, arrays


def restore_consumer(consumer: Consumer, start_doc: Mapping[str, Any], record: Mapping[str, Any],
                     arrays: Mapping[str, np.ndarray]) -> list[SignalInfo]:
    """Rebuild a fresh ``consumer`` from its checkpoint record: ``start``, ``signal`` again for
    every saved signal, layouts checked, arrays bound, ``results()``.

    Returns:
        the accepted signals (as saved).

    Raises:
        CheckpointError: a saved signal is refused now, the buffers declared now differ from the
            saved layouts, or an array is missing, of another shape/dtype, or altered.
    """
    try:
        signals = [signal_from_json(s) for s in record["signals"]]
        saved = dict(record["buffers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"malformed consumer record ({type(exc).__name__}: {exc})") from None
    try:
        consumer.start(start_doc)
    except NotApplicable as exc:  # it sat this run out from its start: consistent only without signals
        if signals or saved:
            raise CheckpointError(f"refuses the run at its start now ({exc})") from None
        return []
    declared: dict[str, BufferSpec] = {}
    for info in signals:
        try:
            specs = consumer.signal(info)
        except NotApplicable as exc:
            raise CheckpointError(f"signal {info.name!r} is refused now ({exc})") from None
        declared.update({s.name: s for s in specs})
    if set(declared) != set(saved):
        raise CheckpointError(f"buffers declared now {sorted(declared)} differ from those saved {sorted(saved)}")
    for name, spec in declared.items():
        entry = saved[name]
        layout = {k: entry.get(k) for k in spec.layout()}
        if layout != spec.layout():
            raise CheckpointError(f"buffer {name!r}: layout {layout} saved, {spec.layout()} declared now")
        arr = arrays.get(entry.get("member", ""))
        if arr is None:
            raise CheckpointError(f"buffer {name!r}: no array in the checkpoint")
        if arr.dtype != np.dtype(spec.dtype) or list(arr.shape) != entry.get("shape") \
                or (spec.kind != "nav" and arr.shape != spec.shape(0)) \
                or (spec.kind == "nav" and arr.shape[1:] != spec.extra_shape):
            raise CheckpointError(f"buffer {name!r}: array {arr.shape}/{arr.dtype} does not fit its layout")
        if _digest(arr) != entry.get("sha256"):
            raise CheckpointError(f"buffer {name!r}: contents altered since it was saved (SHA-256 mismatch)")
    for name, spec in declared.items():
        consumer.buffers.bind(name, arrays[saved[name]["member"]], spec)
    for axis, (values, units) in dict(record.get("axes") or {}).items():
        consumer.run.axes.setdefault(axis, (np.asarray(values, dtype=np.float64), str(units)))
    if signals:  # a consumer that took no signal has no buffers to derive from
        consumer.results()
    return signals


def write_checkpoint(path: Path, state: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``state`` (JSON) and ``arrays`` (``.npy`` members) to ``path`` atomically.

    Raises:
        OSError: the file cannot be written.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
                for name, arr in arrays.items():
                    with z.open(f"{name}.npy", "w", force_zip64=True) as m:
                        np.lib.format.write_array(m, np.ascontiguousarray(arr), allow_pickle=False)
                z.writestr(STATE_MEMBER, json.dumps(jsonable(state), allow_nan=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint(path: Path, with_arrays: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a checkpoint written by :func:`write_checkpoint` (without ``with_arrays``: its JSON
    state only, the arrays left unread and ``{}`` returned for them).

    Raises:
        CheckpointError: not a checkpoint of this format (an old pickle ``.ckpt``, another
            version), or unreadable (truncated, CRC errors, malformed JSON, an object array).
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:1] == b"\x80":
        raise CheckpointError("an old-format checkpoint (pickled consumers, beamlens before checkpoint format 2); "
                              "checkpoints are no longer unpickled")
    if magic != b"PK\x03\x04":
        raise CheckpointError("not a checkpoint file (no zip header)")
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(STATE_MEMBER)
            if info.file_size > MAX_STATE_BYTES:
                raise CheckpointError(f"{STATE_MEMBER} of {info.file_size} bytes")
            state = json.loads(z.read(STATE_MEMBER))
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                found = state.get("format") if isinstance(state, dict) else type(state).__name__
                raise CheckpointError(f"checkpoint format {found!r}, this beamlens reads format {FORMAT}")
            arrays = {}
            for member in z.namelist() if with_arrays else ():
                if member.endswith(".npy"):
                    with z.open(member) as m:
                        arrays[member[:-4]] = np.lib.format.read_array(m, allow_pickle=False)
    except CheckpointError:
        raise
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    return state, arrays


class Checkpointer:
    """Writes and reads run checkpoints in one directory.

    Args:
        directory: the state directory (created if missing, mode 0700).
        interval_s: how often :meth:`due` says a periodic checkpoint is wanted, s.
    """

    def __init__(self, directory: str | Path, interval_s: float):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.interval_s = interval_s
        self._last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval_s

    def path(self, uid: str) -> Path:
        """``<directory>/<safe stem of uid>.ckpt``: a uid that is not a plain name (``../x``, NUL,
        300 characters) is hashed (:func:`~beamlens.daemon.limits.safe_stem`); the result is
        checked to stay inside the directory (ValueError otherwise)."""
        return inside(self.directory, f"{safe_stem(uid)}{SUFFIX}")

    def save(self, state: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Write one run's checkpoint atomically (``state["uid"]`` names the file).

        Raises:
            OSError: the file cannot be written.
        """
        write_checkpoint(self.path(state["uid"]), {**state, "format": FORMAT, "beamlens_version": __version__,
                                                   "saved": time.time()}, arrays)
        self._last = time.monotonic()

    def mark_saved(self) -> None:
        self._last = time.monotonic()

    def remove(self, uid: str) -> None:
        self.path(uid).unlink(missing_ok=True)

    def refuse(self, path: Path, reason: str) -> None:
        """Log why ``path`` is not used and move it aside as ``*.ckpt.bad``."""
        log.error("checkpoint %s refused, not resumed: %s; moved aside as %s.bad (the run is analysed from its next "
                  "documents on)", path.name, reason, path.name)
        try:
            path.rename(path.with_name(path.name + ".bad"))
        except OSError:
            log.exception("checkpoint %s could not be moved aside", path.name)

    def load(self, uid: str, refused: Callable[[Path, str], None] | None = None, with_arrays: bool = True,
             ) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]] | None:
        """The checkpoint of run ``uid`` as ``(path, state, arrays)`` (``arrays`` empty without
        ``with_arrays``), or None when there is none (or it was removed meanwhile: the run ended)
        or it is unusable (then it is refused, :meth:`refuse`, and ``refused(path, reason)`` is
        called)."""
        return self._read(self.path(uid), refused, with_arrays)

    def _read(self, path: Path, refused: Callable[[Path, str], None] | None, with_arrays: bool = True,
              ) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]] | None:
        try:
            state, arrays = read_checkpoint(path, with_arrays)
        except FileNotFoundError:
            return None
        except (CheckpointError, OSError) as exc:
            self.refuse(path, str(exc))
            if refused is not None:
                refused(path, str(exc))
            return None
        return path, state, arrays

    def load_all(self, newest: int | None = None, refused: Callable[[Path, str], None] | None = None,
                 ) -> list[tuple[Path, dict[str, Any], dict[str, np.ndarray]]]:
        """Read every checkpoint in the directory, oldest first: ``(path, state, arrays)`` (the
        reader of :meth:`load`). Unusable ones are refused (:meth:`refuse`). With ``newest``, only
        the ``newest`` most recent are read; older ones are moved aside as ``*.ckpt.old`` (more open runs than the daemon keeps,
        e.g. after a flood of never-stopped RunStarts)."""
        out = []
        paths = sorted(self.directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
        if newest is not None and len(paths) > newest:
            old, paths = paths[:len(paths) - newest], paths[len(paths) - newest:]
            log.error("%d checkpoints beyond the %d newest (limits.max_open_runs) not resumed; moved aside as *.ckpt.old",
                      len(old), newest)
            for path in old:
                path.rename(path.with_name(path.name + ".old"))
        for path in paths:
            loaded = self._read(path, refused)
            if loaded is not None:
                out.append(loaded)
        return out
