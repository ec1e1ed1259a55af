"""A fit set read partition by partition, and the statistics a fit reduces over its partitions.

A fit of more profiles than fit in memory never holds them all: it clusters a seeded
sample (:meth:`FitSet.take`), then each partition is assigned to the clusters and summed
into a small :class:`PartitionStats` (:func:`partition_stats`, run wherever the partition
is: a local loop or a Dask worker), and the sums are merged (:meth:`PartitionStats.merge`).
Everything here is numpy; the Parquet implementation is :class:`monitor.profilestore.ParquetFitSet`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .clustering import SpectralClusterer
from .scope import ScopeRules

__all__ = ["ArrayFitSet", "FitPartition", "FitSet", "PartitionStats", "partition_stats"]


@dataclass
class FitPartition:
    """Some rows of a fit set.

    rows : ndarray of shape (n,), dtype=int64
        Their positions in the whole fit set.
    profiles : ndarray of shape (n, n_features), dtype=float64
    failures : ndarray of shape (n,), 0/1
    labels, scores : ndarray of shape (n,), or None when the outcomes give only failures
    records : list of dict, or None
        The image name and metadata of each row.
    """

    rows: np.ndarray
    profiles: np.ndarray
    failures: np.ndarray
    labels: np.ndarray | None = None
    scores: np.ndarray | None = None
    records: list[dict[str, Any]] | None = None

    @classmethod
    def concat(cls, parts: list[FitPartition]) -> FitPartition:
        if not parts:
            raise ValueError("no partitions to concatenate")

        def cat(name: str) -> np.ndarray | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)

        records = [p.records for p in parts]
        return cls(
            rows=np.concatenate([p.rows for p in parts]),
            profiles=np.vstack([p.profiles for p in parts]),
            failures=np.concatenate([p.failures for p in parts]),
            labels=cat("labels"),
            scores=cat("scores"),
            records=None if any(r is None for r in records) else [x for r in records for x in r],  # type: ignore[union-attr]
        )


class FitSet(Protocol):
    """What a streamed fit reads: rows in a fixed order, in partitions."""

    @property
    def n_rows(self) -> int: ...

    def partitions(self) -> list[Any]:
        """Keys of the partitions, in row order."""
        ...

    def read(self, key: Any) -> FitPartition:
        """Every row of one partition."""
        ...

    def take(self, rows: np.ndarray) -> FitPartition:
        """The given sorted global rows, without holding more than one partition besides them."""
        ...


class ArrayFitSet:
    """A fit set held in memory, cut into partitions of ``partition_rows`` (the in-memory fit's)."""

    def __init__(
        self,
        profiles: np.ndarray,
        failures: np.ndarray,
        *,
        labels: np.ndarray | None = None,
        scores: np.ndarray | None = None,
        records: list[dict[str, Any]] | None = None,
        partition_rows: int = 65_536,
    ) -> None:
        self.profiles = profiles
        self.failures = failures
        self.labels = labels
        self.scores = scores
        self.records = records
        self.partition_rows = partition_rows

    @property
    def n_rows(self) -> int:
        return int(self.profiles.shape[0])

    def partitions(self) -> list[int]:
        return list(range(0, self.n_rows, self.partition_rows))

    def read(self, key: int) -> FitPartition:
        return self.take(np.arange(key, min(key + self.partition_rows, self.n_rows)))

    def take(self, rows: np.ndarray) -> FitPartition:
        return FitPartition(
            rows=np.asarray(rows, dtype=np.int64),
            profiles=self.profiles[rows],
            failures=self.failures[rows],
            labels=None if self.labels is None else self.labels[rows],
            scores=None if self.scores is None else self.scores[rows],
            records=None if self.records is None else [self.records[i] for i in rows],
        )


@dataclass
class PartitionStats:
    """What the model needs from every profile, summed over some rows.

    n : rows; counts, failures : per hard cluster (k,); membership_sum : soft memberships
    summed (k,); novel : rows beyond the novelty threshold; mean, m2 : per cluster, the mean
    and the sum of squared deviations of the standardised profiles (k, d); scope : the
    header allow-lists learned from the rows' records.
    """

    n: int
    counts: np.ndarray
    failures: np.ndarray
    membership_sum: np.ndarray
    novel: int
    mean: np.ndarray
    m2: np.ndarray
    scope: ScopeRules

    def merge(self, other: PartitionStats) -> PartitionStats:
        """The statistics of both sets of rows (Chan et al.'s pairwise update for mean and m2)."""
        na, nb = self.counts.astype(np.float64)[:, None], other.counts.astype(np.float64)[:, None]
        n = na + nb
        delta = other.mean - self.mean
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(
                n > 0, self.mean + delta * np.divide(nb, n, where=n > 0, out=np.zeros_like(n)), 0.0
            )
            m2 = self.m2 + other.m2 + delta**2 * np.divide(na * nb, n, where=n > 0, out=np.zeros_like(n))
        return PartitionStats(
            n=self.n + other.n,
            counts=self.counts + other.counts,
            failures=self.failures + other.failures,
            membership_sum=self.membership_sum + other.membership_sum,
            novel=self.novel + other.novel,
            mean=mean,
            m2=m2,
            scope=self.scope.union(other.scope),
        )

    def feature_std(self) -> np.ndarray:
        """Per-cluster standard deviation (floored at 1e-3; 1 for clusters of < 2), as the model keeps it."""
        std = np.ones_like(self.mean)
        many = self.counts > 1
        std[many] = np.maximum(np.sqrt(self.m2[many] / self.counts[many, None]), 1e-3)
        return std


def partition_stats(clusterer: SpectralClusterer, fit_set: FitSet, key: Any) -> PartitionStats:
    """Assign one partition to the fitted clusters and sum what the model needs.

    Runs where the partition is read (a local loop, or a Dask worker given a picklable
    ``fit_set``); holds one partition.
    """
    part = fit_set.read(key)
    k = clusterer.n_clusters_
    Z, memberships, _, _, distance = clusterer.assess(part.profiles)
    hard = memberships.argmax(axis=1)
    counts = np.bincount(hard, minlength=k)
    total = np.zeros((k, Z.shape[1]))
    np.add.at(total, hard, Z)
    mean = np.divide(total, counts[:, None], out=np.zeros_like(total), where=counts[:, None] > 0)
    m2 = np.zeros_like(total)
    np.add.at(m2, hard, (Z - mean[hard]) ** 2)
    return PartitionStats(
        n=int(part.profiles.shape[0]),
        counts=counts,
        failures=np.bincount(hard, weights=part.failures, minlength=k).astype(np.int64),
        membership_sum=memberships.sum(axis=0),
        novel=int(np.sum(distance > clusterer.novelty_threshold_)),
        mean=mean,
        m2=m2,
        scope=ScopeRules.learn(part.records),
    )
