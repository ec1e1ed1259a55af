"""Tests for benchmarks/drift_baselines.py: KS on statistics and the MMD permutation test."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.drift_baselines import (  # noqa: E402
    INTENSITY_STATISTICS,
    KSReference,
    intensity_statistics,
    ks_drift_test,
    median_bandwidth,
    mmd_permutation_test,
    mmd_permutation_test_kernel,
    rbf_kernel,
    thumbnail,
)


def test_ks_detects_shifted_gaussian_not_identical() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(400, 5))
    same = rng.normal(size=(60, 5))
    shifted = same.copy()
    shifted[:, 2] += 1.0
    p_same, per_same = ks_drift_test(same, ref)
    p_shift, per_shift = ks_drift_test(shifted, ref)
    assert p_same > 0.05
    assert p_shift < 1e-3
    assert np.argmin(per_shift) == 2
    assert p_shift == pytest.approx(min(1.0, 5 * per_shift.min()))


def test_ks_false_alarm_rate_near_nominal() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(300, 4))
    p = np.array([ks_drift_test(rng.normal(size=(50, 4)), ref)[0] for _ in range(200)])
    assert np.mean(p < 0.05) <= 0.08  # Bonferroni is conservative


def test_mmd_known_small_case() -> None:
    # One point each at distance 1, sigma 1: MMD² = k(0,0) + k(1,1) - 2 k(0,1) = 2 - 2 exp(-1/2).
    K = rbf_kernel(np.array([[0.0], [1.0]]), np.array([[0.0], [1.0]]), 1.0)
    mmd2, p = mmd_permutation_test_kernel(K, 1, n_permutations=50, seed=0)
    assert mmd2 == pytest.approx(2 - 2 * np.exp(-0.5))
    assert 0 < p <= 1
    assert median_bandwidth(np.array([[0.0], [1.0], [3.0]])) == pytest.approx(2.0)


def test_mmd_same_distribution_large_p_shifted_small_p() -> None:
    rng = np.random.default_rng(0)
    ps = []
    for _ in range(20):
        X = rng.normal(size=(40, 8))
        Y = rng.normal(size=(60, 8))
        ps.append(mmd_permutation_test(X, Y, n_permutations=100, seed=int(rng.integers(1 << 30)))[1])
    ps = np.array(ps)
    # Under the null the permutation p-value is (nearly) uniform.
    assert 0.3 < ps.mean() < 0.7
    assert np.mean(ps < 0.05) <= 0.15
    X = rng.normal(size=(40, 8))
    Y = rng.normal(size=(60, 8)) + np.r_[0.8, np.zeros(7)]
    mmd2, p = mmd_permutation_test(X, Y, n_permutations=200, seed=0)
    assert p < 0.01 and mmd2 > 0


def test_mmd_deterministic_for_seed() -> None:
    rng = np.random.default_rng(5)
    X, Y = rng.normal(size=(20, 3)), rng.normal(size=(25, 3))
    assert mmd_permutation_test(X, Y, seed=7) == mmd_permutation_test(X, Y, seed=7)


def test_intensity_statistics_and_thumbnail() -> None:
    x = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    s = intensity_statistics(x)
    assert s.shape == (len(INTENSITY_STATISTICS),)
    assert s[0] == pytest.approx(127.5 / 255)
    assert s[INTENSITY_STATISTICS.index("entropy")] == pytest.approx(8.0)  # 256 equally full bins
    t = thumbnail(np.arange(64 * 96, dtype=np.float32).reshape(64, 96) % 96, size=8)
    assert t.shape == (64,)
    # Centre crop columns 16..79, averaged in blocks of 8: block means 19.5, 27.5, ... in units of 255.
    np.testing.assert_allclose(t.reshape(8, 8)[0], (np.arange(8) * 8 + 16 + 3.5) / 255, rtol=1e-5)
    # Non-divisible size: exact area weights (3 pixels onto 2: weights 1, 0.5 | 0.5, 1).
    cols = np.tile(np.arange(3, dtype=np.float32), (3, 1))
    np.testing.assert_allclose(
        thumbnail(cols, size=2, max_value=1.0).reshape(2, 2)[0], [1 / 3, 5 / 3], rtol=1e-6
    )
    with pytest.raises(ValueError, match="must be \\(n, m\\) and \\(N, m\\)"):
        ks_drift_test(np.zeros((3, 2)), np.zeros((5, 3)))


def test_ks_reference_gives_the_same_p_values_as_ks_drift_test() -> None:
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(310, 4))
    ks = KSReference(reference)
    for n in (30, 50, 100):
        for shift in (0.0, 0.3):
            window = rng.normal(size=(n, 4)) + shift
            p, per = ks.test(window)
            p_ref, per_ref = ks_drift_test(window, reference)
            assert p == pytest.approx(p_ref, abs=1e-12)
            np.testing.assert_allclose(per, per_ref, atol=1e-12)
