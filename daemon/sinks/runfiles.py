"""Run files: each run's results in one NeXus-style HDF5 file, written atomically.

When a run stops (and when the daemon shuts down and closes open runs as ``incomplete``), the router
thread copies every result buffer and hands the copy to one writer thread through a bounded queue
(policy: the router blocks when ``queue_size`` runs are waiting; results are never dropped). The
writer creates ``.<name>.<pid>.<random>.partial`` in the target directory, writes and flushes it,
``fsync``s it, renames it over the final name with ``os.replace`` (atomic on POSIX) and ``fsync``s the
directory. A crash at any point leaves either no file or a complete one under the final name, and
at most a ``.partial`` file, which the next writer started on that directory removes when its
process is gone.

Layout (NeXus base classes NXentry, NXprocess, NXdata, NXnote, NXcollection; NIAC, "NeXus: a common
data format", manual.nexusformat.org; ``default``/``signal``/``axes``/``AXISNAME_indices`` as in the
NeXus "Find the plottable data" rules)::

    /                           @default=entry @creator=beamlens @creator_version
    /entry          NXentry     @default=plot
        title, start_time, end_time (ISO 8601), program_name (@version), raw_run_uid, exit_status
        (success | abort | fail | incomplete: closed by timeout or shutdown | suspended: checkpointed
        at shutdown, resumed later), points_processed, events_missing (announced, never received)
        plot            NXdata      link (@target) to the first consumer's default buffer
        raw_run_start   NXnote      type=application/json, data=<the raw RunStart>
        configuration   NXnote      type=application/json, data=<the daemon configuration>
        <consumer>      NXprocess   @default=<first nav buffer, else first buffer>
            program, version, sequence_index, model_sha256 (when the consumer has one)
            parameters  NXnote      type=application/json, data=<the consumer's parameters>
            <buffer>    NXdata      @signal=data @axes=[...] @<axis>_indices
                data        (*nav_shape, *extra_shape) | extra_shape, @units @long_name
                <axis>      motor positions (nav) or signal axis values (sig), @units

Scan axes are in motor units (:mod:`beamlens.daemon.sinks.axes`): the motors' readings in the raw
events, else the positions the RunStart's plan pattern describes (``grid_scan``, ``scan``,
``list_scan``), else point indices ``scan_dim_<i>``. Every numeric dataset has ``@units``;
dimensionless ones say ``"1"``. Files get mode ``0666 & ~umask`` (group-readable under the usual
022 or 002 umask), as any file the daemon's user creates.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..config import Config
from ..limits import inside, safe_stem, wire_index
from ..metrics import Metrics
from ..results import BufferSnapshot, RunState, RunStore
from .axes import Axis, RunReadings
from .provenance import consumer_provenance

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
_STOP = object()


@dataclass
class ConsumerResults:
    """One consumer's final buffers of a run, with what produced them."""

    name: str
    provenance: dict[str, Any]
    buffers: list[BufferSnapshot]


@dataclass
class RunRecord:
    """Everything one run file holds, copied out of the router's state."""

    uid: str
    start_doc: dict[str, Any]
    status: str
    opened: float
    closed: float
    events_done: int
    nav_axes: list[Axis]
    consumers: list[ConsumerResults]
    events_missing: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        """The run file's name, :func:`run_file_name`."""
        return run_file_name(self.uid, self.start_doc)


def run_file_name(uid: str, start_doc: dict[str, Any]) -> str:
    """``beamlens_scan<scan_id>_<uid[:8]>.nxs`` (``beamlens_<uid>.nxs`` without an integer
    scan_id) for raw run ``uid``; a uid that is not a plain name is hashed first (never a path).
    :func:`free_name` appends ``_2``, ``_3``, ... to the stem when another run's file has the name."""
    scan = wire_index(start_doc.get("scan_id"))
    stem = safe_stem(uid)
    return f"beamlens_scan{scan}_{stem[:8]}.nxs" if scan is not None else f"beamlens_{stem}.nxs"


def dataset_path(consumer: str, buffer: str) -> str:
    """The HDF5 path of one buffer's values in a run file: ``/entry/<consumer>/<buffer>/data``,
    shaped ``(*nav_shape, *extra_shape)`` for ``nav`` buffers, ``extra_shape`` otherwise."""
    return f"/entry/{consumer}/{buffer}/data"


MAX_NAME_SUFFIX = 1000


def _replaceable(path: Path, uid: str) -> bool:
    """An existing run file may be replaced only by the same run resuming after a ``suspended``
    file (a restart); any other file under that name is kept."""
    try:
        with h5py.File(path, "r") as f:
            entry = f["entry"]
            return entry["raw_run_uid"].asstr()[()] == uid and entry["exit_status"].asstr()[()] == "suspended"
    except Exception:
        return False


def free_name(directory: Path, record: RunRecord) -> Path:
    """The path to write ``record`` to, inside ``directory``: its :attr:`RunRecord.filename`, or,
    when a file of another run (or a finished one of the same uid: a replay) is there already,
    ``<stem>_2.nxs``, ``_3``, ...

    Raises:
        FileExistsError: ``MAX_NAME_SUFFIX`` names are taken.
    """
    name = record.filename
    stem = name[: -len(".nxs")]
    for i in range(1, MAX_NAME_SUFFIX + 1):
        path = inside(directory, name if i == 1 else f"{stem}_{i}.nxs")
        if not path.exists() or _replaceable(path, record.uid):
            if i > 1:
                log.warning("%s exists (another run, or a replay of a finished run's uid); writing %s", name, path.name)
            return path
    raise FileExistsError(f"{MAX_NAME_SUFFIX} run files named {stem}*.nxs exist already")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat()


def _note(parent: h5py.Group, name: str, payload: Any) -> None:
    note = parent.create_group(name)
    note.attrs["NX_class"] = "NXnote"
    note["type"] = "application/json"
    note["data"] = json.dumps(payload, default=str, sort_keys=True)


def _units(units: str) -> str:
    """A dataset's ``@units``: dimensionless values (PCA scores, ratios, indices) get ``"1"``, the
    SI/UDUNITS spelling of a dimensionless quantity (NeXus NX_DIMENSIONLESS)."""
    return units or "1"


def _write_nxdata(group: h5py.Group, snap: BufferSnapshot, nav_axes: list[Axis]) -> None:
    spec = snap.spec
    data = np.asarray(snap.data)
    group.attrs["NX_class"] = "NXdata"
    group.attrs["signal"] = "data"
    dset = group.create_dataset("data", data=data, compression="gzip", compression_opts=4, shuffle=True)
    dset.attrs["units"] = _units(spec.units)
    dset.attrs["long_name"] = f"{snap.consumer} {spec.name}" + (f" ({spec.units})" if spec.units else "")
    if spec.description:
        dset.attrs["description"] = spec.description
    axes = ["."] * data.ndim
    lead = nav_axes if spec.kind == "nav" else []
    for axis in lead:
        if axes[axis.dim] == ".":
            axes[axis.dim] = axis.name  # the first motor of a dimension plots it; others are auxiliary axes
        group.create_dataset(axis.name, data=axis.values).attrs["units"] = _units(axis.units)
        group.attrs[f"{axis.name}_indices"] = axis.dim
    if spec.kind == "sig" and snap.axis is not None and spec.axis and data.ndim:
        values, units = snap.axis
        if np.asarray(values).shape == (data.shape[-1],):
            axes[-1] = spec.axis
            group.create_dataset(spec.axis, data=np.asarray(values, dtype=np.float64)).attrs["units"] = _units(units)
            group.attrs[f"{spec.axis}_indices"] = data.ndim - 1
    group.attrs["axes"] = axes


def write_nexus(f: h5py.File, record: RunRecord) -> None:
    """Write ``record`` into an open, empty HDF5 file (layout in the module docstring)."""
    f.attrs["default"] = "entry"
    f.attrs["creator"] = "beamlens"
    f.attrs["creator_version"] = __version__
    f.attrs["file_time"] = _iso(time.time())
    entry = f.create_group("entry")
    entry.attrs["NX_class"] = "NXentry"
    start = record.start_doc
    entry["title"] = f"beamlens results of scan {start.get('scan_id')} ({start.get('plan_name')})"
    entry["start_time"] = _iso(record.opened)
    entry["end_time"] = _iso(record.closed)
    entry["program_name"] = "beamlens"
    entry["program_name"].attrs["version"] = __version__
    entry["raw_run_uid"] = record.uid
    entry["exit_status"] = record.status
    entry["points_processed"] = record.events_done
    entry["points_processed"].attrs["units"] = "1"
    entry["events_missing"] = record.events_missing
    entry["events_missing"].attrs["units"] = "1"
    _note(entry, "raw_run_start", start)
    _note(entry, "configuration", record.config)
    for index, consumer in enumerate(record.consumers):
        proc = entry.create_group(consumer.name)
        proc.attrs["NX_class"] = "NXprocess"
        proc["program"] = consumer.provenance["class"]
        proc["version"] = consumer.provenance["beamlens_version"]
        proc["sequence_index"] = index + 1
        proc["sequence_index"].attrs["units"] = "1"
        if "model_sha256" in consumer.provenance:
            proc["model_sha256"] = consumer.provenance["model_sha256"]
        _note(proc, "parameters", consumer.provenance["params"])
        for snap in consumer.buffers:
            _write_nxdata(proc.create_group(snap.spec.name), snap, record.nav_axes)
        if consumer.buffers:
            proc.attrs["default"] = _default_buffer(consumer.buffers).spec.name
    _default_plot(entry, record)


def _default_buffer(buffers: list[BufferSnapshot]) -> BufferSnapshot:
    """The buffer a viewer plots first: the first map (``nav``), else the first buffer."""
    return next((b for b in buffers if b.spec.kind == "nav"), buffers[0])


def _default_plot(entry: h5py.Group, record: RunRecord) -> None:
    """``entry/@default`` names an NXdata, as the NeXus rules require: ``entry/plot`` is a link to
    the first consumer's default buffer (NeXus link: the ``@target`` attribute names the original)."""
    consumer = next((c for c in record.consumers if c.buffers), None)
    if consumer is None:
        return
    target = entry[consumer.name][_default_buffer(consumer.buffers).spec.name]
    target.attrs["target"] = target.name
    entry["plot"] = target
    entry.attrs["default"] = "plot"


def current_umask() -> int:
    """The process umask, read from ``/proc/self/status`` (Linux >= 4.7) without changing it; else by
    setting and restoring it (not atomic, but only where /proc lacks the field)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_run_file(record: RunRecord, directory: Path) -> Path:
    """Write ``record`` to ``directory/record.filename`` atomically (temp file, flush, fsync,
    ``os.replace``, directory fsync).

    Returns:
        the final path.

    Raises:
        OSError: the directory is not writable or the disk is full (the temp file is removed).
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = free_name(directory, record)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=PARTIAL_SUFFIX, dir=directory)
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a run file is as readable as any other
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with h5py.File(tmp, "w") as f:
            write_nexus(f, record)
            f.flush()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def remove_stale_partials(directory: Path) -> list[Path]:
    """Remove ``.partial`` files left by writer processes that no longer exist.

    Returns:
        the removed paths.
    """
    removed = []
    for path in directory.glob(f".*{PARTIAL_SUFFIX}"):
        parts = path.name.split(".")
        try:
            pid = int(parts[-3])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
            continue  # its writer is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        path.unlink(missing_ok=True)
        removed.append(path)
        log.warning("removed %s, left by writer process %d that stopped mid-write", path, pid)
    return removed


class RunFileWriter:
    """Router listener that writes one run file per run, from a writer thread.

    Args:
        config: the daemon configuration (``outputs.files`` is used; the whole tree is recorded).
        metrics: counts files written and failures.
        store: where the run's buffers are snapshotted from.
    """

    def __init__(self, config: Config, metrics: Metrics, store: RunStore):
        self.config = config
        self.directory = Path(config.outputs.files.directory)
        self.metrics = metrics
        self.store = store
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=config.outputs.files.queue_size)
        metrics.output_failures.labels("files").inc(0)  # exported from the start, so increase() sees the first
        self._readings = RunReadings()
        self._thread: threading.Thread | None = None
        self.written: list[Path] = []

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.directory)
        self._thread = threading.Thread(target=self._loop, name="beamlens-runfiles", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Write every queued run, then stop the thread."""
        if self._thread is None:
            return
        self.queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("run files still being written after %.0f s", timeout)
        self._thread = None

    def __call__(self, name: str, run: RunState, doc: dict[str, Any]) -> None:
        """Router hook (router thread): gather motor units and readings; at stop, queue the run's results."""
        self._readings.observe(name, run, doc)
        if name == "stop":
            try:
                record = self.record(run)
            except Exception:
                self.metrics.output_failures.labels("files").inc()
                log.exception("results of run %s could not be copied for its run file", run.uid)
                return
            self.queue.put(record)

    def record(self, run: RunState) -> RunRecord:
        """Copy a stopped run's results (router thread)."""
        consumers = []
        for slot in run.slots:
            snaps = [self.store.snapshot(run.uid, slot.name, b) for b in slot.arrays]
            consumers.append(ConsumerResults(slot.name, consumer_provenance(slot), snaps))
        return RunRecord(
            uid=run.uid, start_doc=dict(run.start_doc), status=run.status, opened=run.opened,
            closed=run.closed or time.time(), events_done=run.events_done, events_missing=run.events_missing,
            nav_axes=self._readings.axes(run),
            consumers=consumers, config=self.config.model_dump(mode="json", by_alias=True))

    def _loop(self) -> None:
        while True:
            record = self.queue.get()
            if record is _STOP:
                return
            t0 = time.perf_counter()
            try:
                path = write_run_file(record, self.directory)
            except Exception:
                self.metrics.output_failures.labels("files").inc()
                log.exception("run file of run %s not written", record.uid)
                continue
            self.written.append(path)
            self.metrics.run_files_written.inc()
            log.info("wrote %s (%s, %d points) in %.2f s", path, record.status, record.events_done, time.perf_counter() - t0)
