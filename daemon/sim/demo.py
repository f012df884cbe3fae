"""``beamlens demo``: the whole chain on one machine, all on 127.0.0.1.

Starts a bluesky 0MQ Proxy (subprocess), an emulated DECTRIS detector (stream v2, bitshuffle-LZ4), a
simulated STEM microscope (array-1.0), the daemon (subscribed to all three: the config's sources
named ``demo``, ``demo_detector`` and ``demo_microscope`` are pointed at them), and the simulated
beamline; runs the corroding-steel Fe K-edge map (21 x 21) and the real Fe L-edge STXM image
(150 x 150) as ``grid_scan``s, then a 16 x 16 snaking raster during which the detector streams one
256 x 256 frame per point, then a defect movie from the microscope, then a simulated battery
electrode imaged once per cycle (one array-1.0 series per cycle, ``demo_sem``: features and their GP
forecast fill in); prints where the maps and metrics are; serves until Ctrl-C.
"""
from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path

from ..app import Daemon
from ..config import Config
from .beamline import SimulatedBeamline, wait_until_subscribed
from .datasets import corroding_steel_map, stxm_map
from .detectors import DetectorEmulator, raster_series_plan, synthetic_frames
from .electrode import ElectrodeMicroscope
from .microscope import SimulatedMicroscope
from .proxy import ProxyProcess

RASTER = (16, 16)
MOVIE_FRAMES = 150
MOVIE_RATE_HZ = 10.0
ELECTRODE_CYCLES = (0, 25, 50, 100, 150, 200, 300, 400, 500, 650, 800, 1000, 1200, 1500)
ELECTRODE_PERIOD_S = 1.0  # one cross-section per second, so the forecast visibly fills in


def point_sources(config: Config, addresses: dict[str, str]) -> Config:
    """A copy of ``config`` whose sources named in ``addresses`` connect there instead.

    Raises:
        ValueError: if the config lacks one of the named sources.
    """
    sources = config.sources
    bluesky = [s.model_copy(update={"address": addresses[s.name]}) if s.name in addresses else s for s in sources.bluesky]
    frames = [s.model_copy(update={"address": addresses[s.name], "mode": "connect"}) if s.name in addresses else s
              for s in sources.frames]
    missing = set(addresses) - {s.name for s in [*bluesky, *frames]}
    if missing:
        raise ValueError(f"the demo config needs sources named {sorted(missing)}")
    return config.model_copy(update={"sources": sources.model_copy(update={"bluesky": bluesky, "frames": frames})})

def point_stores(config: Config, folder: Path) -> Config:
    """A copy of ``config`` whose consumers with a ``store`` param left empty keep their trend
    store in ``folder`` (the state directory when configured, else the demo's temporary folder)."""
    consumers = []
    for c in config.consumers:
        if "store" in c.params and c.params["store"] is None:
            c = c.model_copy(update={"params": {**c.params, "store": str(folder / "trends.sqlite")}})
        consumers.append(c)
    return config.model_copy(update={"consumers": consumers})


log = logging.getLogger(__name__)


def run_demo(config: Config, *, stxm_region: tuple[slice, slice] | None = None, serve: bool = True,
             announce=print) -> Daemon:
    """Run the demo with ``config`` (its bluesky source address is replaced by the demo proxy's).

    Args:
        config: daemon config (consumers, HTTP); sources are set here.
        stxm_region: replay only this part of the STXM image (``None``: all 150 x 150 points).
        serve: keep serving until SIGINT/SIGTERM after the runs; otherwise stop and return.
        announce: where to print what a person needs to know (URLs, timings).

    Returns:
        the (stopped, if ``serve`` is False) daemon, for inspection.
    """
    with (ProxyProcess() as proxy, DetectorEmulator("dectris-v2") as detector,
          SimulatedMicroscope(n_frames=MOVIE_FRAMES, rate_hz=MOVIE_RATE_HZ) as microscope,
          ElectrodeMicroscope() as sem, tempfile.TemporaryDirectory(prefix="beamlens-demo-") as tmp):
        addresses = {"demo": proxy.out_address, "demo_detector": detector.address,
                     "demo_microscope": microscope.address}
        if any(s.name == "demo_sem" for s in config.sources.frames):
            addresses["demo_sem"] = sem.address
        config = point_stores(point_sources(config, addresses), config.state.directory or Path(tmp))
        daemon = Daemon(config)
        daemon.start()
        announce(f"beamlens live page: {daemon.http.url}/  (metrics: {daemon.http.url}/metrics)")
        beamline = SimulatedBeamline(proxy.in_address)
        try:
            wait_until_subscribed(proxy.in_address, lambda n: any(s.probe_seen(n) for s in daemon.sources))
            steel = corroding_steel_map()
            t0 = time.perf_counter()
            uid = beamline.map_scan(steel, md={"purpose": "demo: corroding steel Fe K-edge map"})
            announce(f"corroding-steel map: {steel.shape[0] * steel.shape[1]} points in {time.perf_counter() - t0:.1f} s "
                     f"-> {daemon.http.url}/api/runs/{uid}")
            stxm = stxm_map()
            if stxm_region is not None:
                stxm = stxm.region(*stxm_region)
            n = stxm.shape[0] * stxm.shape[1]
            t0 = time.perf_counter()
            uid = beamline.map_scan(stxm, md={"purpose": "demo: real Fe L-edge STXM image"})
            daemon.store.wait_finished(uid, 120)
            dt = time.perf_counter() - t0
            announce(f"STXM image: {n} points in {dt:.1f} s ({n / dt:.0f} events/s end to end) "
                     f"-> {daemon.http.url}/api/runs/{uid}")
            n = RASTER[0] * RASTER[1]
            t0 = time.perf_counter()
            (uid,) = beamline.RE(raster_series_plan(
                detector, list(synthetic_frames(n, (256, 256))), RASTER, snake=True,
                run_seen=lambda u: daemon.store.get(u) is not None, md={"purpose": "demo: detector frames"}))
            daemon.store.wait_finished(uid, 60)
            announce(f"detector raster: {n} DECTRIS stream-v2 frames in {time.perf_counter() - t0:.1f} s "
                     f"-> {daemon.http.url}/api/runs/{uid}")
            t0 = time.perf_counter()
            microscope.run()
            announce(f"STEM defect movie: {MOVIE_FRAMES} array-1.0 frames at {MOVIE_RATE_HZ:.0f} Hz in "
                     f"{time.perf_counter() - t0:.1f} s; defect counts in {daemon.http.url}/metrics (beamlens_defects)")
            if "demo_sem" in addresses:
                for cycle in ELECTRODE_CYCLES:  # paced on purpose: one cross-section per period
                    sem.send_cycle(cycle)
                    time.sleep(ELECTRODE_PERIOD_S)
                announce(f"electrode cross-sections: {len(ELECTRODE_CYCLES)} cycles (one array-1.0 series each); "
                         f"features and forecasts in {daemon.http.url}/metrics (beamlens_image_feature, "
                         f"beamlens_forecast_crossing)")
        finally:
            beamline.close()
        if serve:
            announce("runs done; still serving. Press Ctrl-C to stop.")
            done = threading.Event()
            try:
                import signal
                signal.signal(signal.SIGTERM, lambda *a: done.set())
                done.wait()
            except KeyboardInterrupt:
                pass
        daemon.stop()
    return daemon
