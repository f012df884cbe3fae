"""Bluesky documents from Kafka topics, read as one member of a consumer group (``confluent-kafka``).

Wire format (bluesky-kafka 0.10 ``bluesky_kafka.Publisher``): one message per document, value
``msgpack.dumps((name, doc))`` with numpy arrays in msgpack-numpy's map form (``import bluesky_kafka``
patches msgpack with ``msgpack_numpy``), key chosen by the publisher (NSLS-II's RunRouter path keys
each run by its RunStart uid, so a run stays on one partition, in order). Values are decoded with
beamlens' own msgpack decoder (:func:`~beamlens.daemon.documents.make_deserializer`: numeric arrays
only, never pickle) and validated exactly as the 0MQ source does
(:func:`~beamlens.daemon.documents.decode_document`); bad messages are logged and counted under the
same reasons (``beamlens_bad_messages_total``).

Delivery: Kafka gives at-least-once; this source makes it exactly-once in effect.

- **Offsets.** Auto-commit is off. Per partition, the committed offset is the lowest offset of a run
  read from it that is still open (its first document, normally its RunStart), or the next offset
  when none is open. A run stops holding the commit once the router has handled its RunStop (the
  router's ``stop`` notification, or the router had no such run open). A run handed over keeps
  holding it: the next owner reads the run again from its RunStart.
- **De-duplication.** Per open run: the uids of its RunStart, descriptors and RunStop, and per
  descriptor the seq_nums already taken. A document already held is dropped and counted
  (``beamlens_kafka_duplicates_dropped_total``); an EventPage loses only its duplicate events.
- **Rebalances.** On revoke (or loss) of partitions, their open runs are checkpointed and suspended
  on the router thread (:meth:`Supervisor.hand_over <beamlens.daemon.supervision.Supervisor.hand_over>`,
  run through :meth:`Router.call <beamlens.daemon.router.Router.call>` after everything already
  submitted), offsets are committed, and the runs forgotten here. The new owner re-reads each run
  from its RunStart: the router resumes a run that has a checkpoint (:meth:`Supervisor.resume
  <beamlens.daemon.supervision.Supervisor.resume>`, which this source waits for before it submits
  the run's first document read again), and this source then seeds the run's de-duplication from the
  same checkpoint (its descriptors, and per descriptor every seq_num up to the highest one held), so
  the redelivered part already analysed is dropped and the rest is analysed once. A checkpoint the
  router refuses (consumers configured differently, a damaged file) seeds nothing: the run is
  analysed whole from what is read again. An instance killed outright leaves its last periodic
  checkpoint (``state.checkpoint_interval_s``); its successor redoes what came after it.
- **Finished runs.** When a run ends, a marker ``kafka-done/<run uid>`` is written in the state
  directory before its offsets may be committed; a run read again whose RunStart has a marker (an
  instance died between a run's end and its commit) is dropped whole as a duplicate.

Exactly-once in effect needs ``state.directory`` on storage that every instance of the group
reaches (the same host, or a shared file system). Without it, a handed-over run is analysed again
from its RunStart by its new owner (complete, but analysed twice in part).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from event_model import pack_event_page, unpack_event_page

from ..config import KafkaSourceConfig
from ..documents import DecodeError, Document, coalesce_events, decode_document, deserialize, make_deserializer
from ..isolation import RateLimitedLog, guarded
from ..limits import inside, safe_stem
from ..metrics import Metrics
from .bluesky_zmq import MAX_DRAIN, count_received

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Message, TopicPartition

    from ..results import RunState
    from ..router import Router

log = logging.getLogger(__name__)

POLL_S = 0.1
LAG_INTERVAL_S = 1.0
HANDOVER_TIMEOUT_S = 120.0
"""Longest wait for the router to checkpoint revoked runs (within librdkafka's max.poll.interval.ms)."""
MAX_CLOSED = 10_000
"""Uids of finished runs remembered in memory (for duplicates of their documents)."""
DONE_DIR = "kafka-done"
DONE_TTL_S = 7 * 86400.0
"""Finished-run markers older than this are removed at start (a run is not redelivered that late)."""


def _identity(doc: Any) -> Any:
    return doc


class SeqSet:
    """The seq_nums of one descriptor already taken: every one up to ``floor``, and those above
    it in ``above`` (bounded: seq_nums arrive nearly in order, so ``above`` stays small)."""

    __slots__ = ("floor", "above")

    def __init__(self, floor: int = 0):
        self.floor = floor
        self.above: set[int] = set()

    def add(self, seq_num: int) -> bool:
        """Take ``seq_num``; False if it was taken already."""
        if seq_num <= self.floor or seq_num in self.above:
            return False
        self.above.add(seq_num)
        while self.floor + 1 in self.above:
            self.floor += 1
            self.above.discard(self.floor)
        return True


class RunLedger:
    """What this source has taken of one run, and where in Kafka the run lives."""

    __slots__ = ("uid", "partition", "first_offset", "docs", "descriptors", "resumed")

    def __init__(self, uid: str, partition: tuple[str, int], first_offset: int):
        self.uid = uid
        self.partition = partition
        self.first_offset = first_offset
        self.docs: set[str] = set()
        """uids of the RunStart, RunStop and other single documents taken."""
        self.descriptors: dict[str, SeqSet] = {}
        self.resumed = False


class KafkaSource:
    """One consumer-group member reading Bluesky documents from Kafka in a background thread.

    Args:
        config: the source's config section.
        metrics: where to count.
        router: where documents go (``submit``); also ``call`` (work on its thread), its
            supervisor's ``hand_over`` and ``resume``, its run table's ``live``, its ``listeners``
            and ``checkpointer`` for the commit bookkeeping.
        state_dir: the daemon's ``state.directory`` (checkpoints and finished-run markers), or None.
        max_data_keys: descriptors with more data keys are rejected (``limits.max_data_keys``).
    """

    def __init__(self, config: KafkaSourceConfig, metrics: Metrics, router: Router,
                 state_dir: str | Path | None = None, max_data_keys: int | None = None):
        self.config = config
        self.metrics = metrics
        self.router = router
        self.max_data_keys = max_data_keys
        self.loads = make_deserializer("msgpack")
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rlog = RateLimitedLog(log)
        self._checkpoints = router.checkpointer
        self._done_dir = Path(state_dir) / DONE_DIR if state_dir is not None else None
        # source thread only:
        self._ledgers: dict[str, RunLedger] = {}
        self._descriptor_run: dict[str, str] = {}
        self._open: dict[tuple[str, int], dict[str, int]] = {}
        """(topic, partition) -> {run uid: its lowest offset} for runs not yet finished."""
        self._next: dict[tuple[str, int], int] = {}
        """(topic, partition) -> offset after the last message read."""
        self._committed: dict[tuple[str, int], int] = {}
        self._closed_runs: OrderedDict[str, None] = OrderedDict()
        self._closed_descriptors: OrderedDict[str, str] = OrderedDict()
        self._out: list[Document] = []
        self._last_commit = 0.0
        self._last_lag = 0.0
        self._consumer: Consumer | None = None
        # shared with the router thread:
        self._owned: set[str] = set()
        self._finished: deque[str] = deque()
        self._lock = threading.Lock()
        router.listeners.append(self._on_router)

    @property
    def name(self) -> str:
        return self.config.name

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._done_dir is not None:
            self._done_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._prune_markers()
        from confluent_kafka import Consumer  # optional extra beamlens[kafka]
        self._stop.clear()
        # created here, so that a setting librdkafka refuses fails the daemon's start
        self._consumer = Consumer({**self.consumer_settings(), "logger": log})
        self._thread = threading.Thread(target=self._run, args=(self._consumer,), name=f"beamlens-source-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = HANDOVER_TIMEOUT_S) -> None:
        """Hand over this member's open runs (checkpointed by the router), commit, leave the group."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def consumer_settings(self) -> dict[str, Any]:
        """The librdkafka consumer configuration."""
        c = self.config
        settings: dict[str, Any] = {
            **c.consumer_config,
            "bootstrap.servers": c.bootstrap_servers,
            "group.id": c.group_id,
            "client.id": f"beamlens-{c.name}",
            "enable.auto.commit": False,
            "auto.offset.reset": c.auto_offset_reset,
            "session.timeout.ms": int(c.session_timeout_s * 1000),
            "heartbeat.interval.ms": max(100, int(c.session_timeout_s * 1000 / 5)),
            "fetch.max.bytes": max(c.max_message_bytes, 1_000_000),  # >= librdkafka's message.max.bytes
            "receive.message.max.bytes": max(c.max_message_bytes, 1_000_000) + 2**20,
            "on_commit": self._on_commit,
            "error_cb": self._on_error,
            **c.security.librdkafka(),
        }
        return settings

    def _run(self, consumer: Consumer) -> None:
        consumer.subscribe(self.config.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_lost)
        log.info("source %s joining group %s for topics %s at %s", self.name, self.config.group_id,
                 self.config.topics, self.config.bootstrap_servers)
        try:
            while not self._stop.is_set():
                messages = guarded(f"kafka_poll_{self.name}", self._count_internal, self._rlog,
                                   consumer.consume, MAX_DRAIN, POLL_S) or []
                for message in messages:
                    self._take(message)
                self._emit_all()
                guarded(f"kafka_housekeeping_{self.name}", self._count_internal, self._rlog, self._housekeeping, consumer)
        finally:
            try:
                guarded(f"kafka_release_{self.name}", self._count_internal, self._rlog,
                        self._release, consumer, list(self._open), True)
                consumer.close()
            finally:
                self.connected.clear()
                self.metrics.source_connected.labels(self.name).set(0)
                self.metrics.kafka_partitions.labels(self.name).set(0)

    def _count_internal(self, component: str) -> None:
        self.metrics.internal_errors.labels(component).inc()

    # -- messages ----------------------------------------------------------------------------
    def _take(self, message: Message) -> None:
        """Queue one Kafka message as a new, validated Document for :meth:`_emit_all`; errors, bad
        messages and duplicates are counted instead. Never raises."""
        err = message.error()
        if err is not None:
            self._rlog.log(logging.WARNING, f"kafka:{err.code()}", "source %s: Kafka reports %s", self.name, err)
            return
        where = (message.topic(), message.partition())
        offset = message.offset()
        self._next[where] = offset + 1
        try:
            name, doc = self._decode(message.value())
        except DecodeError as exc:
            self.metrics.bad_messages.labels(self.name, exc.reason).inc()
            self._rlog.log(logging.WARNING, exc.reason, "source %s rejected message %s[%d]@%d (%s): %s", self.name,
                           where[0], where[1], offset, exc.reason, exc)
            return
        try:
            doc = self._deduplicated(name, doc, where, offset)
        except Exception:  # bookkeeping must never lose the source thread
            self._count_internal(f"kafka_ledger_{self.name}")
            self._rlog.log(logging.ERROR, "kafka_ledger", "source %s: bookkeeping failed on a %s", self.name, name,
                           exc_info=True)
        if doc is not None:
            self._out.append(Document(name=name, doc=doc, source=self.name, received=time.time()))

    def _decode(self, value: bytes | None) -> tuple[str, dict[str, Any]]:
        """``msgpack((name, doc))`` -> ``(name, validated doc)``.

        Raises:
            DecodeError: ``oversized``, ``malformed`` (not a 2-list with a name), or any reason of
                :func:`~beamlens.daemon.documents.decode_document`.
        """
        if value is None:
            raise DecodeError("malformed", "message has no value")
        if len(value) > self.config.max_message_bytes:
            raise DecodeError("oversized", f"message of {len(value)} bytes exceeds max_message_bytes")
        pair = deserialize(value, self.loads)
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise DecodeError("malformed", "message value is not a (name, document) pair")
        name, body = pair
        return name, decode_document(name, body, _identity, validate=self.config.validate_documents,
                                     max_data_keys=self.max_data_keys)

    def _run_of(self, name: str, doc: dict[str, Any]) -> str | None:
        if name == "start":
            uid = doc.get("uid")
        elif name in ("event", "event_page"):
            descriptor = doc.get("descriptor")
            uid = (self._descriptor_run.get(descriptor) or self._closed_descriptors.get(descriptor)
                   if isinstance(descriptor, str) else None)
        else:
            uid = doc.get("run_start")
        return uid if isinstance(uid, str) and 0 < len(uid) <= 512 else None

    def _deduplicated(self, name: str, doc: dict[str, Any], where: tuple[str, int], offset: int) -> dict[str, Any] | None:
        """Record ``doc`` in its run's ledger; the document to submit (an EventPage may lose
        events), or None when all of it is held already."""
        uid = self._run_of(name, doc)
        if uid is None:
            return doc  # not attributable to a run (events of an unknown descriptor): the router decides
        if uid in self._closed_runs:
            if name == "descriptor":
                self._forget_descriptor(doc["uid"], uid)
            return self._duplicate(name, doc)
        ledger = self._ledgers.get(uid)
        if ledger is None:
            if self._marked_done(uid):
                self._remember_closed(uid)
                log.info("source %s: run %s was finished by a member of group %s; its documents read again are "
                         "dropped", self.name, uid, self.config.group_id)
                if name == "descriptor":
                    self._forget_descriptor(doc["uid"], uid)
                return self._duplicate(name, doc)
            ledger = self._open_ledger(uid, where, offset)
        if name in ("event", "event_page"):
            return self._new_events(ledger, name, doc)
        if name == "descriptor":
            if doc["uid"] in ledger.descriptors:
                return self._duplicate(name, doc)
            ledger.descriptors[doc["uid"]] = SeqSet()
            self._descriptor_run[doc["uid"]] = uid
            return doc
        key = doc.get("uid")
        if isinstance(key, str):
            if key in ledger.docs:
                return self._duplicate(name, doc)
            ledger.docs.add(key)
        return doc

    def _open_ledger(self, uid: str, where: tuple[str, int], offset: int) -> RunLedger:
        ledger = self._ledgers[uid] = RunLedger(uid, where, offset)
        self._open.setdefault(where, {})[uid] = offset
        with self._lock:
            self._owned.add(uid)
        loaded = self._checkpoints.load(uid, with_arrays=False) if self._checkpoints is not None else None
        if loaded is not None and self._resumed(uid):  # the router resumed the same checkpoint
            state = loaded[1]
            ledger.resumed = True
            ledger.docs.add(uid)  # the RunStart read again is a duplicate
            for descriptor in state.get("descriptors", []):
                ledger.descriptors[descriptor] = SeqSet(int(state.get("max_seq_num", {}).get(descriptor, 0)))
                self._descriptor_run[descriptor] = uid
            log.info("source %s: run %s was checkpointed by a member of group %s; resumed, %d event(s) held",
                     self.name, uid, self.config.group_id, state.get("events_done", 0))
        return ledger

    def _resumed(self, uid: str) -> bool:
        """Have the router resume run ``uid`` from its checkpoint, after everything read before (so
        before this document); True when the router holds the run then. False when it refused the
        checkpoint (consumers configured differently, a damaged file): the run is then analysed
        from what is read again, nothing of it dropped as held."""
        self._emit_all()
        task = self.router.call(lambda: self.router.supervisor.resume(uid) is not None
                                or self.router.table.live(uid) is not None, timeout=HANDOVER_TIMEOUT_S)
        if not task.done.is_set():
            log.error("source %s: the router did not resume run %s within %.0f s; assuming it will", self.name,
                      uid[:64], HANDOVER_TIMEOUT_S)
            return True
        return bool(task.result)

    def _new_events(self, ledger: RunLedger, name: str, doc: dict[str, Any]) -> dict[str, Any] | None:
        seqs = ledger.descriptors.get(doc["descriptor"])
        if seqs is None:
            return doc
        if name == "event":
            return doc if self._take_seq(seqs, doc["seq_num"]) else self._duplicate(name, doc)
        keep = [self._take_seq(seqs, s) for s in doc["seq_num"]]
        if all(keep):
            return doc
        dropped = len(keep) - sum(keep)
        self.metrics.kafka_duplicates.labels(self.name, "event").inc(dropped)
        if not any(keep):
            return None
        return pack_event_page(*(e for e, k in zip(unpack_event_page(doc), keep) if k))

    @staticmethod
    def _take_seq(seqs: SeqSet, seq_num: Any) -> bool:
        if isinstance(seq_num, bool) or not isinstance(seq_num, int):
            return True  # the router rejects it as bad_seq_num
        return seqs.add(seq_num)

    def _duplicate(self, name: str, doc: dict[str, Any]) -> None:
        n = len(doc["seq_num"]) if name == "event_page" and isinstance(doc.get("seq_num"), list) else 1
        self.metrics.kafka_duplicates.labels(self.name, "event" if name == "event_page" else name).inc(n)
        return None

    def _emit_all(self) -> None:
        """Submit what :meth:`_take` queued, in order: consecutive Events packed as EventPages, each
        RunStop followed by a router task that notes it was handled."""
        items, self._out = self._out, []
        count_received(self.metrics, self.name, items)
        for d in coalesce_events(items, MAX_DRAIN):
            self.router.submit(d)
            if d.name == "stop" and isinstance(d.doc.get("run_start"), str):
                uid = d.doc["run_start"]
                self.router.call(lambda uid=uid: self._stop_routed(uid))

    # -- finished runs (router thread) ---------------------------------------------------------
    def _on_router(self, name: str, run: RunState, doc: dict[str, Any]) -> None:
        """Router listener: a run of this source ended (not suspended)."""
        if name == "stop" and run.status != "suspended":
            self._finished_run(run.uid)

    def _stop_routed(self, uid: str) -> None:
        """After the router took a RunStop: if it has no such run open or finishing (the stop was
        rejected, or the run closed at once); a run whose stop the frame path holds, or whose final
        jobs still run, ends later through :meth:`_on_router`."""
        if self.router.table.live(uid) is None:
            self._finished_run(uid)

    def _finished_run(self, uid: str) -> None:
        with self._lock:
            if uid not in self._owned:
                return
            self._owned.discard(uid)
        self._mark_done(uid)
        self._finished.append(uid)

    def _mark_done(self, uid: str) -> None:
        if self._done_dir is None:
            return
        try:
            inside(self._done_dir, safe_stem(uid)).touch()
        except OSError:
            self._rlog.log(logging.ERROR, "kafka_done", "source %s: finished-run marker of %s not written", self.name,
                           uid[:64], exc_info=True)

    def _marked_done(self, uid: str) -> bool:
        return self._done_dir is not None and inside(self._done_dir, safe_stem(uid)).exists()

    def _prune_markers(self) -> None:
        old = time.time() - DONE_TTL_S
        for path in self._done_dir.iterdir():
            try:
                if path.stat().st_mtime < old:
                    path.unlink()
            except OSError:
                pass

    def _remember_closed(self, uid: str) -> None:
        self._closed_runs[uid] = None
        while len(self._closed_runs) > MAX_CLOSED:
            self._closed_runs.popitem(last=False)

    def _forget_descriptor(self, descriptor: str, uid: str) -> None:
        """Remember ``descriptor`` as one of finished run ``uid`` (its events read again are duplicates)."""
        self._descriptor_run.pop(descriptor, None)
        self._closed_descriptors[descriptor] = uid
        while len(self._closed_descriptors) > 4 * MAX_CLOSED:
            self._closed_descriptors.popitem(last=False)

    def _drain_finished(self) -> None:
        while self._finished:
            uid = self._finished.popleft()
            ledger = self._ledgers.pop(uid, None)
            self._remember_closed(uid)
            if ledger is None:
                continue
            self._open.get(ledger.partition, {}).pop(uid, None)
            for descriptor in ledger.descriptors:
                self._forget_descriptor(descriptor, uid)

    # -- commits, lag, rebalances (source thread) ---------------------------------------------
    def commit_positions(self, partitions: list[tuple[str, int]] | None = None) -> dict[tuple[str, int], int]:
        """The offset that may be committed per partition: the lowest offset of a run still open
        there, else the offset after the last message read."""
        out = {}
        for where in partitions if partitions is not None else list(self._next):
            if where not in self._next:
                continue
            open_runs = self._open.get(where)
            out[where] = min(open_runs.values()) if open_runs else self._next[where]
        return out

    def _commit(self, consumer: Consumer, partitions: list[tuple[str, int]] | None = None, sync: bool = False) -> None:
        from confluent_kafka import KafkaException, TopicPartition
        todo = {w: o for w, o in self.commit_positions(partitions).items() if self._committed.get(w) != o}
        if not todo:
            return
        try:
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in todo.items()], asynchronous=not sync)
            self._committed.update(todo)
            if sync:
                self.metrics.kafka_commits.labels(self.name, "ok").inc()
        except KafkaException as exc:
            self.metrics.kafka_commits.labels(self.name, "failed").inc()
            self._rlog.log(logging.WARNING, "kafka_commit", "source %s: commit failed: %s", self.name, exc)

    def _on_commit(self, err: Any, partitions: list[TopicPartition]) -> None:
        if err is not None:
            self.metrics.kafka_commits.labels(self.name, "failed").inc()
            self._rlog.log(logging.WARNING, "kafka_commit", "source %s: commit failed: %s", self.name, err)
            for tp in partitions:
                self._committed.pop((tp.topic, tp.partition), None)  # try again
        else:
            self.metrics.kafka_commits.labels(self.name, "ok").inc()

    def _on_error(self, err: Any) -> None:
        self._rlog.log(logging.WARNING, f"kafka_error:{err.code()}", "source %s: Kafka client error: %s", self.name, err)

    def _housekeeping(self, consumer: Consumer) -> None:
        self._drain_finished()
        now = time.monotonic()
        if now - self._last_commit >= self.config.commit_interval_s:
            self._last_commit = now
            self._commit(consumer)
        if now - self._last_lag >= LAG_INTERVAL_S:
            self._last_lag = now
            self._update_lag(consumer)

    def _update_lag(self, consumer: Consumer) -> None:
        from confluent_kafka import TopicPartition
        assigned = list(self._next.keys() | self._open.keys())
        if not assigned:
            return
        positions = consumer.position([TopicPartition(t, p) for t, p in assigned])
        for tp in positions:
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0 and tp.offset >= 0:
                self.metrics.kafka_consumer_lag.labels(self.name, tp.topic, str(tp.partition)).set(max(0, high - tp.offset))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.metrics.kafka_rebalances.labels(self.name, "assign").inc()
        for tp in partitions:
            self._open.setdefault((tp.topic, tp.partition), {})
        self.metrics.kafka_partitions.labels(self.name).set(len(self._open))
        self.connected.set()
        self.metrics.source_connected.labels(self.name).set(1)
        log.info("source %s assigned %s", self.name, sorted((tp.topic, tp.partition) for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.metrics.kafka_rebalances.labels(self.name, "revoke").inc()
        self._release(consumer, [(tp.topic, tp.partition) for tp in partitions], commit=True)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.metrics.kafka_rebalances.labels(self.name, "lost").inc()
        log.warning("source %s lost partitions %s (session timed out?); their runs are handed over without commit",
                    self.name, [(tp.topic, tp.partition) for tp in partitions])
        self._release(consumer, [(tp.topic, tp.partition) for tp in partitions], commit=False)

    def _release(self, consumer: Consumer, partitions: list[tuple[str, int]], commit: bool) -> None:
        """Give up ``partitions``: the router checkpoints and suspends their open runs (after
        everything submitted before), offsets are committed, their runs are forgotten here."""
        gone = set(partitions)
        uids = [uid for where in gone for uid in self._open.get(where, {})]
        if uids:
            task = self.router.call(lambda: self.router.supervisor.hand_over(uids), timeout=HANDOVER_TIMEOUT_S)
            if not task.done.is_set():
                log.error("source %s: the router did not hand over %d run(s) within %.0f s", self.name, len(uids),
                          HANDOVER_TIMEOUT_S)
            else:
                log.info("source %s handed over %d open run(s) of %d partition(s)", self.name, len(task.result or ()),
                         len(gone))
        self._drain_finished()
        if commit:
            self._commit(consumer, [w for w in gone], sync=True)
        for uid in uids:
            ledger = self._ledgers.pop(uid, None)
            with self._lock:
                self._owned.discard(uid)
            for descriptor in (ledger.descriptors if ledger is not None else ()):
                self._descriptor_run.pop(descriptor, None)
        for where in gone:
            self._open.pop(where, None)
            self._next.pop(where, None)
            self._committed.pop(where, None)
            try:
                self.metrics.kafka_consumer_lag.remove(self.name, where[0], str(where[1]))
            except KeyError:
                pass
        self.metrics.kafka_partitions.labels(self.name).set(len(self._open))
