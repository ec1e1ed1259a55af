"""Tests for monitor.profilestore: the Parquet profile cache (partitioned lookups, safe concurrent
writes, compaction) and the Parquet fit set a streamed fit reads partition by partition."""

from __future__ import annotations

import hashlib
import multiprocessing
from pathlib import Path

import numpy as np

from monitor.profilestore import PREFIX_CHARS, ParquetFitSet, ParquetProfileStore

SPEC = {"spec_version": 1, "feature_names": ["a", "b", "c"]}


def _rows(n: int, start: int = 0) -> list[tuple[str, np.ndarray, dict]]:
    out = []
    for i in range(start, start + n):
        sha = hashlib.sha256(str(i).encode()).hexdigest()
        out.append((sha, np.array([i, i / 3, -i], dtype=np.float64), {"format": "png", "rows": i}))
    return out


def test_lookup_returns_what_was_written_and_only_that(tmp_path: Path) -> None:
    store = ParquetProfileStore.in_cache_dir(tmp_path, SPEC)
    rows = _rows(50)
    store.write(rows)
    asked = [r[0] for r in rows[:5]] + ["f" * 64]
    found = store.lookup(asked)
    assert set(found) == {r[0] for r in rows[:5]}
    for sha, features, meta in rows[:5]:
        np.testing.assert_array_equal(found[sha][0], features)
        assert found[sha][1] == meta
    # Another spec never sees these rows.
    assert ParquetProfileStore.in_cache_dir(tmp_path, {**SPEC, "spec_version": 2}).lookup(asked) == {}


def test_a_lookup_reads_only_the_partitions_of_the_asked_digests(tmp_path: Path) -> None:
    store = ParquetProfileStore.in_cache_dir(tmp_path, SPEC)
    store.compact_at = 10**9  # keep every write's files: many files per partition
    rows = _rows(800)
    for i in range(0, 800, 100):
        store.write(rows[i : i + 100])
    files = store.part_files()
    assert len(files) > 500  # 8 writes x ~80 partitions touched each
    sha = rows[7][0]
    in_partition = [f for f in files if f"/prefix={sha[:PREFIX_CHARS]}/" in f]
    store.files_read = 0
    assert sha in store.lookup([sha])
    assert store.files_read == len(in_partition) <= 8 < len(files) / 50
    # Compaction leaves one file per partition, and the same answers.
    assert store.compact() == len(files) - len({f.rsplit("/", 2)[1] for f in files})
    store.files_read = 0
    found = store.lookup(r[0] for r in rows)
    assert len(found) == 800 and store.files_read == len(store.part_files())
    np.testing.assert_array_equal(found[sha][0], rows[7][1])


def test_writes_compact_a_partition_when_it_holds_too_many_files(tmp_path: Path) -> None:
    store = ParquetProfileStore.in_cache_dir(tmp_path, SPEC)
    store.compact_at = 4
    rows = [r for r in _rows(3000) if r[0].startswith("ab")][:10]
    for row in rows:
        store.write([row])
    store.write([rows[0]])  # a duplicate, as two workers profiling the same file would write
    files = store.part_files()
    assert 1 <= len(files) < 4
    table = store.read_all()
    assert sorted(table.column("sha256").to_pylist()) == sorted(r[0] for r in rows)


def test_buffered_rows_are_written_by_flush(tmp_path: Path) -> None:
    store = ParquetProfileStore.in_cache_dir(tmp_path, SPEC)
    store.buffer_rows = 3
    rows = _rows(5)
    for sha, features, meta in rows:
        store.add(sha, features, meta)
    assert len(store.lookup(r[0] for r in rows)) == 3  # one full buffer written
    store.flush()
    assert len(store.lookup(r[0] for r in rows)) == 5


def _writer(root: str, start: int) -> None:
    store = ParquetProfileStore.in_cache_dir(root, SPEC)
    store.compact_at = 3  # compaction races the other writer too
    for i in range(start, start + 40, 4):
        store.write(_rows(4, i))


def test_concurrent_writers_in_processes_lose_nothing(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_writer, args=(str(tmp_path), s)) for s in (0, 1000)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = ParquetProfileStore.in_cache_dir(tmp_path, SPEC)
    expected = [r[0] for s in (0, 1000) for r in _rows(40, s)]
    assert set(store.lookup(expected)) == set(expected)
    assert not list(tmp_path.rglob(".*.tmp"))


def test_fit_set_round_trip_in_partitions(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(23, 4))
    writer = ParquetFitSet.writer(tmp_path / "fit", 4, partition_rows=10)
    for i in range(23):
        writer.append(X[i], i % 2, {"image": f"i{i}.png", "site": "x"}, label=i % 3 % 2, score=i / 23)
    fit_set = writer.close()
    assert fit_set.n_rows == 23 and fit_set.partitions() == [0, 1, 2]
    part = fit_set.read(1)
    np.testing.assert_array_equal(part.rows, np.arange(10, 20))
    np.testing.assert_array_equal(part.profiles, X[10:20])
    assert part.records[0] == {"image": "i10.png", "site": "x"}
    rows = np.array([0, 9, 10, 22])
    taken = fit_set.take(rows)
    np.testing.assert_array_equal(taken.profiles, X[rows])
    np.testing.assert_array_equal(taken.failures, rows % 2)
    np.testing.assert_array_equal(taken.scores, rows / 23)
    assert [r["image"] for r in taken.records] == ["i0.png", "i9.png", "i10.png", "i22.png"]
    ParquetFitSet.remove_root(tmp_path / "fit")
    assert not (tmp_path / "fit").exists()


def test_fit_set_without_labels_has_none(tmp_path: Path) -> None:
    writer = ParquetFitSet.writer(tmp_path / "fit", 2)
    writer.append(np.zeros(2), 1, {"image": "a.png"})
    part = writer.close().read(0)
    assert part.labels is None and part.scores is None and part.failures.tolist() == [1]


def test_an_empty_fit_set(tmp_path: Path) -> None:
    fit_set = ParquetFitSet.writer(tmp_path / "fit", 2).close()
    assert fit_set.n_rows == 0 and fit_set.partitions() == []
