"""Per-cluster failure rates with uncertainty and significance, and score calibration.

:class:`ClusterFailureRates` learns how often the classifier fails in each spectral
cluster (Beta posterior shrunk toward the global rate, Fisher tests with
Benjamini–Hochberg, an overall chi-square and G-test with Cramér's V).
:class:`ClusterCalibrator` turns the classifier's own score into a failure
probability, per cluster, shrunk toward one global calibration.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression

from .errors import InvalidInputError, NotFittedError

__all__ = ["ClusterCalibrator", "ClusterFailureRates", "benjamini_hochberg", "cramers_v", "youden_threshold"]


def benjamini_hochberg(p: Any) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values), same shape as ``p``."""
    p = np.asarray(p, dtype=np.float64)
    n = p.size
    if n == 0:
        return p.copy()
    order = np.argsort(p)
    ranked = p[order] * n / np.arange(1, n + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.clip(q, 0, 1)
    return out


def youden_threshold(labels: Any, scores: Any) -> float:
    """Threshold t maximising Youden's J (TPR - FPR) for the rule ``score >= t``; ties: the lowest t.

    The bundled model's decision rule (models/build_default.py) and the benchmarks'.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or not np.isin(labels, (0, 1)).all() or len(np.unique(labels)) < 2:
        raise InvalidInputError("youden_threshold needs 0/1 labels of both classes, one per score")
    best_t, best_j = 0.5, -np.inf
    for t in np.unique(scores):
        pred = scores >= t
        j = pred[labels == 1].mean() - pred[labels == 0].mean()
        if j > best_j:
            best_t, best_j = float(t), j
    return best_t


def cramers_v(table: np.ndarray) -> float:
    """Cramér's V of a contingency table (rows with no observations dropped)."""
    table = np.asarray(table, dtype=np.float64)
    table = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]
    if min(table.shape) < 2:
        return 0.0
    chi2 = stats.chi2_contingency(table, correction=False)[0]
    return float(np.sqrt(chi2 / table.sum() / (min(table.shape) - 1)))


def _check_labels_failures(labels: Any, failures: Any, n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    failures = np.asarray(failures)
    if labels.ndim != 1 or failures.shape != labels.shape:
        raise InvalidInputError(
            f"labels and failures must be 1-D of one length, got {labels.shape} and {failures.shape}"
        )
    if not np.isin(failures, (0, 1)).all():
        raise InvalidInputError("failures must be 0 or 1")
    if labels.size and (labels.min() < 0 or labels.max() >= n_clusters):
        raise InvalidInputError(
            f"cluster labels must be in [0, {n_clusters}), got {labels.min()}..{labels.max()}"
        )
    return labels.astype(np.intp), failures.astype(np.intp)


class ClusterFailureRates(BaseEstimator):
    """Failure rate of the classifier in each cluster.

    Parameters
    ----------
    n_clusters : int
    prior_strength : float, default=10.0
        Pseudo-observations of the Beta prior centred on the global failure rate: a
        cluster of n images moves n / (n + prior_strength) of the way to its own rate.
    confidence : float, default=0.95
        Central credible interval of the posterior.
    fdr : float, default=0.05
        Benjamini–Hochberg level for the per-cluster Fisher tests.

    Attributes
    ----------
    global_rate_ : float
    counts_, failures_ : ndarray of shape (n_clusters,), dtype=int
    rate_, lower_, upper_ : ndarray of shape (n_clusters,)
        Posterior mean and credible interval.
    lift_ : ndarray of shape (n_clusters,)
        ``rate_ / global_rate_``.
    p_value_, q_value_ : ndarray of shape (n_clusters,)
        Fisher exact test of the cluster against the rest, and its BH adjustment.
    blind_spot_ : ndarray of shape (n_clusters,), dtype=bool
        Clusters whose whole interval lies above the global rate and whose Fisher
        q-value is below ``fdr``.
    chi2_, chi2_p_, g_p_, cramers_v_ : float
        Overall test of independence of cluster and failure.
    """

    def __init__(
        self, n_clusters: int, prior_strength: float = 10.0, confidence: float = 0.95, fdr: float = 0.05
    ):
        self.n_clusters = n_clusters
        self.prior_strength = prior_strength
        self.confidence = confidence
        self.fdr = fdr

    def fit(self, labels: Any, failures: Any) -> ClusterFailureRates:
        """Learn the rates from hard cluster labels and 0/1 failures."""
        labels, failures = _check_labels_failures(labels, failures, self.n_clusters)
        if labels.size == 0:
            raise InvalidInputError("cannot fit failure rates on zero images")
        k = self.n_clusters
        return self.fit_counts(
            np.bincount(labels, minlength=k), np.bincount(labels, weights=failures, minlength=k)
        )

    def fit_counts(self, counts: Any, failures: Any) -> ClusterFailureRates:
        """Learn the rates from per-cluster image and failure counts, each of shape (n_clusters,).

        What :meth:`fit` computes from labels; a fit that streams its profiles sums these
        counts over partitions and never holds every label.
        """
        counts = np.asarray(counts)
        failures = np.asarray(failures)
        if counts.shape != (self.n_clusters,) or failures.shape != counts.shape:
            raise InvalidInputError(
                f"counts and failures must have shape ({self.n_clusters},), got {counts.shape} and {failures.shape}"
            )
        if counts.sum() == 0:
            raise InvalidInputError("cannot fit failure rates on zero images")
        if (failures < 0).any() or (failures > counts).any():
            raise InvalidInputError("failure counts must lie between 0 and the cluster's image count")
        k = self.n_clusters
        self.counts_ = counts.astype(np.intp)
        self.failures_ = failures.astype(np.intp)
        n, f = int(self.counts_.sum()), int(self.failures_.sum())
        self.global_rate_ = f / n
        g = min(max(self.global_rate_, 1e-6), 1 - 1e-6)
        a = self.failures_ + self.prior_strength * g
        b = self.counts_ - self.failures_ + self.prior_strength * (1 - g)
        self.rate_ = a / (a + b)
        tail = (1 - self.confidence) / 2
        self.lower_ = stats.beta.ppf(tail, a, b)
        self.upper_ = stats.beta.ppf(1 - tail, a, b)
        self.lift_ = self.rate_ / max(self.global_rate_, 1e-12)
        p = np.ones(k)
        for c in range(k):
            table = [
                [self.failures_[c], self.counts_[c] - self.failures_[c]],
                [f - self.failures_[c], n - f - (self.counts_[c] - self.failures_[c])],
            ]
            if self.counts_[c] > 0:
                p[c] = stats.fisher_exact(table).pvalue
        self.p_value_ = p
        self.q_value_ = benjamini_hochberg(p)
        # A blind spot needs both: its whole credible interval above the global rate, and
        # enrichment that survives the Benjamini–Hochberg correction across clusters.
        self.blind_spot_ = (self.lower_ > self.global_rate_) & (self.q_value_ < self.fdr)
        table = np.stack([self.counts_ - self.failures_, self.failures_], axis=1)
        nonempty = table[table.sum(axis=1) > 0]
        if nonempty.shape[0] >= 2 and 0 < f < n:
            self.chi2_, self.chi2_p_ = (
                float(v) for v in stats.chi2_contingency(nonempty, correction=False)[:2]
            )
            self.g_p_ = float(stats.chi2_contingency(nonempty, correction=False, lambda_="log-likelihood")[1])
        else:
            self.chi2_, self.chi2_p_, self.g_p_ = 0.0, 1.0, 1.0
        self.cramers_v_ = cramers_v(table)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "rate_"):
            raise NotFittedError(
                "this ClusterFailureRates is not fitted yet: call fit(labels, failures) first"
            )

    def predict_failure(self, memberships: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Expected failure probability under soft memberships.

        Parameters
        ----------
        memberships : ndarray of shape (n_samples, n_clusters)

        Returns
        -------
        probability, lower, upper : ndarray of shape (n_samples,)
            Membership-weighted posterior mean and interval bounds.
        """
        self._check_fitted()
        m = np.asarray(memberships, dtype=np.float64)
        if m.ndim != 2 or m.shape[1] != self.n_clusters:
            raise InvalidInputError(f"memberships must have shape (n, {self.n_clusters}), got {m.shape}")
        return m @ self.rate_, m @ self.lower_, m @ self.upper_

    def to_json(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "params": self.get_params(),
            "global_rate": self.global_rate_,
            "chi2": self.chi2_,
            "chi2_p": self.chi2_p_,
            "g_test_p": self.g_p_,
            "cramers_v": self.cramers_v_,
            "clusters": [
                {
                    "cluster": c,
                    "n_images": int(self.counts_[c]),
                    "n_failures": int(self.failures_[c]),
                    "raw_rate": float(self.failures_[c] / self.counts_[c]) if self.counts_[c] else None,
                    "rate": float(self.rate_[c]),
                    "lower": float(self.lower_[c]),
                    "upper": float(self.upper_[c]),
                    "lift": float(self.lift_[c]),
                    "fisher_p": float(self.p_value_[c]),
                    "fisher_q": float(self.q_value_[c]),
                    "blind_spot": bool(self.blind_spot_[c]),
                }
                for c in range(self.n_clusters)
            ],
        }

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> ClusterFailureRates:
        est = cls(**meta["params"])
        rows = meta["clusters"]
        est.global_rate_ = float(meta["global_rate"])
        est.counts_ = np.array([r["n_images"] for r in rows], dtype=np.intp)
        est.failures_ = np.array([r["n_failures"] for r in rows], dtype=np.intp)
        est.rate_ = np.array([r["rate"] for r in rows])
        est.lower_ = np.array([r["lower"] for r in rows])
        est.upper_ = np.array([r["upper"] for r in rows])
        est.lift_ = np.array([r["lift"] for r in rows])
        est.p_value_ = np.array([r["fisher_p"] for r in rows])
        est.q_value_ = np.array([r["fisher_q"] for r in rows])
        est.blind_spot_ = np.array([r["blind_spot"] for r in rows], dtype=bool)
        est.chi2_, est.chi2_p_ = float(meta["chi2"]), float(meta["chi2_p"])
        est.g_p_, est.cramers_v_ = float(meta["g_test_p"]), float(meta["cramers_v"])
        return est


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


class ClusterCalibrator(BaseEstimator):
    """Probability that the classifier is wrong, from its score and the spectral cluster.

    A logistic model of the true label on ``logit(score)``, with per-cluster
    intercepts and slopes weighted by the soft memberships. Only the per-cluster
    terms carry an L2 penalty (the global terms are scaled so the penalty barely
    touches them), which shrinks each cluster toward the global calibration in
    proportion to how little data it has.

    Parameters
    ----------
    threshold : float
        The classifier's decision threshold: it predicts positive when score >= threshold.
    C : float, default=1.0
        Inverse strength of the shrinkage toward the global calibration.

    Attributes
    ----------
    coef_ : ndarray of shape (1 + 2 * n_clusters,)
    intercept_ : float
    covariance_ : ndarray of shape (2 + 2 * n_clusters, 2 + 2 * n_clusters)
        Approximate posterior covariance of (intercept, coef) (Laplace).
    """

    _GLOBAL_SCALE = 100.0

    def __init__(self, threshold: float = 0.5, C: float = 1.0) -> None:
        self.threshold = threshold
        self.C = C

    def _design(self, scores: np.ndarray, memberships: np.ndarray) -> np.ndarray:
        z = _logit(scores)[:, None]
        return np.hstack([self._GLOBAL_SCALE * z, memberships, memberships * z])

    def fit(self, scores: Any, labels: Any, memberships: Any) -> ClusterCalibrator:
        """Fit on classifier scores in [0, 1], true 0/1 labels, memberships (n, k)."""
        scores, memberships = self._check(scores, memberships)
        labels = np.asarray(labels)
        if labels.shape != scores.shape or not np.isin(labels, (0, 1)).all():
            raise InvalidInputError("labels must be 0/1 with one label per score")
        if len(np.unique(labels)) < 2:
            raise InvalidInputError("calibration needs both positive and negative labels")
        lr = LogisticRegression(C=self.C, max_iter=2000)
        design = self._design(scores, memberships)
        lr.fit(design, labels)
        self.coef_ = lr.coef_.ravel().copy()
        self.intercept_ = float(lr.intercept_[0])
        self.n_clusters_ = memberships.shape[1]
        # Laplace approximation: the inverse Hessian of the penalised log-likelihood at the
        # optimum is the covariance of (intercept, coef), which gives each prediction its interval.
        full, eta = self._linear(design)
        p = _sigmoid(eta)
        hessian = (full * (p * (1 - p))[:, None]).T @ full
        hessian[1:, 1:] += np.eye(design.shape[1]) / self.C
        self.covariance_ = np.linalg.pinv(hessian)
        return self

    def _check(self, scores: Any, memberships: Any) -> tuple[np.ndarray, np.ndarray]:
        scores = np.asarray(scores, dtype=np.float64).ravel()
        memberships = np.asarray(memberships, dtype=np.float64)
        if not np.all(np.isfinite(scores)) or scores.min(initial=0) < 0 or scores.max(initial=0) > 1:
            raise InvalidInputError("classifier scores must be finite probabilities in [0, 1]")
        if memberships.ndim != 2 or memberships.shape[0] != scores.shape[0]:
            raise InvalidInputError(
                f"memberships must have shape ({scores.shape[0]}, n_clusters), got {memberships.shape}"
            )
        return scores, memberships

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise NotFittedError("this ClusterCalibrator is not fitted yet: call fit first")

    def _linear(self, design: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The design with its intercept column, and the linear predictor."""
        full = np.hstack([np.ones((design.shape[0], 1)), design])
        return full, design @ self.coef_ + self.intercept_

    def _checked_design(self, scores: Any, memberships: Any) -> tuple[np.ndarray, np.ndarray]:
        """Validated scores and their design matrix (entry point of every prediction)."""
        self._check_fitted()
        scores, memberships = self._check(scores, memberships)
        if memberships.shape[1] != self.n_clusters_:
            raise InvalidInputError(
                f"memberships must have {self.n_clusters_} columns, got {memberships.shape[1]}"
            )
        return scores, self._design(scores, memberships)

    def predict_positive(self, scores: Any, memberships: Any) -> np.ndarray:
        """Calibrated probability that the true label is positive."""
        _, design = self._checked_design(scores, memberships)
        return _sigmoid(self._linear(design)[1])

    def predict_failure(self, scores: Any, memberships: Any) -> np.ndarray:
        """Probability that the thresholded decision is wrong, shape (n_samples,)."""
        return self.predict_failure_interval(scores, memberships)[0]

    def predict_failure_interval(
        self, scores: Any, memberships: Any, confidence: float = 0.95
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Failure probability and its interval (Laplace approximation), each shape (n_samples,)."""
        scores, design = self._checked_design(scores, memberships)
        full, eta = self._linear(design)
        se = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", full, self.covariance_, full), 0.0))
        z = stats.norm.ppf(0.5 + confidence / 2)
        positive, pos_lo, pos_hi = _sigmoid(eta), _sigmoid(eta - z * se), _sigmoid(eta + z * se)
        decided_positive = scores >= self.threshold
        prob = np.where(decided_positive, 1.0 - positive, positive)
        lower = np.where(decided_positive, 1.0 - pos_hi, pos_lo)
        upper = np.where(decided_positive, 1.0 - pos_lo, pos_hi)
        return prob, lower, upper

    def to_json(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "params": self.get_params(),
            "coef": [float(c) for c in self.coef_],
            "intercept": self.intercept_,
            "n_clusters": self.n_clusters_,
            "covariance": [[float(v) for v in row] for row in self.covariance_],
        }

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> ClusterCalibrator:
        est = cls(**meta["params"])
        est.coef_ = np.asarray(meta["coef"], dtype=np.float64)
        est.intercept_ = float(meta["intercept"])
        est.n_clusters_ = int(meta["n_clusters"])
        est.covariance_ = np.asarray(meta["covariance"], dtype=np.float64)
        return est
