"""The fitted reliability model: spectral clusters + failure rates + calibration + reference.

:meth:`ReliabilityModel.fit` is the offline fit on profiles and outcomes;
:meth:`ReliabilityModel.score` turns profiles into :class:`~monitor.types.ScoreResult`;
:meth:`ReliabilityModel.drift` compares a window with the reference.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial, reduce
from typing import Any

import numpy as np

from . import __version__
from .clustering import SpectralClusterer, check_profiles
from .drift import DEFAULT_THRESHOLDS, DriftThresholds, ReferenceRanks, WindowStats, drift_report
from .errors import InvalidInputError
from .fitset import ArrayFitSet, FitSet, PartitionStats, partition_stats
from .reliability import ClusterCalibrator, ClusterFailureRates
from .scope import ScopeRules
from .spectrum import SpectralProfiler
from .types import DriftReport, ScoreResult

__all__ = ["ReliabilityModel", "library_versions"]

_CHUNK = 65_536


def library_versions() -> dict[str, str]:
    """Versions of everything that can change a number the model reports."""
    import joblib
    import pyfftw
    import scipy
    import sklearn

    return {
        "cxr-spectral-monitor": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "pyfftw": pyfftw.__version__,
        "fftw": ".".join(str(v) for v in pyfftw.fftw_version_tuple),
        "joblib": joblib.__version__,
    }


@dataclass
class ReliabilityModel:
    """Everything needed to score an image's reliability; built by :meth:`fit` or loaded."""

    profiler: SpectralProfiler
    clusterer: SpectralClusterer
    rates: ClusterFailureRates
    calibrator: ClusterCalibrator | None
    cluster_feature_mean: np.ndarray  # (k, d) standardised profile mean of each cluster
    cluster_feature_std: np.ndarray  # (k, d)
    reference_mix: np.ndarray  # (k,)
    reference_novelty_rate: float
    reference_failure_probability: float  # mean predicted failure probability on the fit set
    drift_thresholds: DriftThresholds = DEFAULT_THRESHOLDS
    card: dict[str, Any] = field(default_factory=dict)
    # The fit set, kept for reports and slice analysis: profiles and one record per image
    # (image name, failure, cluster, and any metadata columns of the outcomes table).
    fit_profiles: np.ndarray | None = None
    fit_records: list[dict[str, Any]] | None = None
    # Header allow-lists (modality, body part, view) of the images the model speaks for.
    scope: ScopeRules = field(default_factory=ScopeRules)
    # Per-feature reference distribution for the rank-based drift tests (None: Welch tests).
    drift_ranks: ReferenceRanks | None = None

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.profiler.feature_names

    @property
    def n_clusters(self) -> int:
        return self.clusterer.n_clusters_

    @property
    def model_id(self) -> str:
        return str(self.card.get("model_id", "unsaved"))

    @classmethod
    def fit(
        cls,
        profiles: Any,
        failures: Any,
        *,
        profiler: SpectralProfiler,
        clusterer: SpectralClusterer | None = None,
        prior_strength: float = 10.0,
        labels: Any = None,
        scores: Any = None,
        threshold: float | None = None,
        drift_thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
        card: dict[str, Any] | None = None,
        records: list[dict[str, Any]] | None = None,
        scope: ScopeRules | None = None,
        max_fit_profiles: int | None = None,
    ) -> ReliabilityModel:
        """Fit clusters, failure rates and (when labels and scores are given) calibration.

        Parameters
        ----------
        profiles : ndarray of shape (n_images, n_features)
        failures : ndarray of shape (n_images,), 0/1
            Whether the classifier was wrong on each image.
        clusterer : SpectralClusterer, optional
            Unfitted; when its ``cluster_features`` is unset it is set to the profiler's
            spectral component, so clusters describe the spectrum only.
        records : list of dict, optional
            One per image (name and metadata), kept in the model with the
            assigned cluster and the failure for reports and slice analysis.
        labels, scores : ndarray of shape (n_images,), optional
            True 0/1 labels and classifier scores; with ``threshold`` they fit the
            per-cluster calibration used when a request carries the classifier's score.
        scope : ScopeRules, optional
            Header allow-lists; default: :meth:`ScopeRules.learn` from ``records``.
        max_fit_profiles : int, optional
            Above this many profiles, the clusters (standardisation, PCA, mixture, novelty
            scale) are fitted on a seeded random sample of this size, then every profile is
            assigned, partition by partition, for the failure rates, cluster statistics,
            reference mix and novelty rate (:meth:`fit_streamed`, which this delegates to), so
            time and memory of the clustering stop growing with n. The score calibration and
            the kept profiles and records are the sample's (``card["fit_sample"]``).
        """
        X = check_profiles(profiles, len(profiler.feature_names))
        failures = np.asarray(failures)
        if failures.shape != (X.shape[0],) or not np.isin(failures, (0, 1)).all():
            raise InvalidInputError(f"failures must be {X.shape[0]} values of 0 or 1")
        if records is not None and len(records) != X.shape[0]:
            raise InvalidInputError(f"got {len(records)} records for {X.shape[0]} profiles")
        n = X.shape[0]
        if max_fit_profiles is not None and n > max_fit_profiles:
            # One implementation of the sampled fit: the in-memory set is read like a streamed one.
            fit_set = ArrayFitSet(
                X,
                failures,
                labels=None if labels is None else np.asarray(labels),
                scores=None if scores is None else np.asarray(scores, dtype=np.float64),
                records=records,
            )
            return cls.fit_streamed(
                fit_set,
                profiler=profiler,
                clusterer=clusterer,
                prior_strength=prior_strength,
                threshold=threshold,
                drift_thresholds=drift_thresholds,
                card=card,
                scope=scope,
                max_fit_profiles=max_fit_profiles,
            )
        clusterer = _prepared(clusterer, profiler)
        clusterer.fit(X)
        # The assignment pass, in chunks: no n x d temporary beyond one chunk.
        chunks = [slice(i, min(i + _CHUNK, n)) for i in range(0, n, _CHUNK)]
        memberships = np.vstack([clusterer.predict_proba(X[c]) for c in chunks])
        hard = memberships.argmax(axis=1)
        k = clusterer.n_clusters_
        rates = ClusterFailureRates(n_clusters=k, prior_strength=prior_strength).fit(hard, failures)
        calibrator = _calibrator(labels, scores, threshold, memberships)
        mean, std = _cluster_feature_stats(clusterer, X, hard, k, chunks)
        distance = np.concatenate([clusterer.novelty(X[c])[1] for c in chunks])
        ref_novel = float(np.mean(distance > clusterer.novelty_threshold_))
        model = cls(
            profiler=profiler,
            clusterer=clusterer,
            rates=rates,
            calibrator=calibrator,
            cluster_feature_mean=mean,
            cluster_feature_std=std,
            reference_mix=np.bincount(hard, minlength=k) / len(hard),
            reference_novelty_rate=max(ref_novel, 1 - clusterer.novelty_quantile),
            reference_failure_probability=float(np.mean(rates.predict_failure(memberships)[0])),
            drift_thresholds=drift_thresholds,
            card=dict(card or {}),
            fit_profiles=X,
            fit_records=_fit_records(records, hard, failures),
        )
        model.scope = scope if scope is not None else ScopeRules.learn(model.fit_records)
        model.drift_ranks = ReferenceRanks().fit(np.vstack([clusterer.standardise(X[c]) for c in chunks]))
        return model._sealed()

    @classmethod
    def fit_streamed(
        cls,
        fit_set: FitSet,
        *,
        profiler: SpectralProfiler,
        clusterer: SpectralClusterer | None = None,
        prior_strength: float = 10.0,
        threshold: float | None = None,
        drift_thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
        card: dict[str, Any] | None = None,
        scope: ScopeRules | None = None,
        max_fit_profiles: int | None = None,
        map_partitions: Callable[[Callable[[Any], PartitionStats], list[Any]], Iterable[PartitionStats]]
        | None = None,
    ) -> ReliabilityModel:
        """Fit from a fit set read partition by partition: memory bounded by the sample, not n.

        With at most ``max_fit_profiles`` rows (or ``None``) the whole set is read and the
        result is exactly :meth:`fit`'s. Above it, the clusters (standardisation, PCA, mixture,
        novelty scale) are fitted on a seeded sample of ``max_fit_profiles`` rows, the same
        rows :meth:`fit` would draw; then every partition is assigned and summed by
        :func:`~monitor.fitset.partition_stats` (cluster counts and failures for the rates,
        soft-membership sums for the reference failure probability, novel counts for the
        reference novelty rate, per-cluster feature means and spreads, header values for the
        scope) and the sums are merged. The score calibration (1 + 2k coefficients) and the
        drift tests' reference rank table (at most 4096 quantiles a feature) are fitted on the
        sample; the model keeps the sample's profiles and records (``card["fit_sample"]``).

        Parameters
        ----------
        fit_set : FitSet
            Such as :class:`~monitor.fitset.ArrayFitSet` or
            :class:`monitor.profilestore.ParquetFitSet`.
        map_partitions : callable, optional
            ``map_partitions(function, keys)`` returns ``function(key)`` for each key, in
            order; default the builtin ``map`` (here, one partition at a time). A Dask
            runner's runs them on its workers (:meth:`monitor.distributed.DaskRunner.map`).
        scope : ScopeRules, optional
            Default: learned from every row's record.
        """
        n = fit_set.n_rows
        if n == 0:
            raise InvalidInputError("profiles must be a non-empty 2-D array, got an empty fit set")
        if max_fit_profiles is None or n <= max_fit_profiles:
            every = fit_set.take(np.arange(n))
            return cls.fit(
                every.profiles,
                every.failures,
                profiler=profiler,
                clusterer=clusterer,
                prior_strength=prior_strength,
                labels=every.labels,
                scores=every.scores,
                threshold=threshold,
                drift_thresholds=drift_thresholds,
                card=card,
                records=every.records,
                scope=scope,
            )
        clusterer = _prepared(clusterer, profiler)
        rng = np.random.default_rng(clusterer.random_state)
        sample = fit_set.take(np.sort(rng.choice(n, size=max_fit_profiles, replace=False)))
        X = check_profiles(sample.profiles, len(profiler.feature_names))
        if not np.isin(sample.failures, (0, 1)).all():
            raise InvalidInputError("failures must be 0 or 1")
        clusterer.fit(X)
        task = partial(partition_stats, clusterer, fit_set)
        stats = reduce(PartitionStats.merge, (map_partitions or map)(task, fit_set.partitions()))
        k = clusterer.n_clusters_
        rates = ClusterFailureRates(n_clusters=k, prior_strength=prior_strength)
        rates.fit_counts(stats.counts, stats.failures)
        memberships = clusterer.predict_proba(X)
        hard = memberships.argmax(axis=1)
        model = cls(
            profiler=profiler,
            clusterer=clusterer,
            rates=rates,
            calibrator=_calibrator(sample.labels, sample.scores, threshold, memberships),
            cluster_feature_mean=stats.mean,
            cluster_feature_std=stats.feature_std(),
            reference_mix=stats.counts / stats.n,
            reference_novelty_rate=max(stats.novel / stats.n, 1 - clusterer.novelty_quantile),
            reference_failure_probability=float(stats.membership_sum @ rates.rate_ / stats.n),
            drift_thresholds=drift_thresholds,
            card=dict(card or {}),
            fit_profiles=X,
            fit_records=_fit_records(sample.records, hard, sample.failures),
            scope=scope if scope is not None else stats.scope,
        )
        # The drift tests' reference table (at most 4096 quantiles a feature) from the sample's
        # standardised profiles: a seeded sample of this size pins those quantiles closely.
        model.drift_ranks = ReferenceRanks().fit(clusterer.standardise(X))
        model.card["fit_sample"] = {"n_profiles": n, "n_clustered": int(X.shape[0])}
        return model._sealed()

    def _sealed(self) -> ReliabilityModel:
        """Record the versions and the content id of a new fit."""
        self.card.setdefault("versions", library_versions())
        self.card["model_id"] = self.fingerprint()
        return self

    def fingerprint(self) -> str:
        """Short content hash of the fitted state: identical fits give identical ids."""
        h = hashlib.sha256()
        for name, arr in sorted(self.clusterer.to_arrays().items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(np.round(arr, 10)).tobytes())
        h.update(np.round(self.rates.rate_, 10).tobytes())
        return "cxrm-" + h.hexdigest()[:12]

    def score(
        self,
        profiles: Any,
        classifier_scores: Any = None,
        top: int = 3,
        scope_reasons: Sequence[tuple[tuple[str, str], ...]] | None = None,
    ) -> list[ScoreResult]:
        """Reliability of each profile.

        A novel or out-of-scope image is not trusted: its failure interval is [0, 1] and its
        reliability the lower end of the reliability interval (0), so that it never reads like
        a typical image's (see :class:`~monitor.types.ScoreResult`).

        Parameters
        ----------
        profiles : ndarray of shape (n_images, n_features)
        classifier_scores : array-like of shape (n_images,), optional
            The classifier's probability for the positive class; ``nan`` where
            unknown. Used only when the model has a calibrator.
        top : int
            How many most-deviating features to report per image.
        scope_reasons : sequence of tuples of (field, reason), optional
            Per image, why its header puts it out of scope (:meth:`ScopeRules.check`); empty
            or ``None`` when in scope.
        """
        X = check_profiles(profiles, len(self.feature_names))
        Z, memberships, loglik, novelty, distance = self.clusterer.assess(X)
        p_cluster, lower, upper = self.rates.predict_failure(memberships)
        p_final = p_cluster.copy()
        method = np.full(X.shape[0], "cluster", dtype=object)
        if classifier_scores is not None and self.calibrator is not None:
            s = np.asarray(classifier_scores, dtype=np.float64).ravel()
            if s.shape != (X.shape[0],):
                raise InvalidInputError(f"expected {X.shape[0]} classifier scores, got {s.shape[0]}")
            known = np.isfinite(s)
            if known.any():
                p_final[known], lower[known], upper[known] = self.calibrator.predict_failure_interval(
                    s[known], memberships[known]
                )
                method[known] = "calibrated_score"
        novel = distance > self.clusterer.novelty_threshold_
        if scope_reasons is not None and len(scope_reasons) != X.shape[0]:
            raise InvalidInputError(f"expected {X.shape[0]} scope verdicts, got {len(scope_reasons)}")
        scope = list(scope_reasons) if scope_reasons is not None else [()] * X.shape[0]
        untrusted = novel | np.array([bool(r) for r in scope], dtype=bool)
        # Outside the reference (novel) or outside the model's scope (header) the measured rates
        # say nothing certain: the interval is the uninformative [0, 1] and the reliability its
        # lower end (the point estimate stays in failure_probability, for ranking).
        lower[untrusted], upper[untrusted] = 0.0, 1.0
        reliability = np.where(untrusted, 1.0 - upper, 1.0 - p_final)
        hard = memberships.argmax(axis=1)
        dev = (Z - self.cluster_feature_mean[hard]) / self.cluster_feature_std[hard]
        names = self.feature_names
        results = []
        for i in range(X.shape[0]):
            order = np.argsort(-np.abs(dev[i]))[:top]
            results.append(
                ScoreResult(
                    cluster=int(hard[i]),
                    memberships=tuple(float(m) for m in memberships[i]),
                    failure_probability=float(p_final[i]),
                    failure_interval=(float(lower[i]), float(upper[i])),
                    reliability=float(reliability[i]),
                    novelty=float(novelty[i]),
                    is_novel=bool(novel[i]),
                    log_likelihood=float(loglik[i]),
                    in_blind_spot=bool(self.rates.blind_spot_[hard[i]]),
                    top_features=tuple((names[j], float(dev[i, j])) for j in order),
                    cluster_failure_probability=float(p_cluster[i]),
                    method=str(method[i]),
                    trusted=not bool(untrusted[i]),
                    out_of_scope=bool(scope[i]),
                    scope_field=scope[i][0][0] if scope[i] else "",
                    scope_reasons=tuple(reason for _, reason in scope[i]),
                )
            )
        return results

    def new_window(self) -> WindowStats:
        return WindowStats(
            n_clusters=self.n_clusters, n_features=len(self.feature_names), ranks=self.drift_ranks
        )

    def standardise(self, profiles: Any) -> np.ndarray:
        """Profiles in reference standard deviations, shape (n_images, n_features)."""
        return self.clusterer.standardise(profiles)

    def drift(self, window: WindowStats) -> DriftReport:
        """Drift report of a window filled from this model's scores."""
        return drift_report(
            window,
            self.reference_mix,
            self.reference_novelty_rate,
            self.reference_failure_probability,
            self.feature_names,
            self.drift_thresholds,
            components=self.feature_components,
            reference_size=self.reference_size,
        )

    @property
    def feature_components(self) -> tuple[str, ...]:
        """The component of each feature: ``"spectral"`` or ``"intensity"``."""
        intensity = set(self.profiler.intensity_feature_names)
        return tuple("intensity" if n in intensity else "spectral" for n in self.feature_names)

    @property
    def reference_size(self) -> int:
        """Number of reference (fit) images."""
        return int(self.clusterer.reference_distances_.size)


def _prepared(clusterer: SpectralClusterer | None, profiler: SpectralProfiler) -> SpectralClusterer:
    clusterer = clusterer if clusterer is not None else SpectralClusterer()
    if clusterer.cluster_features is None and not hasattr(clusterer, "components_"):
        # Clusters describe the spectrum (their failure rates are what E1/E2 measure); the
        # intensity component joins novelty and per-feature drift, where it adds sight.
        clusterer.set_params(cluster_features=profiler.n_spectral)
    return clusterer


def _calibrator(
    labels: Any, scores: Any, threshold: float | None, memberships: np.ndarray
) -> ClusterCalibrator | None:
    if labels is None or scores is None:
        return None
    if threshold is None:
        raise InvalidInputError("a decision threshold is needed to calibrate scores")
    return ClusterCalibrator(threshold=threshold).fit(scores, labels, memberships)


def _fit_records(
    records: list[dict[str, Any]] | None, hard: np.ndarray, failures: np.ndarray
) -> list[dict[str, Any]]:
    return [
        {**(records[i] if records is not None else {}), "cluster": int(hard[i]), "failure": int(failures[i])}
        for i in range(len(hard))
    ]


def _cluster_feature_stats(
    clusterer: SpectralClusterer, X: np.ndarray, hard: np.ndarray, k: int, chunks: list[slice]
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (floored at 1e-3; 1 for clusters of < 2) of the standardised profiles per cluster.

    Accumulated over chunks as shifted sums, so no standardised copy of all profiles is held.
    """
    d = X.shape[1]
    count = np.bincount(hard, minlength=k).astype(np.float64)
    total = np.zeros((k, d))
    for c in chunks:
        np.add.at(total, hard[c], clusterer.standardise(X[c]))
    mean = np.divide(total, count[:, None], out=np.zeros((k, d)), where=count[:, None] > 0)
    sq = np.zeros((k, d))
    for c in chunks:
        np.add.at(sq, hard[c], (clusterer.standardise(X[c]) - mean[hard[c]]) ** 2)
    std = np.ones((k, d))
    many = count > 1
    std[many] = np.maximum(np.sqrt(sq[many] / count[many, None]), 1e-3)
    return mean, std
