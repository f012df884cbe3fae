"""The trend store: figures trended across runs and daemon restarts, in one SQLite file.

One row per point: ``(series, x, value, run_uid, seq, timestamp)`` — the series key as declared in
the config (``primary/capacity``, ``features/mean_particle_area``, a daemon metric
``metric/beamlens_reconstruction_error_ratio{consumer="unmixing"}``: :func:`parse_metric_key`), the
x of the point in the series' units (cycle number, time, run index), its value, the RunStart uid of
the run it came from (for metric samples ``metrics:<id of the daemon's start>``), its sequence
number within that run (the event's ``seq_num``, the frame number + 1, the sample number), and the
Unix time it was stored. ``(series, run_uid, seq)`` is unique, so a point delivered twice (a run resumed
from a checkpoint) is stored once.

SQLite (the standard library's :mod:`sqlite3`) in WAL mode with ``synchronous=FULL``: each
:meth:`TrendStore.add` is one transaction, so a process killed at any moment (``kill -9``) leaves
every committed point and no partial one (SQLite's atomic commit, https://sqlite.org/atomiccommit.html;
WAL: https://sqlite.org/wal.html). The schema is versioned (table ``meta``, ``schema_version``); a
file written by a newer beamlens is refused with a clear message, never half-read.

Layering: standard library and numpy only. It lives beside the consumers that write it (the
``trends`` consumer, the ``features`` consumer's forecasts), which may not import the daemon.
"""
from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SERIES_KEY = re.compile(r"^[A-Za-z0-9_.:/-]{1,200}$")
METRIC_PREFIX = "metric/"
"""Series keys with this prefix name a sample of the daemon's Prometheus registry (:func:`parse_metric_key`)."""
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="[^"\\\x00-\x1f]{0,100}"'
METRIC_KEY = re.compile(rf'^metric/(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{{(?P<labels>(?:{_LABEL})(?:,{_LABEL})*)?\}})?$')
_LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"')
MAX_KEY = 200
MAX_RUN_UID = 200
#: Points returned by one query at most (newest kept): bounds what a hostile or runaway series can
#: make a reader allocate.
MAX_POINTS = 1_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS points (
    id INTEGER PRIMARY KEY,
    series TEXT NOT NULL,
    x REAL NOT NULL,
    value REAL NOT NULL,
    run_uid TEXT NOT NULL,
    seq INTEGER NOT NULL,
    timestamp REAL NOT NULL,
    UNIQUE (series, run_uid, seq)
);
CREATE INDEX IF NOT EXISTS points_series ON points (series, run_uid, x);
CREATE INDEX IF NOT EXISTS points_series_id ON points (series, id);
"""


STORE_FILE = "trends.sqlite"
"""The trend store's file name under the daemon's state directory (the default store)."""


def default_store(store: Path | bool | None, context: object) -> Path | None:
    """The trend-store file a consumer's ``store`` parameter names.

    Args:
        store: a path; ``False``: no store; ``None``: the default, ``<state.directory>/trends.sqlite``
            when the daemon has a state directory.
        context: the pydantic validation context the daemon passes when it validates consumer
            params (``{"state_directory": Path | None}``); None when the params are built alone
            (tests, benchmarks): then ``None`` means no store.

    Returns:
        The file, or None for no store (also ``None`` with a daemon without a state directory;
        callers that need one raise then, see :func:`beamlens.consumers.trends.TrendsParams`).
    """
    if store is False:
        return None
    if store is not None and store is not True:
        return Path(store)
    state = context.get("state_directory") if isinstance(context, dict) else None
    return Path(state) / STORE_FILE if state is not None else None


class TrendStoreError(RuntimeError):
    """The store file cannot be used (newer schema, not a beamlens trend store, corrupt)."""


@dataclass(frozen=True)
class RunSeries:
    """The points of one series from one run: ``x``, ``value`` float64 ``(n,)`` ordered by x then
    seq; ``first_timestamp`` (Unix s) orders runs."""

    run_uid: str
    x: np.ndarray
    value: np.ndarray
    first_timestamp: float


def check_series_key(key: str) -> str:
    """Return ``key`` if it is a valid series key: ``[A-Za-z0-9_.:/-]``, 1–200 characters, or a
    metric key (:func:`parse_metric_key`, at most 200 characters too).

    Raises:
        ValueError: otherwise.
    """
    if isinstance(key, str) and key.startswith(METRIC_PREFIX):
        parse_metric_key(key)
        return key
    if not isinstance(key, str) or not SERIES_KEY.match(key):
        raise ValueError(f"invalid series key {key!r} (letters, digits, _.:/- ; 1-200 characters)")
    return key


def parse_metric_key(key: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Split a metric series key ``metric/<sample name>`` or ``metric/<sample name>{l1="v1",...}``
    into the Prometheus sample name and the label matcher (equality only, as in PromQL's
    ``name{label="value"}``; Prometheus exposition names: https://prometheus.io/docs/concepts/data_model/).

    The sample name is the one ``/metrics`` shows: a counter with its ``_total``. Label values are
    at most 100 characters without ``"``, ``\\`` or control characters; the key at most 200.

    Returns:
        ``(name, ((label, value), ...))`` in the key's order.

    Raises:
        ValueError: not such a key, or too long.
    """
    m = METRIC_KEY.match(key) if isinstance(key, str) and len(key) <= MAX_KEY else None
    if m is None:
        raise ValueError(f"invalid metric series key {key!r}: 'metric/<metric name>' optionally with a label matcher "
                         "{label=\"value\",...} (at most 200 characters)")
    pairs = tuple(_LABEL_PAIR.findall(m.group("labels") or ""))
    names = [k for k, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"metric series key {key!r}: a label is matched twice")
    return m.group("name"), pairs


class TrendStore:
    """One SQLite trend-store file, safe to share between threads of one process and between
    processes (SQLite's locking; writers wait up to ``timeout_s``).

    Args:
        path: the database file (created with its folder; e.g. ``<state.directory>/trends.sqlite``).
        timeout_s: how long a write waits for another writer's lock.

    Raises:
        TrendStoreError: the file has a newer schema version, or is not a trend store.
    """

    def __init__(self, path: Path | str, timeout_s: float = 10.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        deadline, pause = time.monotonic() + timeout_s, 0.005
        while True:
            try:
                self._open(timeout_s)
                return
            except sqlite3.OperationalError as exc:
                # Switching a new file to WAL takes an exclusive lock and SQLite answers "database
                # is locked" at once, without its busy handler, when another connection (the
                # metric sampler's thread, another process) opens the same new file at that moment
                # (https://sqlite.org/wal.html#sometimes_queries_return_sqlite_busy_in_wal_mode):
                # retry the open until timeout_s.
                self._discard()
                if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() + pause > deadline:
                    raise TrendStoreError(f"{self.path}: not a usable trend store ({exc})") from exc
                time.sleep(pause)
                pause = min(2 * pause, 0.2)
            except sqlite3.DatabaseError as exc:
                self._discard()
                raise TrendStoreError(f"{self.path}: not a usable trend store ({exc})") from exc

    def _discard(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _open(self, timeout_s: float) -> None:
        self._db = sqlite3.connect(self.path, timeout=timeout_s, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if tables and "meta" not in tables:
                    raise TrendStoreError(f"{self.path}: not a beamlens trend store (tables {sorted(tables)})")
                if "meta" in tables:
                    row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                    version = int(row[0]) if row else 0
                    if version > SCHEMA_VERSION:
                        raise TrendStoreError(f"{self.path}: trend store schema version {version} is newer than this "
                                              f"beamlens reads ({SCHEMA_VERSION}); refusing to use it")
                for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                    self._db.execute(stmt)
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> TrendStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------
    def add(self, series: str, run_uid: str, seq: np.ndarray | list[int], x: np.ndarray | list[float],
            value: np.ndarray | list[float], timestamp: float | None = None) -> int:
        """Store points of one series from one run, in one transaction.

        Args:
            series: series key (:func:`check_series_key`).
            run_uid: RunStart uid (at most 200 characters).
            seq: int ``(n,)`` sequence numbers within the run (event ``seq_num``).
            x, value: float ``(n,)``; pairs with a non-finite x or value are not stored.
            timestamp: Unix time of the points, s (default now).

        Returns:
            Points newly stored (re-delivered ``(series, run_uid, seq)`` are ignored).

        Raises:
            ValueError: bad key or uid, or arrays of different lengths.
        """
        check_series_key(series)
        if not isinstance(run_uid, str) or not 0 < len(run_uid) <= MAX_RUN_UID:
            raise ValueError(f"invalid run uid {run_uid!r}")
        seq, x, value = (np.atleast_1d(np.asarray(a)) for a in (seq, x, value))
        if not (seq.shape == x.shape == value.shape) or seq.ndim != 1:
            raise ValueError(f"seq, x and value must be 1-D of one length (got {seq.shape}, {x.shape}, {value.shape})")
        ok = np.isfinite(x.astype(np.float64)) & np.isfinite(value.astype(np.float64))
        ts = time.time() if timestamp is None else float(timestamp)
        rows = [(series, float(a), float(v), run_uid, int(s), ts) for s, a, v in zip(seq[ok], x[ok], value[ok])]
        if not rows:
            return 0
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR IGNORE INTO points (series, x, value, run_uid, seq, timestamp) "
                                     "VALUES (?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._db.total_changes - before

    # -- reading -------------------------------------------------------------------------------
    def series_keys(self) -> list[str]:
        """Every series key stored, sorted."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT series FROM points ORDER BY series")]

    def runs(self, series: str, exclude_run: str | None = None, limit: int = MAX_POINTS) -> list[RunSeries]:
        """The series' points grouped by run, runs in order of their first stored point, at most
        ``limit`` points in all (the newest runs kept); ``exclude_run`` left out (the run being
        forecast)."""
        check_series_key(series)
        limit = max(0, min(int(limit), MAX_POINTS))
        with self._lock:
            rows = self._db.execute(
                "SELECT run_uid, x, value, timestamp FROM (SELECT run_uid, x, value, seq, timestamp, id FROM points "
                "WHERE series = ? AND run_uid != ? ORDER BY id DESC LIMIT ?) ORDER BY id",
                (series, exclude_run if exclude_run is not None else "", limit)).fetchall()
        groups: dict[str, list[tuple[float, float, float]]] = {}
        for uid, x, v, ts in rows:
            groups.setdefault(uid, []).append((x, v, ts))
        out = []
        for uid, pts in groups.items():
            a = np.array(pts, dtype=np.float64)
            o = np.argsort(a[:, 0], kind="stable")
            out.append(RunSeries(uid, a[o, 0], a[o, 1], float(a[:, 2].min())))
        out.sort(key=lambda r: r.first_timestamp)
        return out

    def new_points(self, series: str, after_id: int = 0) -> tuple[int, int]:
        """``(newest row id, rows with id > after_id)`` of ``series`` (``(after_id, 0)`` when none):
        a cheap check (index ``(series, id)``) for points added since a reader last looked."""
        check_series_key(series)
        with self._lock:
            last, n = self._db.execute("SELECT MAX(id), COUNT(*) FROM points WHERE series = ? AND id > ?",
                                       (series, int(after_id))).fetchone()
        return (int(last), int(n)) if n else (int(after_id), 0)

    def points(self, series: str, run_uid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(seq int64, x float64, value float64)`` of one run's points of ``series``, by seq."""
        check_series_key(series)
        with self._lock:
            rows = self._db.execute("SELECT seq, x, value FROM points WHERE series = ? AND run_uid = ? ORDER BY seq "
                                    "LIMIT ?", (series, run_uid, MAX_POINTS)).fetchall()
        if not rows:
            return np.empty(0, np.int64), np.empty(0), np.empty(0)
        seq, x, v = zip(*rows)
        return np.asarray(seq, np.int64), np.asarray(x, np.float64), np.asarray(v, np.float64)

    def count(self, series: str | None = None) -> int:
        """Points stored (of one series, or all)."""
        with self._lock:
            if series is None:
                return int(self._db.execute("SELECT COUNT(*) FROM points").fetchone()[0])
            return int(self._db.execute("SELECT COUNT(*) FROM points WHERE series = ?", (series,)).fetchone()[0])

    def integrity_ok(self) -> bool:
        """SQLite's ``PRAGMA integrity_check`` says ``ok``."""
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
