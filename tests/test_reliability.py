"""Tests for monitor.reliability: shrunk failure rates, tests of association, BH, per-cluster calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from monitor.errors import InvalidInputError, NotFittedError
from monitor.reliability import ClusterCalibrator, ClusterFailureRates, benjamini_hochberg, cramers_v


def _table(counts: list[int], fails: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Hard labels and 0/1 failures realising a per-cluster (count, failures) table."""
    labels = np.repeat(np.arange(len(counts)), counts)
    failures = np.concatenate(
        [np.r_[np.ones(f, int), np.zeros(n - f, int)] for n, f in zip(counts, fails, strict=True)]
    )
    return labels, failures


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


# --------------------------------------------------------------------------- failure rates


def test_posterior_mean_on_known_table() -> None:
    counts, fails = [50, 30, 20], [5, 15, 2]
    est = ClusterFailureRates(n_clusters=3, prior_strength=10.0).fit(*_table(counts, fails))
    g = 22 / 100
    assert est.global_rate_ == pytest.approx(g)
    expected = [(f + 10 * g) / (n + 10) for n, f in zip(counts, fails, strict=True)]
    np.testing.assert_allclose(est.rate_, expected, rtol=1e-12)
    np.testing.assert_allclose(est.rate_, [7.2 / 60, 17.2 / 40, 4.2 / 30], rtol=1e-12)
    assert est.counts_.tolist() == counts and est.failures_.tolist() == fails
    np.testing.assert_allclose(est.lift_, est.rate_ / g)


@pytest.mark.parametrize("m", [0.0001, 1.0, 50.0])
def test_prior_strength_shrinks_toward_global(m: float) -> None:
    est = ClusterFailureRates(n_clusters=2, prior_strength=m).fit(*_table([40, 60], [20, 6]))
    g = 26 / 100
    np.testing.assert_allclose(est.rate_, [(20 + m * g) / (40 + m), (6 + m * g) / (60 + m)])


def test_interval_contains_rate_and_narrows_with_n() -> None:
    widths = []
    for scale in (1, 10, 100):
        est = ClusterFailureRates(n_clusters=2).fit(*_table([20 * scale, 80 * scale], [4 * scale, 8 * scale]))
        assert np.all(est.lower_ < est.rate_) and np.all(est.rate_ < est.upper_)
        assert np.all((est.lower_ >= 0) & (est.upper_ <= 1))
        widths.append(est.upper_ - est.lower_)
    widths = np.array(widths)
    assert np.all(np.diff(widths, axis=0) < 0)


def test_interval_is_the_beta_credible_interval() -> None:
    est = ClusterFailureRates(n_clusters=2, prior_strength=4.0, confidence=0.9).fit(*_table([30, 70], [9, 7]))
    g = 16 / 100
    a, b = 9 + 4 * g, 21 + 4 * (1 - g)
    assert est.lower_[0] == pytest.approx(stats.beta.ppf(0.05, a, b))
    assert est.upper_[0] == pytest.approx(stats.beta.ppf(0.95, a, b))


def test_strongly_enriched_cluster_is_a_blind_spot() -> None:
    est = ClusterFailureRates(n_clusters=3).fit(*_table([150, 50, 100], [10, 40, 12]))
    expected = stats.fisher_exact([[40, 10], [22, 228]]).pvalue
    assert est.p_value_[1] == pytest.approx(expected)
    assert est.p_value_[1] < 1e-15
    assert est.q_value_[1] < 1e-10
    assert est.blind_spot_.tolist() == [False, True, False]
    assert est.lower_[1] > est.global_rate_
    assert est.chi2_p_ < 1e-15 and est.g_p_ < 1e-15
    # scipy's chi-square on the same 2 x k table (no continuity correction).
    chi2, p = stats.chi2_contingency([[140, 10], [10, 40], [88, 12]], correction=False)[:2]
    assert est.chi2_ == pytest.approx(chi2) and est.chi2_p_ == pytest.approx(p)


def test_independent_table() -> None:
    est = ClusterFailureRates(n_clusters=2).fit(*_table([100, 100], [20, 20]))
    assert est.chi2_ == pytest.approx(0.0, abs=1e-12)
    assert est.chi2_p_ == pytest.approx(1.0) and est.g_p_ == pytest.approx(1.0)
    assert est.cramers_v_ == pytest.approx(0.0, abs=1e-12)
    assert est.p_value_.tolist() == pytest.approx([1.0, 1.0])
    assert not est.blind_spot_.any()


def test_no_failures_at_all() -> None:
    est = ClusterFailureRates(n_clusters=2).fit(*_table([30, 30], [0, 0]))
    assert est.global_rate_ == 0.0
    assert est.chi2_p_ == 1.0 and est.cramers_v_ == 0.0
    assert np.all(np.isfinite(est.rate_)) and np.all(est.rate_ < 1e-5)
    assert est.p_value_.tolist() == [1.0, 1.0]


def test_no_failures_means_no_blind_spot() -> None:
    est = ClusterFailureRates(n_clusters=2).fit(*_table([30, 30], [0, 0]))
    assert not est.blind_spot_.any()


def test_empty_cluster_keeps_prior() -> None:
    labels, failures = _table([50, 50], [10, 30])
    est = ClusterFailureRates(n_clusters=3).fit(labels, failures)
    assert est.counts_[2] == 0
    assert est.rate_[2] == pytest.approx(est.global_rate_)
    assert est.p_value_[2] == 1.0
    assert est.to_json()["clusters"][2]["raw_rate"] is None


def test_cramers_v_bounds() -> None:
    assert cramers_v(np.array([[50, 0], [0, 50]])) == pytest.approx(1.0)
    assert cramers_v(np.array([[25, 25], [25, 25]])) == pytest.approx(0.0)
    assert cramers_v(np.array([[10, 0], [0, 0]])) == 0.0  # one row left after dropping empties
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = cramers_v(rng.integers(0, 30, size=(rng.integers(2, 6), 2)))
        assert 0.0 <= v <= 1.0 + 1e-12


@pytest.mark.parametrize(
    ("p", "q"),
    [
        ([0.01, 0.04, 0.03, 0.005], [0.02, 0.04, 0.04, 0.02]),
        # The step-up minimum: 0.03 * 3 / 2 = 0.045 is lowered to the next rank's 0.04.
        ([0.04, 0.01, 0.03], [0.04, 0.03, 0.04]),
        ([0.5], [0.5]),
        ([0.9, 0.95], [0.95, 0.95]),
    ],
)
def test_benjamini_hochberg_hand_computed(p: list[float], q: list[float]) -> None:
    np.testing.assert_allclose(benjamini_hochberg(p), q, rtol=1e-12)
    np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p), rtol=1e-12)


def test_benjamini_hochberg_empty_and_clipped() -> None:
    assert benjamini_hochberg([]).shape == (0,)
    assert np.all(benjamini_hochberg(np.linspace(0.5, 1, 7)) <= 1.0)


def test_predict_failure_is_membership_weighted() -> None:
    est = ClusterFailureRates(n_clusters=2).fit(*_table([40, 60], [20, 6]))
    m = np.array([[1.0, 0.0], [0.0, 1.0], [0.25, 0.75]])
    p, lo, hi = est.predict_failure(m)
    np.testing.assert_allclose(p, [est.rate_[0], est.rate_[1], 0.25 * est.rate_[0] + 0.75 * est.rate_[1]])
    np.testing.assert_allclose(lo, m @ est.lower_)
    np.testing.assert_allclose(hi, m @ est.upper_)
    with pytest.raises(InvalidInputError, match=r"memberships must have shape \(n, 2\), got \(3,\)"):
        est.predict_failure(np.ones(3))


def test_failure_rates_validation() -> None:
    est = ClusterFailureRates(n_clusters=2)
    with pytest.raises(
        InvalidInputError, match=r"labels and failures must be 1-D of one length, got \(3,\) and \(2,\)"
    ):
        est.fit([0, 1, 1], [0, 1])
    with pytest.raises(InvalidInputError, match="failures must be 0 or 1"):
        est.fit([0, 1], [0, 2])
    with pytest.raises(InvalidInputError, match=r"cluster labels must be in \[0, 2\), got 0\.\.2"):
        est.fit([0, 2], [0, 1])
    with pytest.raises(InvalidInputError, match="cannot fit failure rates on zero images"):
        est.fit([], [])
    with pytest.raises(NotFittedError, match=r"not fitted yet: call fit\(labels, failures\) first"):
        est.predict_failure(np.ones((1, 2)))


def test_failure_rates_json_round_trip() -> None:
    est = ClusterFailureRates(n_clusters=3, prior_strength=5.0).fit(*_table([150, 50, 100], [10, 40, 12]))
    doc = json.loads(json.dumps(est.to_json()))
    back = ClusterFailureRates.from_json(doc)
    assert back.get_params() == est.get_params()
    for name in ("counts_", "failures_", "rate_", "lower_", "upper_", "lift_", "p_value_", "q_value_",
                 "blind_spot_"):  # fmt: skip
        assert np.array_equal(getattr(back, name), getattr(est, name)), name
    for name in ("global_rate_", "chi2_", "chi2_p_", "g_p_", "cramers_v_"):
        assert getattr(back, name) == getattr(est, name), name
    m = np.random.default_rng(0).dirichlet(np.ones(3), size=5)
    for a, b in zip(back.predict_failure(m), est.predict_failure(m), strict=True):
        assert np.array_equal(a, b)


# --------------------------------------------------------------------------- calibration


def _calibration_data(n: int, seed: int, inverted_cluster: bool):
    """Scores, labels, memberships (2 clusters) and the decision threshold 0.5.

    Cluster 0: the score is informative (label ~ sigmoid(3 logit s)). Cluster 1: if
    ``inverted_cluster``, the score points the wrong way (label ~ sigmoid(-3 logit s)).
    """
    rng = np.random.default_rng(seed)
    scores = np.clip(rng.beta(1.2, 1.2, size=n), 0.01, 0.99)
    cluster = (rng.random(n) < 0.4).astype(int)
    slope = np.where((cluster == 1) & inverted_cluster, -3.0, 3.0)
    labels = (rng.random(n) < _sigmoid(slope * _logit(scores))).astype(int)
    memberships = np.eye(2)[cluster] * 0.98 + 0.01
    return scores, labels, memberships


def test_single_cluster_is_logistic_calibration() -> None:
    rng = np.random.default_rng(1)
    scores = np.clip(rng.beta(2, 2, size=3000), 0.001, 0.999)
    labels = (rng.random(3000) < _sigmoid(2.0 * _logit(scores) - 0.5)).astype(int)
    ones = np.ones((3000, 1))
    cal = ClusterCalibrator(threshold=0.5).fit(scores, labels, ones)
    reference = LogisticRegression(C=1e6, max_iter=2000).fit(_logit(scores)[:, None], labels)
    grid = np.linspace(0.02, 0.98, 25)
    expected = reference.predict_proba(_logit(grid)[:, None])[:, 1]
    np.testing.assert_allclose(cal.predict_positive(grid, np.ones((25, 1))), expected, atol=2e-3)
    # And it recovers the generating calibration (slope 2, intercept -0.5) up to sampling noise.
    np.testing.assert_allclose(cal.predict_positive(grid, np.ones((25, 1))), _sigmoid(2 * _logit(grid) - 0.5),
                               atol=0.06)  # fmt: skip


def test_per_cluster_calibration_beats_global_when_a_cluster_is_inverted() -> None:
    s_fit, y_fit, m_fit = _calibration_data(3000, seed=2, inverted_cluster=True)
    s_new, y_new, m_new = _calibration_data(3000, seed=3, inverted_cluster=True)
    failures = ((s_new >= 0.5).astype(int) != y_new).astype(int)
    per_cluster = ClusterCalibrator(threshold=0.5).fit(s_fit, y_fit, m_fit)
    global_only = ClusterCalibrator(threshold=0.5).fit(s_fit, y_fit, np.ones((len(s_fit), 1)))
    auc_cluster = roc_auc_score(failures, per_cluster.predict_failure(s_new, m_new))
    auc_global = roc_auc_score(failures, global_only.predict_failure(s_new, np.ones((len(s_new), 1))))
    assert auc_cluster > 0.75
    assert auc_cluster > auc_global + 0.1


def test_predict_failure_semantics() -> None:
    s, y, m = _calibration_data(2000, seed=4, inverted_cluster=False)
    cal = ClusterCalibrator(threshold=0.3).fit(s, y, m)
    scores = np.array([0.1, 0.29, 0.3, 0.31, 0.9])
    memberships = np.tile([[0.99, 0.01]], (5, 1))
    positive = cal.predict_positive(scores, memberships)
    failure = cal.predict_failure(scores, memberships)
    decided_positive = scores >= 0.3  # the threshold itself decides positive
    np.testing.assert_allclose(failure, np.where(decided_positive, 1 - positive, positive))
    assert failure[2] == pytest.approx(1 - positive[2])
    assert np.all((failure >= 0) & (failure <= 1))


def test_calibrator_json_round_trip() -> None:
    s, y, m = _calibration_data(500, seed=5, inverted_cluster=True)
    cal = ClusterCalibrator(threshold=0.4, C=0.5).fit(s, y, m)
    back = ClusterCalibrator.from_json(json.loads(json.dumps(cal.to_json())))
    assert back.get_params() == cal.get_params()
    assert np.array_equal(back.predict_failure(s, m), cal.predict_failure(s, m))


def test_calibrator_validation() -> None:
    s, y, m = _calibration_data(100, seed=6, inverted_cluster=False)
    cal = ClusterCalibrator()
    with pytest.raises(NotFittedError, match="this ClusterCalibrator is not fitted yet: call fit first"):
        cal.predict_failure(s, m)
    with pytest.raises(
        InvalidInputError, match=r"classifier scores must be finite probabilities in \[0, 1\]"
    ):
        cal.fit(np.r_[s[:-1], 1.5], y, m)
    with pytest.raises(
        InvalidInputError, match=r"classifier scores must be finite probabilities in \[0, 1\]"
    ):
        cal.fit(np.r_[s[:-1], np.nan], y, m)
    with pytest.raises(InvalidInputError, match="labels must be 0/1 with one label per score"):
        cal.fit(s, np.r_[y[:-1], 2], m)
    with pytest.raises(InvalidInputError, match="labels must be 0/1 with one label per score"):
        cal.fit(s, y[:-1], m)
    with pytest.raises(InvalidInputError, match="calibration needs both positive and negative labels"):
        cal.fit(s, np.zeros_like(y), m)
    with pytest.raises(
        InvalidInputError, match=r"memberships must have shape \(100, n_clusters\), got \(99, 2\)"
    ):
        cal.fit(s, y, m[:-1])
    cal.fit(s, y, m)
    with pytest.raises(InvalidInputError, match="memberships must have 2 columns, got 3"):
        cal.predict_failure(s, np.ones((100, 3)) / 3)


def test_calibrator_to_json_before_fit() -> None:
    with pytest.raises(NotFittedError, match="this ClusterCalibrator is not fitted yet"):
        ClusterCalibrator().to_json()


def test_youden_threshold_known_answer() -> None:
    from monitor.reliability import youden_threshold

    # Separable at 0.6: every threshold in (0.4, 0.6] gives J = 1; the rule picks the lowest score that does.
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.4, 0.6, 0.9]) == 0.6
    # Overlap: t = 0.3 gives TPR 1, FPR 0.5 (J 0.5); t = 0.7 gives TPR 0.5, FPR 0 (J 0.5): ties go low.
    assert youden_threshold([0, 0, 1, 1], [0.2, 0.5, 0.3, 0.7]) == 0.3
    with pytest.raises(InvalidInputError, match="needs 0/1 labels of both classes"):
        youden_threshold([1, 1], [0.2, 0.3])
