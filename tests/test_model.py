"""Tests for monitor.model: fitting on synthetic profiles with a known blind spot, scoring, drift."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.clustering import SpectralClusterer
from monitor.errors import InvalidInputError
from monitor.model import ReliabilityModel, library_versions
from monitor.spectrum import SpectralProfiler

SIZES = (200, 120, 60)  # cluster ids follow size, so the enriched cluster is id 2
FAIL_RATES = (0.1, 0.1, 0.7)
THRESHOLD = 0.5


def synthetic_fit_data(seed: int = 0):
    """Profiles of 3 well-separated groups (15 spectral + 11 intensity features), labels, scores, ...

    Group 2 (the smallest) is where the classifier fails: its score points the wrong way.
    The intensity columns come from their own generator, so the spectral ones (what the
    clusters see) are the same numbers as in the spectral-only profiles of spec 1.0.
    """
    rng = np.random.default_rng(seed)
    profiler = SpectralProfiler(working_size=64, n_bands=8)
    d = profiler.n_spectral
    centres = rng.normal(size=(3, d)) * 8
    group = np.repeat(np.arange(3), SIZES)
    X = centres[group] + rng.normal(size=(group.size, d))
    other = np.random.default_rng([seed, 1])
    n_int = len(profiler.intensity_feature_names)
    X = np.hstack([X, (other.normal(size=(3, n_int)) * 3)[group] + other.normal(size=(group.size, n_int))])
    labels = rng.integers(0, 2, size=group.size)
    wrong = rng.random(group.size) < np.array(FAIL_RATES)[group]
    decided = np.where(wrong, 1 - labels, labels)
    scores = np.where(decided == 1, rng.uniform(0.5, 0.99, group.size), rng.uniform(0.01, 0.49, group.size))
    failures = ((scores >= THRESHOLD).astype(int) != labels).astype(int)
    records = [{"image": f"img_{i:03d}.png", "site": f"s{g}"} for i, g in enumerate(group)]
    return profiler, X, group, labels, scores, failures, records


def fit_synthetic(seed: int = 0, calibrate: bool = True) -> ReliabilityModel:
    profiler, X, _, labels, scores, failures, records = synthetic_fit_data(seed)
    return ReliabilityModel.fit(
        X,
        failures,
        profiler=profiler,
        clusterer=SpectralClusterer(k_range=(2, 5), n_init=1, random_state=0),
        labels=labels if calibrate else None,
        scores=scores if calibrate else None,
        threshold=THRESHOLD if calibrate else None,
        card={"name": "synthetic"},
        records=records,
    )


@pytest.fixture(scope="module")
def data():
    return synthetic_fit_data()


@pytest.fixture(scope="module")
def model() -> ReliabilityModel:
    return fit_synthetic()


def test_fit_finds_the_blind_spot(model: ReliabilityModel, data) -> None:
    _, _, group, *_ = data
    assert model.n_clusters == 3
    assert model.clusterer.labels_.tolist() == group.tolist()  # size order = group order here
    assert model.rates.blind_spot_.tolist() == [False, False, True]
    assert model.rates.rate_[2] > 0.5 > model.rates.rate_[0]
    assert model.rates.q_value_[2] < 1e-6
    np.testing.assert_allclose(model.reference_mix, np.array(SIZES) / sum(SIZES))
    assert model.reference_novelty_rate >= 1 - model.clusterer.novelty_quantile


def test_fit_keeps_records_and_profiles(model: ReliabilityModel, data) -> None:
    _, X, group, _, _, failures, records = data
    assert np.array_equal(model.fit_profiles, X)
    assert len(model.fit_records) == X.shape[0]
    first = model.fit_records[0]
    assert first == {"image": "img_000.png", "site": "s0", "cluster": 0, "failure": int(failures[0])}
    assert [r["cluster"] for r in model.fit_records] == group.tolist()
    assert records[0] == {"image": "img_000.png", "site": "s0"}  # the caller's records are not modified


def test_card_and_model_id(model: ReliabilityModel) -> None:
    assert model.card["name"] == "synthetic"
    assert model.card["versions"] == library_versions()
    assert model.model_id == model.fingerprint()
    assert model.model_id.startswith("cxrm-") and len(model.model_id) == len("cxrm-") + 12


def test_score_fields_are_consistent(model: ReliabilityModel, data) -> None:
    _, X, group, *_ = data
    results = model.score(X[::7])
    assert len(results) == len(X[::7])
    for r, g in zip(results, group[::7], strict=True):
        assert r.reliability == pytest.approx(1.0 - r.failure_probability, abs=1e-15)
        assert sum(r.memberships) == pytest.approx(1.0, abs=1e-12)
        assert len(r.memberships) == 3
        assert r.cluster == int(np.argmax(r.memberships)) == g
        assert r.method == "cluster"
        assert r.failure_probability == r.cluster_failure_probability
        assert r.failure_interval[0] <= r.failure_probability <= r.failure_interval[1]
        assert r.in_blind_spot == (g == 2)
        assert 0.0 <= r.novelty <= 1.0 and np.isfinite(r.log_likelihood)
        assert len(r.top_features) == 3
        assert {name for name, _ in r.top_features} <= set(model.feature_names)
        z = [abs(v) for _, v in r.top_features]
        assert z == sorted(z, reverse=True)


def test_far_profile_is_novel(model: ReliabilityModel, data) -> None:
    _, X, *_ = data
    r = model.score(X.mean(axis=0) + 40 * X.std(axis=0))[0]
    assert r.novelty == 1.0 and r.is_novel


def test_classifier_scores_use_calibration_with_nan_fallback(model: ReliabilityModel, data) -> None:
    _, X, _, _, scores, *_ = data
    rows = X[:4]
    s = np.array([scores[0], np.nan, scores[2], np.nan])
    results = model.score(rows, classifier_scores=s)
    assert [r.method for r in results] == ["calibrated_score", "cluster", "calibrated_score", "cluster"]
    plain = model.score(rows)
    for r, p in zip(results, plain, strict=True):
        assert r.cluster_failure_probability == p.failure_probability
        assert r.reliability == pytest.approx(1.0 - r.failure_probability, abs=1e-15)
    assert results[1].failure_probability == plain[1].failure_probability
    expected = model.calibrator.predict_failure(s[[0, 2]], model.clusterer.predict_proba(rows[[0, 2]]))
    np.testing.assert_allclose([results[0].failure_probability, results[2].failure_probability], expected)


def test_calibration_inverts_the_blind_spot_decisions(model: ReliabilityModel, data) -> None:
    """In the blind spot the score points the wrong way: a confident decision there is likely wrong."""
    _, X, group, _, scores, failures, _ = data
    in_spot = np.flatnonzero(group == 2)
    results = model.score(X[in_spot], classifier_scores=scores[in_spot])
    p = np.array([r.failure_probability for r in results])
    assert p[failures[in_spot] == 1].mean() > p[failures[in_spot] == 0].mean()


def test_classifier_scores_without_calibrator_are_ignored(data) -> None:
    _, X, *_ = data
    model = fit_synthetic(calibrate=False)
    assert model.calibrator is None
    r = model.score(X[:2], classifier_scores=[0.9, 0.1])
    assert [x.method for x in r] == ["cluster", "cluster"]


def test_score_validation(model: ReliabilityModel, data) -> None:
    _, X, *_ = data
    with pytest.raises(InvalidInputError, match="expected 3 classifier scores, got 2"):
        model.score(X[:3], classifier_scores=[0.1, 0.2])
    with pytest.raises(InvalidInputError, match="profiles have 14 features, the model expects 26"):
        model.score(X[:3, :14])
    with pytest.raises(
        InvalidInputError, match=r"classifier scores must be finite probabilities in \[0, 1\]"
    ):
        model.score(X[:1], classifier_scores=[1.5])


def test_fit_validation(data) -> None:
    profiler, X, _, labels, scores, failures, records = data
    with pytest.raises(InvalidInputError, match=f"failures must be {X.shape[0]} values of 0 or 1"):
        ReliabilityModel.fit(X, failures[:-1], profiler=profiler)
    with pytest.raises(InvalidInputError, match=f"failures must be {X.shape[0]} values of 0 or 1"):
        ReliabilityModel.fit(X, failures * 2, profiler=profiler)
    with pytest.raises(InvalidInputError, match=f"got 3 records for {X.shape[0]} profiles"):
        ReliabilityModel.fit(X, failures, profiler=profiler, records=records[:3])
    with pytest.raises(InvalidInputError, match="a decision threshold is needed to calibrate scores"):
        ReliabilityModel.fit(X, failures, profiler=profiler, labels=labels, scores=scores)
    with pytest.raises(InvalidInputError, match="profiles have 26 features, the model expects 42"):
        ReliabilityModel.fit(X, failures, profiler=SpectralProfiler())


def test_drift_of_fit_set_and_of_one_cluster(model: ReliabilityModel, data) -> None:
    _, X, group, *_ = data
    Z = model.standardise(X)
    results = model.score(X)

    def report(rows: np.ndarray):
        window = model.new_window()
        for i in rows:
            r = results[i]
            window.add(r.cluster, r.is_novel, r.cluster_failure_probability, Z[i])
        return model.drift(window)

    same = report(np.arange(X.shape[0]))
    assert same.drift is False
    assert same.psi == pytest.approx(0.0, abs=1e-6)
    assert same.max_feature_shift == pytest.approx(0.0, abs=1e-9)
    assert same.estimated_failure_rate == pytest.approx(model.reference_failure_probability)
    shifted = report(np.flatnonzero(group == 2))
    assert shifted.drift is True
    assert shifted.estimated_failure_rate > model.reference_failure_probability


def test_clusters_are_spectral_novelty_and_drift_see_intensity(model: ReliabilityModel, data) -> None:
    profiler, X, *_ = data
    n_spec = profiler.n_spectral
    assert model.clusterer.cluster_features == n_spec
    assert model.feature_components == ("spectral",) * n_spec + ("intensity",) * (X.shape[1] - n_spec)
    # Moving only the intensity features: same clusters, but novel, and the intensity component drifts.
    moved = X.copy()
    moved[:, n_spec:] += 6.0 * model.clusterer.scale_[n_spec:]
    before, after = model.score(X[:50]), model.score(moved[:50])
    assert [r.cluster for r in before] == [r.cluster for r in after]
    assert all(r.is_novel for r in after)
    window = model.new_window()
    Z = model.standardise(moved)
    for i, r in enumerate(model.score(moved)):
        window.add(r.cluster, r.is_novel, r.cluster_failure_probability, Z[i])
    report = model.drift(window)
    assert report.intensity_drift and report.components["intensity"] and not report.mix_drift
    drifted = {f.feature for f in report.feature_drift if f.drifted}
    assert drifted == set(profiler.intensity_feature_names)


def test_fit_on_a_sample_then_assigns_every_profile(data) -> None:
    """max_fit_profiles: clusters from a sample, rates and mix from all profiles."""
    profiler, X, group, labels, scores, failures, records = data
    kw = dict(profiler=profiler, labels=labels, scores=scores, threshold=THRESHOLD, records=records)
    full = ReliabilityModel.fit(X, failures, clusterer=SpectralClusterer(k_range=(2, 5), n_init=1), **kw)
    half = X.shape[0] // 2
    sampled = ReliabilityModel.fit(
        X, failures, clusterer=SpectralClusterer(k_range=(2, 5), n_init=1), max_fit_profiles=half, **kw
    )
    assert sampled.card["fit_sample"] == {"n_profiles": X.shape[0], "n_clustered": half}
    assert sampled.fit_profiles.shape[0] == half and len(sampled.fit_records) == half
    assert sampled.n_clusters == full.n_clusters == 3
    # Every profile was assigned: the rates count all of them, and they agree with the full fit.
    assert (
        sampled.rates.to_json()["clusters"][0]["n_images"]
        + sum(c["n_images"] for c in sampled.rates.to_json()["clusters"][1:])
        == X.shape[0]
    )
    np.testing.assert_allclose(sorted(sampled.reference_mix), sorted(full.reference_mix), atol=0.01)
    a = [r.cluster for r in full.score(X)]
    b = [r.cluster for r in sampled.score(X)]
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(a, b) > 0.99
    # No sample below the cap: the fit is the full fit.
    same = ReliabilityModel.fit(
        X, failures, clusterer=SpectralClusterer(k_range=(2, 5), n_init=1), max_fit_profiles=10**6, **kw
    )
    assert same.model_id == full.model_id and "fit_sample" not in same.card
