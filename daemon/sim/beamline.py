"""The embedded simulated beamline: a real bluesky RunEngine, ophyd simulated motors and a spectrum
detector, publishing every document through a bluesky 0MQ Proxy with msgpack (msgpack-numpy arrays).

The detector replays a :class:`~beamlens.daemon.sim.datasets.SpectralMap`: at each point of a
``grid_scan`` it reads the measured (or simulated) spectrum at the stage position, so the documents
are exactly what a mapping XAFS/STXM scan would publish: RunStart with ``shape``/``snaking``, a
descriptor whose ``configuration`` holds the energy axis (eV), and one event per point with the
spectrum inline.

Document traffic is bluesky's own (``Publisher``); the only beamlens addition is
:func:`wait_until_subscribed`, which defeats the PUB/SUB slow-joiner problem before a run starts.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import numpy as np
from bluesky import RunEngine
from bluesky import plans as bp
from bluesky.callbacks.zmq import Publisher
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.sim import SynAxis, SynSignal

from ..documents import PROBE_NAME, PROBE_PREFIX, msgpack_serializer
from .datasets import SpectralMap

log = logging.getLogger(__name__)


class SpectrumDetector(Device):
    """An ophyd detector that reads one spectrum of a spectral map per trigger.

    Readings: ``<name>_spectrum`` (float64 ``(n_channels,)``, hinted), ``<name>_total`` (float).
    Configuration: ``<name>_energy`` (eV, ``(n_channels,)``), recorded once in the descriptor.
    """

    spectrum = Cpt(SynSignal, kind="hinted")
    total = Cpt(SynSignal, kind="normal")
    energy = Cpt(Signal, kind="config")

    def __init__(self, *args, dataset: SpectralMap, motor_y: SynAxis, motor_x: SynAxis, **kwargs):
        super().__init__(*args, **kwargs)
        self.dataset = dataset
        self._my, self._mx = motor_y, motor_x
        self.energy.put(np.asarray(dataset.energy, dtype=np.float64))
        self.spectrum.sim_set_func(self._read_spectrum)
        self.total.sim_set_func(lambda: float(np.sum(self.spectrum.get())))
        # describe() infers dtype and shape from the current value: put an array first
        self.spectrum.put(self._read_spectrum())
        self.total.put(0.0)

    def _read_spectrum(self) -> np.ndarray:
        d = self.dataset
        iy = int(np.argmin(np.abs(d.y - self._my.position)))
        ix = int(np.argmin(np.abs(d.x - self._mx.position)))
        return np.asarray(d.spectra[iy, ix], dtype=np.float64)

    def trigger(self):
        return self.spectrum.trigger() & self.total.trigger()


class SimulatedBeamline:
    """A RunEngine with a sample stage and a spectrum detector, publishing to a bluesky proxy.

    Args:
        proxy_in: the proxy's in address (``tcp://127.0.0.1:PORT``).
        serializer: Publisher serializer (msgpack-numpy by default; ``pickle.dumps`` is bluesky's).
        prefix: Publisher prefix.
    """

    def __init__(self, proxy_in: str, serializer: Callable = msgpack_serializer, prefix: bytes = b""):
        self.proxy_in = proxy_in
        self.RE = RunEngine({}, context_managers=[])
        self.publisher = Publisher(proxy_in, serializer=serializer, prefix=prefix)
        self.RE.subscribe(self.publisher)
        self.sample_y = SynAxis(name="sample_y", labels={"motors"})
        self.sample_x = SynAxis(name="sample_x", labels={"motors"})

    def detector(self, dataset: SpectralMap) -> SpectrumDetector:
        return SpectrumDetector(name="xas", dataset=dataset, motor_y=self.sample_y, motor_x=self.sample_x)

    def map_scan(self, dataset: SpectralMap, *, snake: bool = True, md: dict | None = None) -> str:
        """Run a ``grid_scan`` over every point of ``dataset``; returns the RunStart uid."""
        det = self.detector(dataset)
        ny, nx = dataset.shape
        (uid,) = self.RE(bp.grid_scan(
            [det], self.sample_y, float(dataset.y[0]), float(dataset.y[-1]), ny,
            self.sample_x, float(dataset.x[0]), float(dataset.x[-1]), nx, snake_axes=snake,
            md={"sample": dataset.name, "stage_units": dataset.units, **(md or {})}))
        return uid

    def close(self) -> None:
        self.publisher.close()


def wait_until_subscribed(proxy_in: str, seen: Callable[[str], bool], timeout: float = 30.0) -> None:
    """Publish readiness probes through the proxy until the subscriber reports one.

    PUB/SUB drops messages published before a subscription has propagated (bluesky#2014). This
    sends ``beamlens_probe <nonce>`` with prefix :data:`~beamlens.daemon.documents.PROBE_PREFIX`
    every 50 ms until ``seen(nonce)`` is true. The payload starts with byte 0xC1, which pickle,
    msgpack and JSON all refuse, so a bluesky RemoteDispatcher on the same proxy that does not filter
    on a prefix drops the probe as undeserializable and carries on.

    The probe proves the proxy -> subscriber leg and that the proxy is up. Create the document
    ``Publisher`` *before* calling this, so that its own connection to the proxy is made while the
    probes go round.

    Args:
        proxy_in: the proxy's in address.
        seen: returns True once the subscriber has received the probe with that nonce.
        timeout: seconds.

    Raises:
        TimeoutError: if no probe got through in time.
    """
    publisher = Publisher(proxy_in, prefix=PROBE_PREFIX, serializer=lambda nonce: b"\xc1" + nonce.encode())
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            nonce = uuid.uuid4().hex
            publisher(PROBE_NAME, nonce)
            poll_until = time.monotonic() + 0.05
            while time.monotonic() < poll_until:
                if seen(nonce):
                    return
                time.sleep(0.005)
        raise TimeoutError(f"no probe reached the subscriber through {proxy_in} within {timeout} s")
    finally:
        publisher.close()
