"""Tests for monitor.store: the SQLite outcome store on its own (no server)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from monitor.errors import StoreError
from monitor.store import OutcomeStore, StoredPrediction, read_labelled

NAMES = ("a", "b", "c")


def _p(
    rid: str, t: float, cluster: int = 0, model: str = "m1", profile: tuple = (1.0, 2.0, 3.0)
) -> StoredPrediction:
    return StoredPrediction(rid, t, model, cluster, 0.25, 0.2, 0.5, None, np.array(profile))


@pytest.fixture()
def store(tmp_path: Path):
    s = OutcomeStore(tmp_path / "sub" / "o.sqlite")
    s.register_model("m1", NAMES, 2)
    yield s
    s.close()


def test_outcome_committed_tallied_and_persisted(store: OutcomeStore, tmp_path: Path) -> None:
    for i in range(5):
        store.add_prediction(_p(f"r{i}", 100.0 + i, cluster=i % 2))
    store.record_outcome("r0", True)
    store.record_outcome("r1", False)
    store.record_outcome("r2", True)
    assert store.tallies("m1", 2) == [(2, 2, pytest.approx(0.4)), (1, 0, pytest.approx(0.2))]
    with pytest.raises(KeyError):
        store.record_outcome("r0", False)
    with pytest.raises(StoreError, match=r"request id 'nope' is not stored"):
        store.record_outcome("nope", True)
    store.close()
    # A second process would see the same thing: read the file directly.
    con = sqlite3.connect(tmp_path / "sub" / "o.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = con.execute("SELECT request_id, failure FROM predictions ORDER BY request_id").fetchall()
    assert rows == [("r0", 1), ("r1", 0), ("r2", 1), ("r3", None), ("r4", None)]
    con.close()
    again = OutcomeStore(tmp_path / "sub" / "o.sqlite")
    try:
        recent = again.recent("m1", 3)
        assert [p.request_id for p in recent] == ["r2", "r3", "r4"]  # newest 3, oldest first
        assert [p.failure for p in recent] == [True, None, None]
        assert again.tallies("m1", 2)[0][:2] == (2, 2)
        assert again.tallies("other", 2) == [(0, 0, 0.0), (0, 0, 0.0)]
    finally:
        again.close()


def test_rescoring_an_id_keeps_a_reported_outcome(store: OutcomeStore, tmp_path: Path) -> None:
    store.add_prediction(_p("x", 1.0, cluster=0))
    store.add_prediction(_p("y", 1.0, cluster=0))
    store.record_outcome("x", True)
    store.add_prediction(_p("x", 2.0, cluster=1))  # the reported row stays as reported
    store.add_prediction(_p("y", 2.0, cluster=1))  # an unreported row is replaced
    store.flush()
    got = {p.request_id: (p.cluster, p.failure) for p in store.recent("m1", 10)}
    assert got == {"x": (0, True), "y": (1, None)}


def test_retention_by_age_and_by_rows(tmp_path: Path) -> None:
    now = [1000.0]
    s = OutcomeStore(tmp_path / "o.sqlite", max_age_seconds=100.0, max_rows=3, clock=lambda: now[0])
    try:
        s.register_model("m1", NAMES, 2)
        for i, t in enumerate((850.0, 880.0, 950.0, 960.0, 970.0, 980.0)):
            s.add_prediction(_p(f"r{i}", t))
        s.record_outcome("r5", True)
        assert s.prune() == 3  # r0, r1 older than 100 s; then r2 beyond 3 rows
        assert [p.request_id for p in s.recent("m1", 10)] == ["r3", "r4", "r5"]
        now[0] = 1075.0
        assert s.prune() == 2
        assert [p.request_id for p in s.recent("m1", 10)] == ["r5"]
        assert s.stats()["pruned"] == 5
        assert s.tallies("m1", 2)[0][:2] == (1, 1)  # tallies outlive pruned rows
    finally:
        s.close()


def test_read_labelled_pools_models_with_the_same_features(tmp_path: Path) -> None:
    s = OutcomeStore(tmp_path / "o.sqlite")
    try:
        s.register_model("m1", NAMES, 2)
        s.register_model("m2", NAMES, 3)
        s.register_model("other-spec", ("a", "b"), 2)
        s.add_prediction(_p("r1", 1.0, model="m1", profile=(1.0, 2.0, 3.0)))
        s.add_prediction(_p("r2", 2.0, model="m2", profile=(4.0, 5.0, 6.0)))
        s.add_prediction(_p("r3", 3.0, model="other-spec", profile=(7.0, 8.0)))
        s.add_prediction(_p("r4", 4.0, model="m1"))  # no outcome
        for rid, f in (("r1", True), ("r2", False), ("r3", True)):
            s.record_outcome(rid, f)
    finally:
        s.close()
    data = read_labelled(tmp_path / "o.sqlite", NAMES)
    np.testing.assert_array_equal(data.profiles, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert data.failures.tolist() == [1, 0] and data.model_ids == ["m1", "m2"]
    assert (data.first_time, data.last_time) == (1.0, 2.0)


def test_bad_files_are_clear_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match=r"junk.sqlite: cannot open .*is it an SQLite file"):
        OutcomeStore(junk)
    with pytest.raises(StoreError, match=r"missing.sqlite: no such file"):
        read_labelled(tmp_path / "missing.sqlite", NAMES)
    s = OutcomeStore(tmp_path / "v.sqlite")
    s.close()
    con = sqlite3.connect(tmp_path / "v.sqlite")
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match=r"schema version 99, this server reads 1"):
        OutcomeStore(tmp_path / "v.sqlite")


def test_a_failed_write_is_reported_to_the_waiting_caller(tmp_path: Path) -> None:
    s = OutcomeStore(tmp_path / "o.sqlite", busy_timeout=0.05)
    try:
        s.register_model("m1", NAMES, 2)
        s.add_prediction(_p("r1", 1.0))
        s.flush()
        # Another writer holds the database lock past the busy timeout: the commit fails.
        blocker = sqlite3.connect(tmp_path / "o.sqlite", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match=r"write failed \(database is locked\)"):
            s.record_outcome("r1", True)
        blocker.rollback()
        blocker.close()
        assert s.stats()["errors"] == 1
        s.record_outcome("r1", True)  # the writer goes on once the disk is usable again
        assert s.tallies("m1", 2)[0][:2] == (1, 1)
    finally:
        s.close()


def test_an_unusable_store_path_stops_serve_with_a_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port",
         "-1", "--store", str(blocker / "outcomes.sqlite")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert out.returncode == 3
    assert f"error: outcome store {blocker / 'outcomes.sqlite'}: cannot create" in out.stderr


def test_the_writer_prunes_on_its_own_every_interval(tmp_path: Path) -> None:
    now = [1000.0]
    s = OutcomeStore(tmp_path / "o.sqlite", max_age_seconds=100.0, prune_interval=0.05, clock=lambda: now[0])
    try:
        s.register_model("m1", NAMES, 2)
        s.add_prediction(_p("old", 950.0))
        s.add_prediction(_p("new", 990.0))
        s.flush()
        now[0] = 1080.0  # "old" is now 130 s old; nobody calls prune()
        deadline = time.monotonic() + 30
        while s.stats()["pruned"] == 0:
            assert time.monotonic() < deadline, "the writer never pruned"
            time.sleep(0.02)
        assert [p.request_id for p in s.recent("m1", 10)] == ["new"]
    finally:
        s.close()
