"""The SQLite trend store: round trip, idempotent re-delivery, schema versioning, and a writer killed
with SIGKILL mid-write whose series a restarted writer continues."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from beamlens.consumers.trend_store import SCHEMA_VERSION, TrendStore, TrendStoreError, check_series_key
from helpers import wait_for


def test_round_trip_grouped_by_run_and_idempotent(tmp_path):
    with TrendStore(tmp_path / "state" / "trends.sqlite") as store:
        assert store.add("primary/capacity", "run-a", [1, 2, 3], [0.0, 160.0, 320.0], [1.0, 0.97, 0.95], timestamp=10.0) == 3
        assert store.add("primary/capacity", "run-b", [1, 2], [0.0, 160.0], [1.0, np.nan], timestamp=20.0) == 1
        # the same point delivered again (a resumed run) is stored once
        assert store.add("primary/capacity", "run-a", [3], [320.0], [0.95], timestamp=11.0) == 0
        store.add("features/void_fraction", "run-a", [1], [5.0], [0.1])
        assert store.series_keys() == ["features/void_fraction", "primary/capacity"]
        runs = store.runs("primary/capacity")
        assert [r.run_uid for r in runs] == ["run-a", "run-b"]
        np.testing.assert_array_equal(runs[0].x, [0.0, 160.0, 320.0])
        np.testing.assert_array_equal(runs[0].value, [1.0, 0.97, 0.95])
        assert [r.run_uid for r in store.runs("primary/capacity", exclude_run="run-a")] == ["run-b"]
        seq, x, v = store.points("primary/capacity", "run-a")
        assert list(seq) == [1, 2, 3] and store.count("primary/capacity") == 4
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ValueError, match="invalid series key"):
        check_series_key("bad key; DROP TABLE")
    with TrendStore(tmp_path / "state" / "trends.sqlite") as store, pytest.raises(ValueError, match="one length"):
        store.add("a", "run", [1, 2], [1.0], [1.0])


def test_threads_opening_a_new_store_at_once_all_get_it(tmp_path):
    """The daemon's metric sampler and the trends consumer open the same new file at the same
    moment: switching it to WAL answers "database is locked" to one of them at once (no busy
    handler), which the store retries instead of refusing the file."""
    for attempt in range(20):
        path, errors, start = tmp_path / f"t{attempt}.sqlite", [], threading.Barrier(4)

        def open_and_add(i, path=path, errors=errors, start=start):
            start.wait()
            try:
                with TrendStore(path) as store:
                    store.add("metric/m", f"run-{i}", [1], [0.0], [float(i)])
            except Exception as exc:  # collected: a thread's exception would not fail the test
                errors.append(exc)

        threads = [threading.Thread(target=open_and_add, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with TrendStore(path) as store:
            assert store.count("metric/m") == 4


def test_newer_schema_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "trends.sqlite"
    TrendStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(TrendStoreError, match="newer"):
        TrendStore(path)
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE stuff (a)")
    db.commit()
    db.close()
    with pytest.raises(TrendStoreError, match="not a beamlens trend store"):
        TrendStore(other)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(TrendStoreError):
        TrendStore(garbage)


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from beamlens.consumers.trend_store import TrendStore
    store = TrendStore(sys.argv[1])
    seq, x, _ = store.points("primary/capacity", "cell-1")
    n = int(seq[-1]) if len(seq) else 0        # continue the series after the last committed point
    stop = int(sys.argv[2])
    while n < stop:
        n += 1
        # several points per transaction, so a kill can land inside a multi-row write
        k = np.arange(n, n + 5)
        store.add("primary/capacity", "cell-1", k, k * 10.0, 1.0 - k * 1e-4)
        n += 4
        print(n, flush=True)
""")


def test_writer_killed_with_sigkill_mid_write_then_continued(tmp_path):
    path = tmp_path / "trends.sqlite"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ, PYTHONWARNINGS="error")
    proc = subprocess.Popen([sys.executable, str(script), str(path), "100000000"], stdout=subprocess.DEVNULL, env=env)
    try:
        reader = None

        def enough() -> bool:
            nonlocal reader
            if not path.exists():
                return False
            reader = reader or TrendStore(path)
            return reader.count("primary/capacity") >= 500
        wait_for(enough, timeout=60)
        proc.send_signal(signal.SIGKILL)  # mid-write: the writer commits continuously
        assert proc.wait(timeout=30) == -signal.SIGKILL
        reader.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with TrendStore(path) as store:
        assert store.integrity_ok()
        seq, x, v = store.points("primary/capacity", "cell-1")
        n_killed = len(seq)
        assert n_killed >= 500 and n_killed % 5 == 0  # whole transactions only
        np.testing.assert_array_equal(seq, np.arange(1, n_killed + 1))
        np.testing.assert_allclose(x, seq * 10.0)
        np.testing.assert_allclose(v, 1.0 - seq * 1e-4)
    # a restarted writer continues the series where the committed data end
    done = subprocess.run([sys.executable, str(script), str(path), str(n_killed + 50)], env=env, capture_output=True,
                          timeout=120, check=True)
    assert done.stdout
    with TrendStore(path) as store:
        seq, x, v = store.points("primary/capacity", "cell-1")
        np.testing.assert_array_equal(seq, np.arange(1, n_killed + 51))
        np.testing.assert_allclose(x, seq * 10.0)
        assert store.integrity_ok()
