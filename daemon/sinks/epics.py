"""EPICS PVAccess output: the newest run's results as PVs for control-room clients (Phoebus /
CS-Studio image and text widgets, ImageJ's EPICS plugin, ``python -m p4p.client.cli``).

Optional extra ``beamlens[epics]`` (``p4p``, the PVXS-based PVAccess server of epics-base). PVs,
under ``outputs.epics.prefix`` (``P`` below):

- ``P<consumer>:<buffer>``, one per ``nav`` buffer (a map): an NTNDArray, uncompressed (``codec``
  empty; ImageJ's plugin cannot read compressed arrays, areaDetector/ADCore#562), float64 as the
  HTTP API's ``.json``/``.f32`` maps (NaN where no point was measured), ``dimension[0]`` the fastest
  (column) axis as in areaDetector, attributes ``RunUID`` and ``Units``, ``uniqueId`` counting
  updates, ``timeStamp`` the time of the update;
- ``P<consumer>:<buffer>``, one per ``single`` buffer (figures such as reconstruction error,
  explained variance, defect counts): NTScalar ``d`` (or ``l`` for integer buffers) when it has one
  value, NTScalarArray ``ad``/``al`` otherwise;
- ``Prun:uid``, ``Prun:status`` (NTScalar ``s``), ``Prun:scan_id``, ``Prun:events``,
  ``Prun:frames`` (``l``), ``Prun:progress`` (``d``, 0..1).

"Newest run" is the run started most recently (open or finished), as ``/api/runs/latest``. A PV is
posted only when its value changed (64-bit digest), at most every ``update_interval_s``. The server
binds only ``outputs.epics.interfaces`` (loopback by default), with beacons to those addresses only,
and ignores the process environment's ``EPICS_PVAS_*`` so that config alone decides.

Sources: p4p documentation (``p4p.server.Server``, ``SharedPV``, ``p4p.nt.NTNDArray``), the
NTNDArray normative type (EPICS V4 Normative Types, ``epics:nt/NTNDArray:1.0``).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from ..config import EpicsOutputConfig
from ..metrics import Metrics
from ..results import BufferSnapshot, RunState, RunStore
from .live import buffer_digest

log = logging.getLogger(__name__)


def _p4p() -> Any:
    try:
        import p4p
        import p4p.nt
        import p4p.server
        import p4p.server.thread
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError("outputs.epics needs p4p: pip install 'beamlens[epics]'") from exc
    return p4p


def server_conf(config: EpicsOutputConfig) -> dict[str, str]:
    """The PVAccess server configuration (``EPICS_PVAS_*`` keys) for ``config``."""
    interfaces = " ".join(config.interfaces)
    return {
        "EPICS_PVAS_INTF_ADDR_LIST": interfaces,
        "EPICS_PVAS_BEACON_ADDR_LIST": interfaces,
        "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_PVAS_SERVER_PORT": str(config.server_port),
        "EPICS_PVAS_BROADCAST_PORT": str(config.search_port),
    }


class EpicsSink:
    """A PVAccess server publishing the newest run (see the module docstring for the PVs).

    Args:
        config: ``outputs.epics``.
        store: the runs.
        metrics: failures are counted in ``beamlens_output_failures_total{output="epics"}``.

    Raises:
        RuntimeError: p4p is not installed.
    """

    def __init__(self, config: EpicsOutputConfig, store: RunStore, metrics: Metrics):
        self.config = config
        self.store = store
        self.metrics = metrics
        self.p4p = _p4p()
        self.provider = self.p4p.server.StaticProvider("beamlens")
        self.server: Any = None
        self._pvs: dict[str, tuple[str, Any]] = {}  # name -> (type code, SharedPV)
        self._digests: dict[str, str] = {}
        self._updates = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        metrics.output_failures.labels("epics").inc(0)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the server (bound to the configured interfaces) and the update thread."""
        self.server = self.p4p.server.Server(providers=[self.provider], conf=server_conf(self.config), useenv=False)
        conf = self.server.conf()
        log.info("EPICS PVAccess server on %s port %s (search port %s), PV prefix %r",
                 conf.get("EPICS_PVAS_INTF_ADDR_LIST"), conf.get("EPICS_PVAS_SERVER_PORT"),
                 conf.get("EPICS_PVAS_BROADCAST_PORT"), self.config.prefix)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="beamlens-epics", daemon=True)
        self._thread.start()

    def conf(self) -> dict[str, str]:
        """The running server's effective configuration (bound addresses and ports)."""
        return dict(self.server.conf()) if self.server is not None else {}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.server is not None:
            self.server.stop()
            self.server = None
        for _, pv in self._pvs.values():
            pv.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.config.update_interval_s):
            try:
                self.update()
            except Exception:  # one bad update must not end the output
                self.metrics.output_failures.labels("epics").inc()
                log.exception("EPICS update failed")

    # -- publishing --------------------------------------------------------------------------
    def pv_names(self) -> list[str]:
        return sorted(self._pvs)

    def update(self) -> int:
        """Post every PV of the newest run whose value changed (any thread; the update thread
        calls it every ``update_interval_s``). Returns the number of PVs posted."""
        run = self.store.get("latest")
        if run is None:
            return 0
        now = time.time()
        posted = sum(self._post(f"run:{key}", code, value, now) for key, code, value in self._run_figures(run))
        for slot in list(run.slots):
            for name, spec in list(slot.specs.items()):
                if spec.kind == "sig":
                    continue
                try:
                    snap = self.store.snapshot(run.uid, slot.name, name)
                except KeyError:  # not allocated yet
                    continue
                posted += self._post_buffer(snap, now)
        return posted

    @staticmethod
    def _run_figures(run: RunState) -> list[tuple[str, str, Any]]:
        scan_id = run.start_doc.get("scan_id")
        return [("uid", "s", run.uid), ("status", "s", run.status),
                ("scan_id", "l", int(scan_id) if isinstance(scan_id, int) else -1),
                ("events", "l", int(run.events_done)), ("frames", "l", int(run.frames_done)),
                ("progress", "d", float(run.progress))]

    def _post_buffer(self, snap: BufferSnapshot, now: float) -> int:
        name = f"{snap.consumer}:{snap.spec.name}"
        integer = np.issubdtype(snap.data.dtype, np.integer)
        if snap.spec.kind == "nav":
            data = np.ascontiguousarray(snap.data, dtype=np.float64)
            return self._post(name, "NDArray", data, now, attrib={"RunUID": snap.run_uid, "Units": snap.spec.units})
        flat = np.ravel(snap.data)
        if flat.size == 1:
            return self._post(name, "l" if integer else "d", int(flat[0]) if integer else float(flat[0]), now)
        return self._post(name, "al" if integer else "ad", flat.astype(np.int64 if integer else np.float64), now)

    def _post(self, name: str, code: str, value: Any, now: float, attrib: dict[str, str] | None = None) -> int:
        full = self.config.prefix + name
        digest = buffer_digest(np.asarray(value)) if not isinstance(value, str) else value
        digest = f"{code}:{digest}:{attrib}"
        if self._digests.get(full) == digest:
            return 0
        nt = self.p4p.nt
        existing = self._pvs.get(full)
        if existing is not None and existing[0] != code:  # the buffer changed type between runs
            self.provider.remove(full)
            existing[1].close()
            existing = None
        if code == "NDArray":
            ndarray = nt.NTNDArray()
            self._updates += 1
            wrapped = ndarray.wrap(value, attrib=attrib or {}, timestamp=now)
            wrapped["uniqueId"] = self._updates
            if existing is None:
                # already wrapped (with uniqueId): pass Values through, wrap anything else
                pv = self.p4p.server.thread.SharedPV(
                    nt=ndarray, initial=wrapped,
                    wrap=lambda v, nd=ndarray, **kws: v if isinstance(v, self.p4p.Value) else nd.wrap(v, **kws))
                self.provider.add(full, pv)
                self._pvs[full] = (code, pv)
            else:
                existing[1].post(wrapped)
        else:
            if existing is None:
                pv = self.p4p.server.thread.SharedPV(nt=nt.NTScalar(code), initial=value)
                self.provider.add(full, pv)
                self._pvs[full] = (code, pv)
                pv.post(value, timestamp=now)
            else:
                existing[1].post(value, timestamp=now)
        self._digests[full] = digest
        return 1
