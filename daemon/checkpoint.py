"""Checkpoints of open runs, so that a restarted daemon resumes their analysis instead of starting
blind.

Each open run is saved as one file ``<state_dir>/<run uid>.ckpt`` (uids that are not plain names
are hashed, see :meth:`Checkpointer.path`): the RunStart, the descriptors'
uids and shapes, the map placement state, and per consumer the consumer object itself (pickled
without its run context, result buffers and ``transient`` attributes; see
:meth:`beamlens.consumers.base.Consumer.__getstate__`), its result buffers and failure count.
Files are written to a temporary name, fsynced and renamed (POSIX ``rename`` is atomic), so a crash
mid-write leaves the previous checkpoint intact. A run's file is removed when the run ends.

Trust: checkpoints are pickles written by this daemon into its own state directory, never data
from the network; the directory must be writable only by the daemon's user.
"""
from __future__ import annotations

import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any

from . import __version__
from .limits import inside, safe_stem
from .results import RunState

log = logging.getLogger(__name__)

FORMAT = 1
SUFFIX = ".ckpt"


def run_state(run: RunState, descriptors: list[str]) -> dict[str, Any]:
    """The picklable state of one open run (consumers included)."""
    return {
        "format": FORMAT, "beamlens_version": __version__, "saved": time.time(),
        "uid": run.uid, "start_doc": run.start_doc, "nav_shape": run.nav_shape, "snaking": run.snaking,
        "joined_midway": run.joined_midway, "opened": run.opened, "last_event": run.last_event,
        "events_done": run.events_done, "max_position": run.max_position,
        "primary_descriptors": sorted(run.primary_descriptors), "descriptor_shapes": run.descriptor_shapes,
        "descriptors": descriptors, "buffers_allocated": run.buffers_allocated,
        "descriptor_streams": run.descriptor_streams, "events_received": run.events_received,
        "max_seq_num": run.max_seq_num, "nav_capacity": run.nav_capacity, "nav_offset": run.nav_offset,
        "limited": run.limited,
        "slots": [
            {"name": s.name, "consumer": s.consumer, "specs": s.specs, "arrays": s.arrays,
             "failures": s.failures, "quarantined": s.quarantined, "inactive_reason": s.inactive_reason,
             "axes": s.consumer.run.axes}
            for s in run.slots
        ],
    }


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

    def save(self, state: dict[str, Any]) -> None:
        """Write one run's state atomically.

        Raises:
            OSError: the file cannot be written.
            pickle.PicklingError, TypeError: a consumer holds something that cannot be pickled
                (declare it in ``Consumer.transient``).
        """
        final = self.path(state["uid"])
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        self._last = time.monotonic()

    def mark_saved(self) -> None:
        self._last = time.monotonic()

    def remove(self, uid: str) -> None:
        self.path(uid).unlink(missing_ok=True)

    def load(self, uid: str) -> dict[str, Any] | None:
        """The checkpoint of run ``uid``, or None when there is none or it is unusable (then it is
        logged and moved aside as ``*.ckpt.bad``)."""
        path = self.path(uid)
        if not path.exists():
            return None
        return self._read(path)

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            with open(path, "rb") as f:
                state = pickle.load(f)  # our own file in our own state directory
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise ValueError(f"unknown checkpoint format {state.get('format') if isinstance(state, dict) else type(state)}")
            return state
        except FileNotFoundError:
            return None  # removed meanwhile (the run ended)
        except Exception as exc:  # a checkpoint that cannot be read must not stop the daemon
            log.error("checkpoint %s unusable (%s: %s); moved aside", path.name, type(exc).__name__, exc)
            path.rename(path.with_name(path.name + ".bad"))
            return None

    def load_all(self, newest: int | None = None) -> list[dict[str, Any]]:
        """Read every checkpoint in the directory, oldest first; unreadable ones are logged, moved
        aside as ``*.ckpt.bad`` and skipped. With ``newest``, only the ``newest`` most recent are
        read; older ones are moved aside as ``*.ckpt.old`` (more open runs than the daemon keeps,
        e.g. after a flood of never-stopped RunStarts)."""
        states = []
        paths = sorted(self.directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
        if newest is not None and len(paths) > newest:
            old, paths = paths[:len(paths) - newest], paths[len(paths) - newest:]
            log.error("%d checkpoints beyond the %d newest (limits.max_open_runs) not resumed; moved aside as *.ckpt.old",
                      len(old), newest)
            for path in old:
                path.rename(path.with_name(path.name + ".old"))
        for path in paths:
            state = self._read(path)
            if state is not None:
                states.append(state)
        return states
