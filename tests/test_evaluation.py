"""Each helper of benchmarks/evaluation.py on a small case with a known answer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import evaluation as ev  # noqa: E402


def test_youden_threshold_separable_scores():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    # every t in (0.3, 0.6] separates perfectly; ties go to the lowest observed score, 0.6
    assert ev.youden_threshold(labels, scores) == 0.6


def test_folds_disjoint_covering_and_stratified():
    strata = np.array([0] * 40 + [1] * 10)
    folds = ev.repeated_stratified_folds(strata, n_splits=5, n_repeats=3, seed=1)
    assert len(folds) == 15
    for rep in range(3):
        tests = [te for r, _f, _tr, te in folds if r == rep]
        joined = np.concatenate(tests)
        assert np.array_equal(np.sort(joined), np.arange(50))  # disjoint and covering
        for te in tests:
            assert strata[te].sum() == 2  # 10 positives over 5 folds
    for _r, _f, tr, te in folds:
        assert np.intersect1d(tr, te).size == 0


def test_out_of_fold_collects_every_image_once_per_repeat():
    folds = ev.repeated_stratified_folds(np.arange(20) % 2, n_splits=4, n_repeats=2)
    out = ev.out_of_fold(
        folds, 20, lambda tr, te: {"idx": te.astype(float), "ntrain": np.full(te.size, tr.size)}
    )
    assert out["idx"].shape == (2, 20)
    assert np.array_equal(out["idx"][0], np.arange(20))
    assert np.all(out["ntrain"] == 15)


def test_cramers_v_perfect_and_independent():
    assert ev.cramers_v([[10, 0], [0, 10]]) == pytest.approx(1.0)
    assert ev.cramers_v([[10, 10], [5, 5]]) == pytest.approx(0.0)
    assert ev.cramers_v([[10, 0], [0, 0]]) == 0.0  # degenerate after dropping empty rows


def test_concentration_known_table():
    groups = np.array(["a"] * 50 + ["b"] * 50)
    failures = np.array([1] * 40 + [0] * 10 + [1] * 10 + [0] * 40)
    c = ev.concentration(groups, failures)
    assert c["n_groups"] == 2
    assert c["global_rate"] == 0.5
    assert c["cramers_v"] == pytest.approx(0.6)  # phi of [[10, 40], [40, 10]]
    assert c["chi2"] == pytest.approx(36.0)
    assert c["chi2_p"] < 1e-8 and c["g_p"] < 1e-8
    a, b = c["groups"]
    assert (a["group"], a["n"], a["failures"], a["rate"]) == ("a", 50, 40, 0.8)
    assert a["lower"] < 0.8 < a["upper"] and 0 < b["lower"] < 0.2 < b["upper"]
    assert c["max_significant_lift"] == pytest.approx(1.6)


def test_concentration_without_signal():
    groups = np.repeat([0, 1, 2], 20)
    failures = np.tile([1, 0, 0, 0], 15)
    c = ev.concentration(groups, failures)
    assert c["cramers_v"] == pytest.approx(0.0)
    assert c["chi2_p"] == pytest.approx(1.0)
    assert c["max_significant_lift"] is None


def test_benjamini_hochberg_matches_hand_computation():
    q = ev.benjamini_hochberg([0.01, 0.04, 0.03, 0.5])
    # sorted p 0.01, 0.03, 0.04, 0.5 -> p * 4 / rank = 0.04, 0.06, 0.0533, 0.5 -> running min from the top
    np.testing.assert_allclose(q, [0.04, 0.16 / 3, 0.16 / 3, 0.5])


def test_random_partition_keeps_sizes():
    groups = np.array([0] * 7 + [1] * 3 + [2] * 10)
    perm = ev.random_partition(groups, np.random.default_rng(0))
    assert np.array_equal(np.bincount(perm), np.bincount(groups))
    assert not np.array_equal(perm, groups)


def test_random_partition_null_flags_an_informative_partition():
    groups = np.repeat([0, 1], 50)
    failures = np.r_[np.ones(30), np.zeros(20), np.ones(5), np.zeros(45)].astype(int)
    res = ev.random_partition_null(groups, failures, n_perm=99, seed=0)
    assert res["empirical_p"] == pytest.approx(0.01)  # no random partition does as well
    assert res["null_v_mean"] < res["observed_v"]


def test_intensity_features_of_known_images():
    const = np.full((8, 8), 3.0)
    f = ev.intensity_features(const)
    assert f.shape == (len(ev.INTENSITY_FEATURE_NAMES),)
    np.testing.assert_allclose(f[:9], [3.0, 0.0] + [3.0] * 7)
    assert f[9] == 0.0
    half = np.r_[np.zeros(50), np.ones(50)].reshape(10, 10)
    g = ev.intensity_features(half)
    assert g[0] == 0.5 and g[1] == 0.5
    assert g[9] == pytest.approx(1.0)  # two equally likely grey levels: 1 bit
    ramp = np.arange(256.0).reshape(16, 16)
    assert ev.intensity_features(ramp)[9] == pytest.approx(8.0)  # 256 distinct levels: 8 bits


def test_age_bands_and_spacing_groups():
    bands = ev.age_bands([5, 30, 44, 45, 59, 60, 74, 75, 90])
    assert list(bands) == ["<30", "30-44", "30-44", "45-59", "45-59", "60-74", "60-74", "75+", "75+"]
    assert list(ev.spacing_groups([0.14300000000000002, 0.143, 0.168])) == ["0.143", "0.143", "0.168"]


def test_group_rate_predictor_shrinks_and_handles_unseen_groups():
    train_g = np.array(["a"] * 10 + ["b"] * 10)
    train_f = np.array([1] * 10 + [0] * 10)
    p = ev.group_rate_predictor(train_g, train_f, np.array(["a", "b", "zz"]), prior_strength=10)
    np.testing.assert_allclose(p, [(10 + 5) / 20, (0 + 5) / 20, 0.5])


def test_auroc_auprc_delong_bootstrap():
    y = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    s = np.array([0.1, 0.3, 0.35, 0.8, 0.4, 0.9, 0.2, 0.7])
    assert ev.auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert ev.auroc(y, np.ones(8)) == 0.5
    assert ev.auprc(y, np.where(y == 1, 1.0, 0.0)) == pytest.approx(1.0)
    d = ev.delong_paired(y, s, s)
    assert d["diff"] == 0.0 and d["p"] == 1.0 and d["auc_a"] == pytest.approx(roc_auc_score(y, s))
    rng = np.random.default_rng(0)
    yy = rng.integers(0, 2, 300)
    good, noise = yy + rng.normal(0, 0.7, 300), rng.random(300)
    d = ev.delong_paired(yy, good, noise)
    assert d["auc_a"] == pytest.approx(roc_auc_score(yy, good))
    assert d["ci_low"] > 0 and d["p"] < 1e-6
    b = ev.bootstrap_auc_difference(yy, good, noise, n_boot=200, seed=0)
    assert b["diff"] == pytest.approx(d["diff"])
    assert 0 < b["ci_low"] < b["diff"] < b["ci_high"]


def test_ami_identical_and_renamed_labels():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert ev.ami(a, a) == pytest.approx(1.0)
    assert ev.ami(a, np.array(["x", "x", "y", "y", "z", "z"])) == pytest.approx(1.0)
    assert ev.ami(np.repeat([0, 1], 500), np.tile([0, 1], 500)) == pytest.approx(0.0, abs=0.01)
