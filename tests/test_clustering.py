"""Tests for monitor.clustering: BIC model selection, memberships, novelty, validation, state round trip."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.clustering import SpectralClusterer, check_profiles
from monitor.errors import InvalidInputError, NotFittedError


def _blobs(k: int, n_per: int | list[int], d: int = 6, sep: float = 12.0, seed: int = 0):
    """Well-separated Gaussian blobs: (X, true labels)."""
    rng = np.random.default_rng(seed)
    sizes = [n_per] * k if isinstance(n_per, int) else n_per
    centres = rng.normal(size=(k, d)) * sep
    X = np.vstack([c + rng.normal(size=(m, d)) for c, m in zip(centres, sizes, strict=True)])
    return X, np.repeat(np.arange(k), sizes), centres


@pytest.fixture(scope="module")
def three():
    X, y, centres = _blobs(3, 100, seed=3)
    return SpectralClusterer(k_range=(2, 6), n_init=1, random_state=1).fit(X), X, y, centres


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Labels equal up to a renaming of clusters."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# --------------------------------------------------------------------------- fit


def test_fit_is_deterministic_for_a_seed() -> None:
    X, _, _ = _blobs(3, 60, seed=11)
    a = SpectralClusterer(k_range=(2, 5), n_init=2, random_state=7).fit(X)
    b = SpectralClusterer(k_range=(2, 5), n_init=2, random_state=7).fit(X)
    for name, arr in a.to_arrays().items():
        assert np.array_equal(arr, b.to_arrays()[name]), name
    assert a.to_json() == b.to_json()
    assert np.array_equal(a.labels_, b.labels_)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_auto_k_finds_true_k(k: int) -> None:
    X, y, _ = _blobs(k, 80, seed=k)
    est = SpectralClusterer(k_range=(2, 7), n_init=1).fit(X)
    assert est.n_clusters_ == k
    assert set(est.bic_) == set(range(2, 8))
    assert min(est.bic_, key=est.bic_.get) == k
    assert _same_partition(est.labels_, y)


def test_clusters_ordered_by_size() -> None:
    X, _, _ = _blobs(3, [40, 150, 90], seed=5)
    est = SpectralClusterer(n_clusters=3, n_init=1).fit(X)
    sizes = np.bincount(est.labels_, minlength=3)
    assert sizes.tolist() == [150, 90, 40]


def test_min_cluster_size_excludes_k() -> None:
    X, _, _ = _blobs(3, [150, 150, 8], seed=2)
    loose = SpectralClusterer(k_range=(2, 3), min_cluster_size=0.01, n_init=1).fit(X)
    assert loose.n_clusters_ == 3
    # 8 points < ceil(0.05 * 308) = 16: k = 3 is ruled out and recorded as infinite BIC.
    strict = SpectralClusterer(k_range=(2, 3), min_cluster_size=0.05, n_init=1).fit(X)
    assert strict.n_clusters_ == 2
    assert strict.bic_[3] == float("inf")
    assert np.isfinite(strict.bic_[2])
    assert strict.to_json()["bic"]["3"] is None
    # An absolute count works the same way.
    assert SpectralClusterer(k_range=(2, 3), min_cluster_size=9, n_init=1).fit(X).n_clusters_ == 2


def test_no_candidate_large_enough() -> None:
    X, _, _ = _blobs(3, [150, 150, 8], seed=2)
    with pytest.raises(
        InvalidInputError, match=r"no candidate k in \[3\] gives clusters of at least 20 images; lower"
    ):
        SpectralClusterer(n_clusters=3, min_cluster_size=20, n_init=1).fit(X)


def test_fixed_k() -> None:
    X, _, _ = _blobs(2, 50, seed=4)
    est = SpectralClusterer(n_clusters=4, n_init=1, min_cluster_size=1).fit(X)
    assert est.n_clusters_ == 4
    assert list(est.bic_) == [4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_clusters": 0}, r"n_clusters must be 'auto' or a positive int, got 0"),
        ({"n_clusters": "three"}, r"n_clusters must be 'auto' or a positive int, got 'three'"),
        ({"k_range": (5, 2)}, r"k_range must be \(lo, hi\) with 1 <= lo <= hi, got \(5, 2\)"),
        ({"k_range": (0, 2)}, r"k_range must be \(lo, hi\) with 1 <= lo <= hi, got \(0, 2\)"),
    ],
)
def test_parameter_validation(kwargs: dict, message: str) -> None:
    X, _, _ = _blobs(2, 30)
    with pytest.raises(InvalidInputError, match=message):
        SpectralClusterer(**kwargs).fit(X)


def test_too_few_profiles() -> None:
    X, _, _ = _blobs(1, 9)
    with pytest.raises(InvalidInputError, match="need at least 10 profiles to fit, got 9"):
        SpectralClusterer(n_clusters=2).fit(X)


# --------------------------------------------------------------------------- predictions


def test_predict_proba_rows_sum_to_one(three) -> None:
    est, X, y, _ = three
    proba = est.predict_proba(X)
    assert proba.shape == (X.shape[0], est.n_clusters_)
    assert np.all(proba >= 0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    assert np.array_equal(est.predict(X), proba.argmax(axis=1))
    assert _same_partition(est.predict(X), y)


def test_assess_agrees_with_the_separate_methods(three) -> None:
    est, X, _, centres = three
    far = np.vstack([X, centres * 3, X[:5] + 40.0])  # in the clusters, between them, far outside
    Z, proba, loglik, novelty, distance = est.assess(far)
    np.testing.assert_array_equal(Z, est.standardise(far))
    np.testing.assert_allclose(proba, est.predict_proba(far), rtol=0, atol=1e-12)
    np.testing.assert_allclose(loglik, est.score_samples(far), rtol=1e-12, atol=1e-9)
    share, dist = est.novelty(far)
    np.testing.assert_array_equal(novelty, share)
    np.testing.assert_array_equal(distance, dist)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)


def test_transform_and_standardise_shapes(three) -> None:
    est, X, _, _ = three
    Z = est.standardise(X)
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(Z.std(axis=0), 1.0, atol=1e-10)
    assert est.transform(X).shape == (X.shape[0], est.components_.shape[0])
    assert est.score_samples(X).shape == (X.shape[0],)


def test_single_profile_is_accepted(three) -> None:
    est, X, _, _ = three
    assert est.predict_proba(X[0]).shape == (1, est.n_clusters_)


def test_far_point_is_novel(three) -> None:
    est, X, _, centres = three
    far = X.mean(axis=0) + 50 * X.std(axis=0)
    novelty, distance = est.novelty(far)
    assert novelty[0] == 1.0
    assert distance[0] > est.novelty_threshold_
    assert distance[0] > est.reference_distances_[-1]


def test_reference_novelty_scale(three) -> None:
    est, _, _, _ = three
    ref = est.reference_distances_
    assert np.all(np.diff(ref) >= 0)
    assert est.novelty_threshold_ == pytest.approx(np.quantile(ref, est.novelty_quantile))
    # About 1% of the reference lies above its own 0.99 quantile.
    assert np.mean(ref > est.novelty_threshold_) == pytest.approx(0.01, abs=0.005)


def test_new_in_distribution_points_rarely_novel(three) -> None:
    """Fresh draws of the reference distribution: about 1 - novelty_quantile of them are novel."""
    est, X, y, centres = three
    rng = np.random.default_rng(99)
    fresh = np.vstack([c + rng.normal(size=(1000, X.shape[1])) for c in centres])
    novelty, distance = est.novelty(fresh)
    share = float(np.mean(novelty > est.novelty_quantile))
    assert 0.002 <= share <= 0.03, share
    novel = novelty > est.novelty_quantile
    assert np.all(distance[novel] > est.novelty_threshold_)


def test_novelty_monotone_in_distance(three) -> None:
    est, X, _, _ = three
    direction = X.std(axis=0)
    points = X.mean(axis=0) + np.outer(np.linspace(0, 30, 16), direction)
    novelty, distance = est.novelty(points)
    assert np.all(np.diff(distance) > 0)
    assert np.all(np.diff(novelty) >= 0)
    assert novelty[-1] == 1.0


# --------------------------------------------------------------------------- validation


NOT_FITTED = r"this SpectralClusterer is not fitted yet: call fit\(X\) first"


@pytest.mark.parametrize(
    "method",
    [
        "novelty",
        "transform",
        "standardise",
        "to_arrays",
        "to_json",
        "predict",
        "predict_proba",
        "score_samples",
    ],
)
def test_not_fitted_errors(method: str) -> None:
    est = SpectralClusterer()
    args = () if method.startswith("to_") else (np.zeros((3, 4)),)
    with pytest.raises(NotFittedError, match=NOT_FITTED) as info:
        getattr(est, method)(*args)
    assert info.value.code == "failed_precondition"


def test_wrong_feature_count(three) -> None:
    est, X, _, _ = three
    with pytest.raises(InvalidInputError, match=r"profiles have 5 features, the model expects 6"):
        est.predict(X[:, :5])


def test_non_finite_profile(three) -> None:
    est, X, _, _ = three
    bad = X[:4].copy()
    bad[2, 3] = np.inf
    with pytest.raises(InvalidInputError, match=r"non-finite value at row 2, feature 3"):
        est.novelty(bad)
    with pytest.raises(InvalidInputError, match=r"non-finite value at row 0, feature 1"):
        SpectralClusterer().fit(np.where(np.arange(6) == 1, np.nan, X[:30]))


@pytest.mark.parametrize("shape", [(0, 6), (2, 3, 6)])
def test_bad_profile_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInputError, match=r"profiles must be a non-empty 2-D array, got shape"):
        check_profiles(np.zeros(shape))


# --------------------------------------------------------------------------- state


def test_from_state_round_trip(three) -> None:
    est, X, _, _ = three
    # What the artifact does: JSON-able meta and plain arrays, copied.
    import json

    meta = json.loads(json.dumps(est.to_json()))
    arrays = {k: np.array(v, copy=True) for k, v in est.to_arrays().items()}
    back = SpectralClusterer.from_state(meta, arrays)
    assert back.get_params() == est.get_params()
    assert back.n_clusters_ == est.n_clusters_
    assert back.bic_ == est.bic_
    assert back.novelty_threshold_ == est.novelty_threshold_
    assert np.array_equal(back.predict_proba(X), est.predict_proba(X))
    assert np.array_equal(back.score_samples(X), est.score_samples(X))
    for a, b in zip(back.novelty(X), est.novelty(X), strict=True):
        assert np.array_equal(a, b)


def test_cluster_features_limit_the_clusters_but_not_novelty() -> None:
    X, y, _ = _blobs(3, 80, d=6, seed=5)
    rng = np.random.default_rng(6)
    X = np.hstack([X, rng.normal(size=(X.shape[0], 3))])  # three columns the clusters must ignore
    c = SpectralClusterer(n_clusters=3, n_init=1, random_state=0, cluster_features=6).fit(X)
    assert c.components_.shape[1] == 6 and c.novelty_precision_.shape == (9, 9)
    assert _same_partition(c.labels_, y)
    moved = X[:5].copy()
    moved[:, 6:] += 50.0  # far outside the reference, but only in the unclustered columns
    np.testing.assert_allclose(c.predict_proba(moved), c.predict_proba(X[:5]))
    assert np.all(c.novelty(moved)[1] > c.novelty_threshold_)
    back = SpectralClusterer.from_state(c.to_json(), c.to_arrays())
    assert back.cluster_features == 6
    np.testing.assert_allclose(back.predict_proba(moved), c.predict_proba(moved))


def test_cluster_features_validation() -> None:
    X, _, _ = _blobs(2, 30, d=4)
    with pytest.raises(InvalidInputError, match=r"cluster_features must be in \[1, 4\], got 5"):
        SpectralClusterer(n_clusters=2, cluster_features=5).fit(X)
