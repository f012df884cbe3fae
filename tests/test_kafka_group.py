"""Two beamlens daemons (real subprocesses) in one Kafka consumer group, fed by a real bluesky
RunEngine with ophyd simulated devices publishing through ``bluesky_kafka.Publisher`` to a real
Kafka-protocol broker (Tansu) on 127.0.0.1.

- runs are split between the two instances and each is analysed exactly once, with the same maps
  as an undisturbed in-process run of the same documents;
- one instance is killed with SIGKILL in the middle of a run: the other takes its partitions over
  after the session timeout, resumes the run from the dead one's last checkpoint, drops the
  redelivered documents the checkpoint already held, and ends with the same maps as an
  undisturbed run.
"""
from __future__ import annotations

import copy
import datetime
import json
import threading
import time
import uuid

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import numpy as np
import pytest
from bluesky import RunEngine
from event_model import RunRouter
from ophyd.sim import SynAxis

from beamlens.daemon.sim.beamline import SpectrumDetector
from beamlens.daemon.sim.datasets import corroding_steel_map
from helpers import DaemonProcess, http_get, route_in_process, wait_for
from kafka_helpers import key_for_partition, stats_maps

PARTITIONS = 4
STATS = "consumers:\n  - {name: stats, class: stats}\n"


def daemon_config(tmp_path, broker, topic: str, group: str, name: str):
    path = tmp_path / f"{name}.yaml"
    source = {"name": "kafka", "bootstrap_servers": broker.bootstrap_servers, "topics": [topic], "group.id": group,
              "auto_offset_reset": "earliest", "session_timeout_s": 3, "commit_interval_s": 0.2}
    path.write_text(f"http: {{port: 0}}\nsources:\n  kafka:\n    - {json.dumps(source)}\n" + STATS
                    + f"state: {{directory: '{tmp_path / 'state'}', checkpoint_interval_s: 0.2}}\n")
    return path


class KafkaBeamline:
    """A RunEngine with a sample stage and a spectrum detector (ophyd sim signals); each run is
    published by its own ``bluesky_kafka.Publisher`` keyed per run (nslsii's RunRouter path), with
    the key taken from :attr:`keys` when one is queued (to put a run on a chosen partition)."""

    def __init__(self, broker, topic: str):
        from bluesky_kafka import Publisher

        self.RE = RunEngine({}, context_managers=[])
        self.y = SynAxis(name="sample_y", labels={"motors"})
        self.x = SynAxis(name="sample_x", labels={"motors"})
        self.keys: list[str] = []
        self.documents: dict[str, list] = {}

        def factory(name, start):
            key = self.keys.pop(0) if self.keys else start["uid"]
            publisher = Publisher(topic=topic, bootstrap_servers=broker.bootstrap_servers, key=key,
                                  producer_config={"acks": 1, "request.timeout.ms": 5000}, flush_on_stop_doc=True)
            return [publisher], []

        self.RE.subscribe(RunRouter([factory]))
        self.RE.subscribe(self._record)
        self._current: list | None = None

    def _record(self, name: str, doc: dict) -> None:
        """Keep every run's documents, for the undisturbed in-process reference."""
        if name == "start":
            self._current = self.documents[doc["uid"]] = []
        self._current.append((name, copy.deepcopy(doc)))

    def map_scan(self, shape: tuple[int, int], seed: int, delay: float = 0.0) -> str:
        data = corroding_steel_map(shape=shape, seed=seed)
        det = SpectrumDetector(name="xas", dataset=data, motor_y=self.y, motor_x=self.x)
        ny, nx = data.shape

        def step(detectors, step, pos_cache):
            yield from bps.one_nd_step(detectors, step, pos_cache)
            if delay:
                yield from bps.sleep(delay)
        (uid,) = self.RE(bp.grid_scan([det], self.y, float(data.y[0]), float(data.y[-1]), ny,
                                      self.x, float(data.x[0]), float(data.x[-1]), nx, snake_axes=True,
                                      per_step=step))
        return uid


def api_run(daemon: DaemonProcess, uid: str) -> dict | None:
    return daemon.run(uid)


def api_maps(daemon: DaemonProcess, uid: str) -> dict[str, np.ndarray]:
    out = {}
    for name in ("total", "max", "mean"):
        status, body, _ = http_get(f"{daemon.url}/api/runs/{uid}/stats/{name}.json")
        assert status == 200, body
        out[name] = np.array(json.loads(body)["data"], dtype=np.float64)
    return out


def assert_maps_equal(daemon: DaemonProcess, uid: str, documents) -> None:
    reference = stats_maps(route_in_process(STATS, documents)[1].get(uid))
    got = api_maps(daemon, uid)
    for name, values in reference.items():
        np.testing.assert_array_equal(got[name], values.reshape(got[name].shape), err_msg=name)


@pytest.mark.slow
def test_two_instances_split_runs_and_survive_a_kill(kafka_broker, tmp_path):
    topic, group = "bl.bluesky.runengine.documents", "beamlens-" + uuid.uuid4().hex[:6]
    kafka_broker.create_topic(topic, partitions=PARTITIONS)
    daemons = [DaemonProcess(daemon_config(tmp_path, kafka_broker, topic, group, n)) for n in ("a", "b")]
    try:
        # both members hold partitions before anything is published: no rebalance during the first runs
        wait_for(lambda: all(d.metric("beamlens_kafka_partitions_assigned", source="kafka") == PARTITIONS // 2
                             for d in daemons), 90)
        beamline = KafkaBeamline(kafka_broker, topic)
        beamline.keys = [key_for_partition(p, PARTITIONS) for p in range(PARTITIONS)]
        uids = [beamline.map_scan((5, 6), seed=i) for i in range(PARTITIONS)]

        def finished_by(uid):
            return [d for d in daemons if (api_run(d, uid) or {}).get("status") == "success"]
        wait_for(lambda: all(finished_by(u) for u in uids), 60)
        owners = {}
        for uid in uids:
            (owner,) = finished_by(uid)  # analysed exactly once
            others = [d for d in daemons if d is not owner]
            assert all(api_run(d, uid) is None for d in others)
            assert_maps_equal(owner, uid, beamline.documents[uid])
            owners[uid] = owner
        assert {id(o) for o in owners.values()} == {id(d) for d in daemons}  # the runs were split

        # a long run on a partition of the first daemon; kill that daemon mid-run
        victim, survivor = daemons
        victim_partition = next(p for p, u in enumerate(uids) if owners[u] is victim)
        beamline.keys = [key_for_partition(victim_partition, PARTITIONS)]
        seen: dict[str, object] = {}

        def kill_mid_run():
            def mid_run():
                runs = json.loads(http_get(f"{victim.url}/api/runs")[1])
                open_runs = [r for r in runs if r["status"] == "open" and r["uid"] not in uids]
                if open_runs and open_runs[0]["events_done"] >= 120:
                    seen["uid"], seen["events_at_kill"] = open_runs[0]["uid"], open_runs[0]["events_done"]
                    return victim.metric("beamlens_checkpoints_total", operation="save", outcome="ok") > 0
                return False
            wait_for(mid_run, 120)
            seen["checkpoints"] = victim.metric("beamlens_checkpoints_total", operation="save", outcome="ok")
            seen["killed"] = time.time()
            victim.kill()
        killer = threading.Thread(target=kill_mid_run, daemon=True)
        killer.start()
        long_uid = beamline.map_scan((20, 20), seed=99, delay=0.02)
        killer.join(120)
        assert seen.get("uid") == long_uid and victim.proc.poll() is not None
        wait_for(lambda: (api_run(survivor, long_uid) or {}).get("status") == "success", 120)
        run = api_run(survivor, long_uid)
        assert run["events_done"] == 400 and run["events_missing"] == 0
        assert survivor.metric("beamlens_runs_resumed_total") == 1
        assert survivor.metric("beamlens_kafka_duplicates_dropped_total", source="kafka", type="event") > 0
        assert survivor.metric("beamlens_kafka_rebalances_total", source="kafka", kind="assign") >= 2
        assert_maps_equal(survivor, long_uid, beamline.documents[long_uid])
        assert not list((tmp_path / "state").glob("*.ckpt"))  # the finished run's checkpoint is gone
        print(f"killed at {seen['events_at_kill']} of 400 events; survivor dropped "
              f"{survivor.metric('beamlens_kafka_duplicates_dropped_total', source='kafka', type='event'):.0f} "
              "redelivered events")
        resumed = next(line for line in survivor.lines if "resumed from its checkpoint" in line)
        at = datetime.datetime.strptime(resumed[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        print(f"the survivor resumed the run {at - seen['killed']:.1f} s after the kill:")
        print("\n".join(line for line in survivor.lines if "kafka" in line or "resumed" in line))
    finally:
        for d in daemons:
            d.close()
