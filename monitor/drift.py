"""Drift of a batch or window of images against the reference (pure functions).

Everything here works on sufficient statistics (cluster counts, novel count, sum
of failure probabilities, feature sums), so the CLI's batches and the server's
sliding windows share one implementation.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import special, stats
from scipy.spatial.distance import jensenshannon

from .errors import InvalidInputError
from .reliability import benjamini_hochberg
from .types import DriftReport, FeatureDrift

__all__ = [
    "DEFAULT_THRESHOLDS",
    "DriftThresholds",
    "ReferenceRanks",
    "SlidingWindow",
    "WindowStats",
    "drift_report",
    "feature_drift",
    "psi",
]

_EPS = 1e-4


@dataclass(frozen=True)
class DriftThresholds:
    """When a window counts as drifted.

    Cluster-mix drift: ``chi2_p < chi2_alpha`` and ``psi > psi_min`` (the test
    guards against noise in small windows, the PSI floor against trivial shifts in
    large ones). Novelty drift: the novel share exceeds ``novelty_rate_min`` and is
    significantly above the reference rate (binomial p < ``novelty_alpha``). Out-of-scope
    drift: the share of images whose header puts them out of the model's scope exceeds
    ``out_of_scope_rate_min``. Feature drift: a feature's window mean normal score (its
    robust shift, see :class:`ReferenceRanks`) moved by more than ``feature_shift_min`` and
    its Benjamini–Hochberg q-value (over all features) is below ``feature_alpha``; the
    intensity component drifts when an intensity feature does. No verdict below ``min_images``.
    """

    psi_min: float = 0.1
    chi2_alpha: float = 1e-3
    novelty_rate_min: float = 0.05
    novelty_alpha: float = 1e-3
    min_images: int = 30
    # Out-of-scope drift: more than this share of the window's headers say "not a chest
    # radiograph" (the reference has none, so any steady share is a change of traffic).
    out_of_scope_rate_min: float = 0.02
    feature_alpha: float = 1e-3
    feature_shift_min: float = 0.25

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


DEFAULT_THRESHOLDS = DriftThresholds()


class ReferenceRanks:
    """The reference distribution of every profile feature, for rank-based drift tests.

    A value is scored by its position among the reference values of its feature: the
    normal score ``Phi^-1((below + ties / 2 + 1/2) / (m + 1))`` of a reference of ``m``
    values (van der Waerden scores). A new image drawn from the reference distribution
    gets a score of mean 0 whatever the feature's own distribution (heavy tails, skew,
    point masses such as "no pixel at the maximum"); the scores are bounded by
    ``Phi^-1(1 - 1/(2(m+1)))`` (2.9 for ``m = 300``), so a window mean of them is close to
    normal already for 30 images, which a mean of raw standardised features of kurtosis
    10-40 is not. For a normally distributed feature the score is its value in reference
    standard deviations, so shifts keep that unit. Works on any monotone transform of
    the profile (standardised or raw give the same scores).

    Parameters
    ----------
    max_points : int
        Above this many reference images the table keeps this many evenly spaced
        quantiles of each feature (mid-point positions), so a model stays small.
    """

    def __init__(self, max_points: int = 4096) -> None:
        self.max_points = max_points

    def fit(self, Z: Any) -> ReferenceRanks:
        """Learn the table from reference profiles ``Z`` of shape (n_images, n_features)."""
        Z = np.asarray(Z, dtype=np.float64)
        if Z.ndim != 2 or Z.shape[0] < 2 or not np.isfinite(Z).all():
            raise InvalidInputError(f"reference ranks need >= 2 finite profiles, got shape {Z.shape}")
        if Z.shape[0] > self.max_points:
            Z = np.quantile(Z, (np.arange(self.max_points) + 0.5) / self.max_points, axis=0)
        return self._set(np.sort(Z, axis=0))

    @classmethod
    def from_table(cls, table: Any) -> ReferenceRanks:
        """Rebuild from :attr:`table_` (as saved in a model artifact)."""
        table = np.asarray(table, dtype=np.float64)
        if table.ndim != 2 or table.shape[0] < 2:
            raise InvalidInputError(f"a reference rank table needs >= 2 rows, got shape {table.shape}")
        return cls(max_points=max(table.shape[0], 2))._set(np.sort(table, axis=0))

    def _set(self, table: np.ndarray) -> ReferenceRanks:
        self.table_ = table
        # The null variance of one new image's score, from the reference's own scores (it is
        # below 1 where ties pile up, e.g. a feature that is 0 for half of the images).
        ref = self.scores(table)
        self.null_variance_ = np.maximum(ref.var(axis=0), 1e-12)
        return self

    @property
    def n_points(self) -> int:
        """Rows of the table: the reference size the tests account for."""
        return int(self.table_.shape[0])

    def scores(self, Z: Any) -> np.ndarray:
        """Normal scores of profiles ``Z`` of shape (n_images, n_features) or (n_features,)."""
        Z = np.asarray(Z, dtype=np.float64)
        flat = Z.ndim == 1
        Z2 = Z[None, :] if flat else Z
        m = self.table_.shape[0]
        out = np.empty_like(Z2)
        for j in range(Z2.shape[1]):
            col = self.table_[:, j]
            lo = np.searchsorted(col, Z2[:, j], side="left")
            hi = np.searchsorted(col, Z2[:, j], side="right")
            out[:, j] = (lo + 0.5 * (hi - lo) + 0.5) / (m + 1)
        out = special.ndtri(out)
        return out[0] if flat else out


def psi(observed: Any, expected: Any) -> float:
    """Population stability index of two distributions (each normalised; ε-smoothed)."""
    p = np.asarray(observed, dtype=np.float64) + _EPS
    q = np.asarray(expected, dtype=np.float64) + _EPS
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((p - q) * np.log(p / q)))


@dataclass
class WindowStats:
    """Running sufficient statistics of a set of scored images (mergeable).

    With ``ranks`` (the model's :class:`ReferenceRanks`) every image's normal scores are
    summed too, and the per-feature tests are rank-based; without, they are Welch tests
    of the standardised feature means (windows built by hand, e.g. from audit cells).
    """

    n_clusters: int
    n_features: int
    ranks: ReferenceRanks | None = None
    cluster_counts: np.ndarray = field(init=False)
    feature_sum: np.ndarray = field(init=False)
    feature_sumsq: np.ndarray = field(init=False)
    score_sum: np.ndarray = field(init=False)
    n: int = 0
    n_novel: int = 0
    failure_probability_sum: float = 0.0
    # Out-of-scope images by the first header field that failed (see monitor.scope).
    out_of_scope_counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cluster_counts = np.zeros(self.n_clusters, dtype=np.int64)
        self.feature_sum = np.zeros(self.n_features, dtype=np.float64)
        self.feature_sumsq = np.zeros(self.n_features, dtype=np.float64)
        self.score_sum = np.zeros(self.n_features, dtype=np.float64)

    @property
    def n_out_of_scope(self) -> int:
        return sum(self.out_of_scope_counts.values())

    def add(
        self,
        cluster: int,
        is_novel: bool,
        failure_probability: float,
        z_features: np.ndarray,
        out_of_scope: str = "",
    ) -> None:
        """Add one image (``z_features``: its profile standardised by the reference;
        ``out_of_scope``: the header field that put it out of scope, empty when in scope)."""
        self.cluster_counts[cluster] += 1
        self.feature_sum += z_features
        self.feature_sumsq += np.square(z_features)
        if self.ranks is not None:
            self.score_sum += self.ranks.scores(z_features)
        self.n += 1
        self.n_novel += int(is_novel)
        self.failure_probability_sum += float(failure_probability)
        if out_of_scope:
            self.out_of_scope_counts[out_of_scope] = self.out_of_scope_counts.get(out_of_scope, 0) + 1

    def remove(
        self,
        cluster: int,
        is_novel: bool,
        failure_probability: float,
        z_features: np.ndarray,
        out_of_scope: str = "",
    ) -> None:
        """Take back one image added earlier (for sliding windows)."""
        self.cluster_counts[cluster] -= 1
        self.feature_sum -= z_features
        self.feature_sumsq -= np.square(z_features)
        if self.ranks is not None:
            self.score_sum -= self.ranks.scores(z_features)
        self.n -= 1
        self.n_novel -= int(is_novel)
        self.failure_probability_sum -= float(failure_probability)
        if out_of_scope:
            left = self.out_of_scope_counts.get(out_of_scope, 0) - 1
            if left > 0:
                self.out_of_scope_counts[out_of_scope] = left
            else:
                self.out_of_scope_counts.pop(out_of_scope, None)


def feature_drift(
    window: WindowStats,
    feature_names: tuple[str, ...] | list[str],
    components: tuple[str, ...] | list[str],
    reference_size: int | None,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> tuple[FeatureDrift, ...]:
    """Per-feature shift of a window, its test and verdict.

    With reference ranks (``window.ranks``, every fitted model) the test is rank-based: the
    window mean normal score ``s`` over its null standard error
    ``sqrt(v * (1 / n + 1 / m))``, where ``v`` is the variance of one image's score under no
    drift and ``1 / m`` the uncertainty of a reference of ``m`` images (a van der Waerden
    two-sample test). Its level holds for any feature distribution, which the mean of a
    heavy-tailed standardised feature does not give in windows of 30-50 (``docs/
    spectral-profile.md``, "Per-feature drift"). The effect size gated by
    ``feature_shift_min`` is ``rank_shift = s`` (reference SDs for a normal feature).

    Without ranks (a hand-built window) it is Welch's test of the standardised mean:
    ``shift / sqrt(s_w**2 / n + 1 / n_ref)`` and ``rank_shift = shift``.
    Two-sided normal p-values, Benjamini–Hochberg across all features.
    """
    n = window.n
    if n == 0:
        return ()
    mean = window.feature_sum / n
    if window.ranks is not None:
        effect = window.score_sum / n
        se = np.sqrt(window.ranks.null_variance_ * (1.0 / n + 1.0 / window.ranks.n_points))
    else:
        effect = mean
        var = np.maximum(window.feature_sumsq / n - np.square(mean), 0.0) * (n / max(n - 1, 1))
        ref_var = 1.0 / reference_size if reference_size else 0.0
        se = np.sqrt(var / n + ref_var)
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = np.where(se > 0, effect / np.where(se > 0, se, 1.0), np.where(effect == 0, 0.0, np.inf))
    p = 2.0 * stats.norm.sf(np.abs(stat))
    q = benjamini_hochberg(p)
    enough = n >= thresholds.min_images
    drifted = enough & (q < thresholds.feature_alpha) & (np.abs(effect) > thresholds.feature_shift_min)
    return tuple(
        FeatureDrift(
            feature=str(feature_names[j]),
            component=str(components[j]),
            shift=float(mean[j]),
            statistic=float(stat[j]),
            p_value=float(p[j]),
            q_value=float(q[j]),
            drifted=bool(drifted[j]),
            rank_shift=float(effect[j]),
        )
        for j in range(mean.size)
    )


def drift_report(
    window: WindowStats,
    reference_mix: Any,
    reference_novelty_rate: float,
    reference_failure_rate: float,
    feature_names: tuple[str, ...] | list[str],
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
    top: int = 5,
    components: tuple[str, ...] | list[str] | None = None,
    reference_size: int | None = None,
) -> DriftReport:
    """Compare a window with the reference.

    Parameters
    ----------
    window : WindowStats
        Features must be standardised by the reference mean and std, so that the
        window mean of a feature is its shift in reference standard deviations.
    reference_mix : array-like of shape (n_clusters,)
        Share of each cluster in the reference set.
    reference_novelty_rate : float
        Share of reference images above the novelty threshold (1 - novelty quantile).
    components : sequence of str, optional
        The component of each feature (``"spectral"`` or ``"intensity"``); default all spectral.
    reference_size : int, optional
        Number of reference images the standardisation was estimated on (for the
        per-feature tests); ``None`` treats the reference mean as exact.
    """
    components = tuple(components) if components is not None else ("spectral",) * len(feature_names)
    q = np.asarray(reference_mix, dtype=np.float64)
    if q.shape != (window.n_clusters,) or not np.isclose(q.sum(), 1.0):
        raise InvalidInputError(f"reference_mix must be {window.n_clusters} shares summing to 1")
    n = window.n
    counts = window.cluster_counts.astype(np.float64)
    if n == 0:
        return DriftReport(
            n_images=0, drift=False, psi=0.0, js_distance=0.0, chi2_p=1.0, novelty_rate=0.0,
            estimated_failure_rate=float("nan"), reference_failure_rate=reference_failure_rate,
            cluster_counts=tuple(int(c) for c in counts), reference_mix=tuple(float(v) for v in q),
            top_shifted_features=(), max_feature_shift=0.0, thresholds=thresholds.to_dict(),
            reasons=("no images",), components=_component_verdicts(False, False, False, False),
        )  # fmt: skip
    p = counts / n
    psi_value = psi(p, q)
    js = float(jensenshannon(p + _EPS, q + _EPS, base=2))
    expected = q * n
    chi2_p = float(
        stats.chisquare(counts, np.maximum(expected, 1e-9) * n / np.maximum(expected, 1e-9).sum()).pvalue
    )
    novelty_rate = window.n_novel / n
    novelty_p = float(
        stats.binomtest(window.n_novel, n, reference_novelty_rate, alternative="greater").pvalue
    )
    shift = window.feature_sum / n
    order = np.argsort(-np.abs(shift))[:top]
    enough = n >= thresholds.min_images
    mix_drift = enough and chi2_p < thresholds.chi2_alpha and psi_value > thresholds.psi_min
    novelty_drift = (
        enough and novelty_rate > thresholds.novelty_rate_min and novelty_p < thresholds.novelty_alpha
    )
    features = feature_drift(window, feature_names, components, reference_size, thresholds)
    moved = [f for f in features if f.drifted and f.component == "intensity"]
    intensity_drift = bool(moved)
    reasons = []
    if mix_drift:
        reasons.append(f"cluster mix shifted (PSI {psi_value:.3f}, chi-square p {chi2_p:.2g})")
    if novelty_drift:
        reasons.append(f"novel images {novelty_rate:.1%} vs {reference_novelty_rate:.1%} expected")
    out_of_scope_rate = window.n_out_of_scope / n
    out_of_scope_drift = enough and out_of_scope_rate > thresholds.out_of_scope_rate_min
    if out_of_scope_drift:
        by_field = ", ".join(f"{k} {v}" for k, v in sorted(window.out_of_scope_counts.items()))
        reasons.append(
            f"out-of-scope images {out_of_scope_rate:.1%} (headers say not a chest radiograph: {by_field})"
        )
    if intensity_drift:
        worst = sorted(moved, key=lambda f: -abs(f.rank_shift))[:3]
        listing = ", ".join(f"{f.feature} {f.shift:+.2f} SD (q {f.q_value:.2g})" for f in worst)
        reasons.append(f"intensity distribution shifted: {listing}")
    if not enough:
        reasons.append(f"fewer than {thresholds.min_images} images: no verdict")
    # The cluster failure rates were measured on the reference: for images outside it (novel)
    # they are extrapolation, and the benchmarks (E3) show the estimate can then be far off.
    # Images outside the model's scope (not chest radiographs) are outside it by definition.
    trusted = (
        novelty_rate <= thresholds.novelty_rate_min and out_of_scope_rate <= thresholds.out_of_scope_rate_min
    )
    if not trusted:
        outside = novelty_rate if novelty_rate > thresholds.novelty_rate_min else out_of_scope_rate
        where = "outside the reference" if outside == novelty_rate else "out of scope"
        reasons.append(f"estimated failure rate not trusted: {outside:.1%} of images are {where}")
    return DriftReport(
        n_images=n,
        drift=bool(mix_drift or novelty_drift or out_of_scope_drift or intensity_drift),
        psi=psi_value,
        js_distance=js,
        chi2_p=chi2_p,
        novelty_rate=novelty_rate,
        estimated_failure_rate=window.failure_probability_sum / n,
        reference_failure_rate=reference_failure_rate,
        cluster_counts=tuple(int(c) for c in counts),
        reference_mix=tuple(float(v) for v in q),
        top_shifted_features=tuple((feature_names[i], float(shift[i])) for i in order),
        max_feature_shift=float(np.abs(shift).max()),
        thresholds=thresholds.to_dict(),
        mix_drift=bool(mix_drift),
        novelty_drift=bool(novelty_drift),
        novelty_p=novelty_p,
        failure_estimate_trusted=bool(trusted),
        reasons=tuple(reasons),
        out_of_scope_rate=out_of_scope_rate,
        out_of_scope_drift=bool(out_of_scope_drift),
        out_of_scope_counts=dict(sorted(window.out_of_scope_counts.items())),
        intensity_drift=intensity_drift,
        components=_component_verdicts(mix_drift, novelty_drift, intensity_drift, out_of_scope_drift),
        feature_drift=features,
    )


def _component_verdicts(mix: bool, novelty: bool, intensity: bool, out_of_scope: bool) -> dict[str, bool]:
    return {
        "cluster_mix": bool(mix),
        "novelty": bool(novelty),
        "intensity": bool(intensity),
        "out_of_scope": bool(out_of_scope),
    }


@dataclass(frozen=True)
class _Entry:
    time: float
    cluster: int
    is_novel: bool
    failure_probability: float
    z_features: np.ndarray
    out_of_scope: str = ""


class SlidingWindow:
    """The last ``max_images`` images seen within ``max_age_seconds`` (either bound optional).

    Not thread-safe: the caller serialises :meth:`add` and :meth:`stats`.
    """

    def __init__(self, n_clusters: int, n_features: int, max_images: int | None = None,
                 max_age_seconds: float | None = None, ranks: ReferenceRanks | None = None) -> None:  # fmt: skip
        if max_images is None and max_age_seconds is None:
            raise InvalidInputError("a sliding window needs max_images, max_age_seconds or both")
        self.max_images = max_images
        self.max_age_seconds = max_age_seconds
        self._entries: deque[_Entry] = deque()
        self._stats = WindowStats(n_clusters, n_features, ranks)

    def add(self, now: float, cluster: int, is_novel: bool, failure_probability: float,
            z_features: np.ndarray, out_of_scope: str = "") -> None:  # fmt: skip
        entry = _Entry(now, cluster, is_novel, failure_probability, np.asarray(z_features, dtype=np.float64),
                       out_of_scope)  # fmt: skip
        self._entries.append(entry)
        self._stats.add(cluster, is_novel, failure_probability, entry.z_features, out_of_scope)
        self.evict(now)

    def evict(self, now: float) -> None:
        """Drop entries beyond the count bound or older than the age bound."""
        while self._entries and (
            (self.max_images is not None and len(self._entries) > self.max_images)
            or (self.max_age_seconds is not None and now - self._entries[0].time > self.max_age_seconds)
        ):
            e = self._entries.popleft()
            self._stats.remove(e.cluster, e.is_novel, e.failure_probability, e.z_features, e.out_of_scope)

    def stats(self, now: float) -> WindowStats:
        """Current statistics (after evicting what has aged out)."""
        self.evict(now)
        return self._stats
