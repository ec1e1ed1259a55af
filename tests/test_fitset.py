"""Tests for the streamed fit (monitor.fitset, ReliabilityModel.fit_streamed): a fit set read
partition by partition gives the in-memory result, and the client holds only the sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_model import THRESHOLD, synthetic_fit_data

from monitor.clustering import SpectralClusterer
from monitor.drift import ReferenceRanks
from monitor.errors import InvalidInputError
from monitor.fitset import ArrayFitSet, FitPartition
from monitor.model import ReliabilityModel
from monitor.profilestore import ParquetFitSet
from monitor.reliability import ClusterCalibrator

CAP = 120  # of 380 rows: the sampled, streamed path
PARTITION = 50


def _clusterer() -> SpectralClusterer:
    return SpectralClusterer(k_range=(2, 4), n_init=1, random_state=0)


@pytest.fixture(scope="module")
def data():
    profiler, X, group, labels, scores, failures, records = synthetic_fit_data()
    return profiler, X, labels, scores, failures, records


@pytest.fixture
def parquet_set(data, tmp_path: Path) -> ParquetFitSet:
    _, X, labels, scores, failures, records = data
    writer = ParquetFitSet.writer(tmp_path / "fit", X.shape[1], partition_rows=PARTITION)
    for i in range(X.shape[0]):
        writer.append(X[i], int(failures[i]), records[i], label=int(labels[i]), score=float(scores[i]))
    return writer.close()


class CountingFitSet:
    """Wraps a fit set and records the size of everything the fit made it read."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.reads: list[int] = []
        self.takes: list[int] = []

    @property
    def n_rows(self) -> int:
        return self.inner.n_rows

    def partitions(self):
        return self.inner.partitions()

    def read(self, key) -> FitPartition:
        part = self.inner.read(key)
        self.reads.append(part.profiles.shape[0])
        return part

    def take(self, rows) -> FitPartition:
        self.takes.append(len(rows))
        return self.inner.take(rows)


def test_streamed_fit_equals_an_in_memory_computation_of_the_same_sample_and_assignment(
    data, parquet_set: ParquetFitSet
) -> None:
    profiler, X, labels, scores, failures, records = data
    n = X.shape[0]
    model = ReliabilityModel.fit_streamed(
        parquet_set, profiler=profiler, clusterer=_clusterer(), threshold=THRESHOLD, max_fit_profiles=CAP
    )
    # The same computation, by hand, on arrays in memory.
    kept = np.sort(np.random.default_rng(0).choice(n, size=CAP, replace=False))
    ref = SpectralClusterer(k_range=(2, 4), n_init=1, random_state=0, cluster_features=profiler.n_spectral)
    ref.fit(X[kept])
    for name, arr in ref.to_arrays().items():
        np.testing.assert_array_equal(model.clusterer.to_arrays()[name], arr, err_msg=name)
    memberships = ref.predict_proba(X)
    hard = memberships.argmax(axis=1)
    k = ref.n_clusters_
    np.testing.assert_array_equal(model.rates.counts_, np.bincount(hard, minlength=k))
    np.testing.assert_array_equal(model.rates.failures_, np.bincount(hard, weights=failures, minlength=k))
    np.testing.assert_allclose(model.reference_mix, np.bincount(hard, minlength=k) / n)
    Z = ref.standardise(X)
    mean = np.vstack([Z[hard == c].mean(axis=0) for c in range(k)])
    std = np.vstack([np.maximum(Z[hard == c].std(axis=0), 1e-3) for c in range(k)])
    np.testing.assert_allclose(model.cluster_feature_mean, mean, atol=1e-12)
    np.testing.assert_allclose(model.cluster_feature_std, std, atol=1e-12)
    novel = np.mean(ref.novelty(X)[1] > ref.novelty_threshold_)
    assert model.reference_novelty_rate == pytest.approx(max(novel, 1 - ref.novelty_quantile))
    expected_p = np.mean(memberships @ model.rates.rate_)
    assert model.reference_failure_probability == pytest.approx(expected_p, rel=1e-12)
    calibrator = ClusterCalibrator(threshold=THRESHOLD).fit(scores[kept], labels[kept], memberships[kept])
    np.testing.assert_allclose(model.calibrator.coef_, calibrator.coef_)
    np.testing.assert_array_equal(
        model.drift_ranks.table_, ReferenceRanks().fit(ref.standardise(X[kept])).table_
    )
    np.testing.assert_array_equal(model.fit_profiles, X[kept])
    assert [r["image"] for r in model.fit_records] == [records[i]["image"] for i in kept]
    assert [r["cluster"] for r in model.fit_records] == hard[kept].tolist()
    assert model.card["fit_sample"] == {"n_profiles": n, "n_clustered": CAP}
    # The in-memory fit with the same cap is the same model (one implementation of the sampled fit).
    same = ReliabilityModel.fit(
        X,
        failures,
        profiler=profiler,
        clusterer=_clusterer(),
        labels=labels,
        scores=scores,
        threshold=THRESHOLD,
        records=records,
        max_fit_profiles=CAP,
    )
    assert same.model_id == model.model_id


def test_the_streamed_fit_holds_the_sample_and_one_partition_at_a_time(data, parquet_set) -> None:
    profiler = data[0]
    counting = CountingFitSet(parquet_set)
    ReliabilityModel.fit_streamed(
        counting, profiler=profiler, clusterer=_clusterer(), threshold=THRESHOLD, max_fit_profiles=CAP
    )
    assert counting.takes == [CAP]  # the sample, once
    assert counting.reads == [50, 50, 50, 50, 50, 50, 50, 30]  # then every partition once, alone
    # What the Parquet reader materialised in all: the sample plus one pass.
    assert parquet_set.rows_read == CAP + parquet_set.n_rows


def test_partitions_can_run_elsewhere_and_come_back_in_order(data, parquet_set) -> None:
    profiler = data[0]
    seen: list[list[int]] = []

    def mapper(function, keys):
        seen.append(list(keys))
        return [function(key) for key in reversed(keys)][::-1]  # computed in another order

    kw = dict(profiler=profiler, threshold=THRESHOLD, max_fit_profiles=CAP)
    a = ReliabilityModel.fit_streamed(parquet_set, clusterer=_clusterer(), map_partitions=mapper, **kw)
    b = ReliabilityModel.fit_streamed(parquet_set, clusterer=_clusterer(), **kw)
    assert seen == [parquet_set.partitions()]
    assert a.model_id == b.model_id
    np.testing.assert_array_equal(a.cluster_feature_mean, b.cluster_feature_mean)


def test_at_most_the_cap_the_streamed_fit_is_the_in_memory_fit(data, parquet_set) -> None:
    profiler, X, labels, scores, failures, records = data
    streamed = ReliabilityModel.fit_streamed(
        parquet_set, profiler=profiler, clusterer=_clusterer(), threshold=THRESHOLD, max_fit_profiles=10**6
    )
    memory = ReliabilityModel.fit(
        X,
        failures,
        profiler=profiler,
        clusterer=_clusterer(),
        labels=labels,
        scores=scores,
        threshold=THRESHOLD,
        records=records,
    )
    assert streamed.model_id == memory.model_id and "fit_sample" not in streamed.card
    np.testing.assert_array_equal(streamed.cluster_feature_std, memory.cluster_feature_std)
    assert streamed.fit_records == memory.fit_records


def test_the_scope_is_learned_from_every_row_not_only_the_sample(data) -> None:
    profiler, X, _, _, failures, records = data
    n = X.shape[0]
    kept = set(np.random.default_rng(0).choice(n, size=CAP, replace=False).tolist())
    outside = next(i for i in range(n) if i not in kept)
    records = [dict(r) for r in records]
    records[outside]["img_modality"] = "OT"
    fit_set = ArrayFitSet(X, failures, records=records, partition_rows=PARTITION)
    model = ReliabilityModel.fit_streamed(
        fit_set, profiler=profiler, clusterer=_clusterer(), max_fit_profiles=CAP
    )
    assert "OT" in model.scope.modalities


def test_an_empty_fit_set_is_refused(data) -> None:
    profiler, X, *_ = data
    empty = ArrayFitSet(X[:0], np.zeros(0, dtype=int))
    with pytest.raises(InvalidInputError, match="empty fit set"):
        ReliabilityModel.fit_streamed(empty, profiler=profiler, max_fit_profiles=CAP)
