"""The helpers of benchmarks/novelty_splits.py on synthetic cases with a known answer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import novelty_splits as ns  # noqa: E402

NAMES = [f"f{i}" for i in range(6)]


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # As the benchmark runs: tiny matrices, where BLAS threads under contention cost ~20x.
    with threadpool_limits(limits=1):
        yield


def _reference(seed: int = 0, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Two known groups, 4 SD apart along feature 0, unit noise elsewhere."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6))
    groups = np.where(np.arange(n) % 2 == 0, "a", "b")
    X[groups == "b", 0] += 4.0
    return X, groups


def test_tpr_at_fpr_counts_positives_above_the_negative_quantile():
    negatives = np.arange(100.0)  # 98th percentile 97.02
    assert ns.tpr_at_fpr(negatives, np.array([97.0, 98.0, 99.0, 200.0])) == 0.75


@pytest.mark.parametrize("method", [*ns.METHODS])
def test_every_score_ranks_a_far_point_above_the_reference(method):
    R, _ = _reference()
    H, _ = _reference(seed=1, n=100)
    far = np.full((1, 6), 12.0)
    acq = np.array([3, 4, 5])
    score = ns.fit_scorer(R, method, n_spectral=4, acq=acq)
    assert score(far)[0] > score(H).max()


def test_group_scorer_is_near_zero_at_a_known_group_and_large_between_groups_in_a_new_direction():
    R, groups = _reference()
    score = ns.fit_group_scorer(R, groups)
    centre_a = R[groups == "a"].mean(axis=0, keepdims=True)
    new = centre_a.copy()
    new[0, 3] += 8.0
    assert score(centre_a)[0] < 1.0
    assert score(new)[0] > 5.0


def test_held_out_threshold_flags_about_one_percent_of_new_reference_images():
    rng = np.random.default_rng(3)
    R = rng.normal(size=(1000, 6))
    fresh = rng.normal(size=(5000, 6))
    fit = lambda Rt, _i: ns.fit_scorer(Rt, "knn5", 4, np.array([0]))  # noqa: E731
    thr = ns.held_out_threshold(R, fit)
    assert 0.003 < np.mean(ns.fit_scorer(R, "knn5", 4, np.array([0]))(fresh) > thr) < 0.025


def test_domain_analysis_tells_a_blend_of_known_groups_from_a_new_direction():
    R, groups = _reference()
    H, _ = _reference(seed=1, n=200)
    rng = np.random.default_rng(2)
    blend = rng.normal(size=(150, 6))
    blend[:, 0] += 2.0  # halfway between the groups' means: interpolation
    new = rng.normal(size=(150, 6))
    new[:, 3] += 4.0  # a direction no known group differs in
    a = ns.domain_analysis(R, H, blend, NAMES, groups)
    b = ns.domain_analysis(R, H, new, NAMES, groups)
    # The blend sits at the reference centre; the new group is ~4 SD away in both senses.
    assert a["delta"] < 0.5 and a["hull_distance"] < 0.5
    assert b["delta"] > 3.0 and b["hull_distance"] == pytest.approx(b["delta"], rel=0.15)
    assert b["top_shifts"][0][0] == "f3"
    assert b["supervised_tpr"] > 0.8 > a["supervised_tpr"]
    # The Gaussian omnibus rate is the noncentral chi-square tail at the 1 % threshold.
    crit = stats.chi2.ppf(ns.QUANTILE, 6)
    assert b["gaussian_omnibus_tpr"] == pytest.approx(stats.ncx2.sf(crit, 6, b["delta"] ** 2))
    assert a["known_group_separation"] == pytest.approx(4.0 / R[:, 0].std(), rel=0.2)


def test_delta_for_inverts_the_noncentral_chi_square():
    d = ns._delta_for(0.8, 42)
    crit = stats.chi2.ppf(ns.QUANTILE, 42)
    assert stats.ncx2.sf(crit, 42, d**2) == pytest.approx(0.8, abs=1e-6)
    assert 5.5 < d < 6.5


def test_best_calibrated_respects_the_false_positive_target():
    row = {m: {"held_out_flagged": 0.01, "other_flagged": 0.05, "tpr_at_2pct_fpr": 0.1} for m in ns.METHODS}
    row["maxz"] = {"held_out_flagged": 0.05, "other_flagged": 0.9, "tpr_at_2pct_fpr": 0.9}
    row["lof"] = {"held_out_flagged": 0.02, "other_flagged": 0.3, "tpr_at_2pct_fpr": 0.2}
    assert ns.best_calibrated(row) == "lof"


def test_window_detection_flags_a_mean_shift_and_not_the_reference():
    rng = np.random.default_rng(4)
    R = rng.normal(size=(400, 6))
    H = rng.normal(size=(200, 6))
    other = rng.normal(size=(60, 6))
    other[:, 2] += 1.5
    out = ns.window_detection(R, H, other)
    assert out["other_windows_flagged"] == 1.0
    assert out["held_out_windows_flagged"] <= 0.04
