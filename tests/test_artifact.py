"""Tests for monitor.artifact: round trip, byte-identical refits, tamper and version checks, no pickle."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from monitor.artifact import FORMAT_VERSION, load_model, save_model
from monitor.clustering import SpectralClusterer
from monitor.errors import ArtifactError
from monitor.model import ReliabilityModel
from monitor.spectrum import SPEC_VERSION, SpectralProfiler


def _fit(seed: int = 0, calibrate: bool = True) -> tuple[ReliabilityModel, np.ndarray, np.ndarray]:
    """A small model on 3 synthetic groups (the third enriched in failures); returns (model, X, scores)."""
    rng = np.random.default_rng(seed)
    profiler = SpectralProfiler(working_size=64, n_bands=8)
    d = len(profiler.feature_names)
    group = np.repeat(np.arange(3), (150, 90, 50))
    X = rng.normal(size=(3, d))[group] * 8 + rng.normal(size=(group.size, d))
    labels = rng.integers(0, 2, size=group.size)
    scores = np.clip(np.where(group == 2, 1 - labels, labels) * 0.6 + rng.uniform(0, 0.4, group.size), 0, 1)
    failures = ((scores >= 0.5).astype(int) != labels).astype(int)
    model = ReliabilityModel.fit(
        X,
        failures,
        profiler=profiler,
        clusterer=SpectralClusterer(k_range=(2, 4), n_init=1, random_state=seed),
        labels=labels if calibrate else None,
        scores=scores if calibrate else None,
        threshold=0.5 if calibrate else None,
        card={"name": "artifact-test"},
        records=[{"image": f"{i}.png", "age": i % 90} for i in range(group.size)],
    )
    return model, X, scores


@pytest.fixture(scope="module")
def fitted():
    return _fit()


@pytest.fixture
def saved(fitted, tmp_path: Path) -> Path:
    return save_model(fitted[0], tmp_path / "model")


def _rewrite_manifest(directory: Path) -> None:
    """Make the manifest match whatever the files now hold (what a careful attacker would do)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    for name in ("model.json", "arrays.npz"):
        manifest["files"][name] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_layout_and_manifest(saved: Path, fitted) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["arrays.npz", "manifest.json", "model.json"]
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["spec_version"] == SPEC_VERSION
    assert manifest["model_id"] == fitted[0].model_id
    for name in ("model.json", "arrays.npz"):
        assert manifest["files"][name] == hashlib.sha256((saved / name).read_bytes()).hexdigest()


def test_round_trip_gives_identical_scores(saved: Path, fitted) -> None:
    model, X, scores = fitted
    back = load_model(saved)
    assert back.model_id == model.model_id
    assert back.card == json.loads(json.dumps(model.card))
    assert back.feature_names == model.feature_names
    assert back.profiler.spec() == model.profiler.spec()
    s = scores.copy()
    s[::3] = np.nan
    assert back.score(X, classifier_scores=s) == model.score(X, classifier_scores=s)
    assert back.score(X) == model.score(X)
    assert np.array_equal(back.fit_profiles, model.fit_profiles)
    assert back.fit_records == model.fit_records
    assert back.drift_thresholds == model.drift_thresholds
    assert back.reference_novelty_rate == model.reference_novelty_rate
    assert back.reference_failure_probability == model.reference_failure_probability
    assert np.array_equal(back.reference_mix, model.reference_mix)


def test_round_trip_without_calibrator(tmp_path: Path) -> None:
    model, X, _ = _fit(seed=1, calibrate=False)
    back = load_model(save_model(model, tmp_path / "m"))
    assert back.calibrator is None
    assert back.score(X[:20]) == model.score(X[:20])


def test_refit_is_byte_identical(tmp_path: Path, fitted) -> None:
    a = save_model(_fit()[0], tmp_path / "a")
    b = save_model(_fit()[0], tmp_path / "b")
    for name in ("model.json", "arrays.npz", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert json.loads((a / "manifest.json").read_text())["model_id"] == fitted[0].model_id
    other = _fit(seed=3)[0]
    assert other.model_id != fitted[0].model_id


def test_save_replaces_existing_model(tmp_path: Path, fitted) -> None:
    target = tmp_path / "m"
    save_model(_fit(seed=1)[0], target)
    save_model(fitted[0], target)
    assert load_model(target).model_id == fitted[0].model_id
    assert not list(target.glob("*.tmp"))


def test_flipped_byte_in_arrays_is_detected(saved: Path) -> None:
    path = saved / "arrays.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"arrays\.npz: sha256 [0-9a-f]{16}… does not match the manifest"):
        load_model(saved)


def test_edited_model_json_is_detected(saved: Path) -> None:
    path = saved / "model.json"
    path.write_text(path.read_text().replace('"artifact-test"', '"edited"'))
    with pytest.raises(ArtifactError, match=r"model\.json: sha256 .* the file was modified or corrupted"):
        load_model(saved)


def test_missing_files(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="model directory not found"):
        load_model(tmp_path / "nowhere")
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    (copy / "arrays.npz").unlink()
    with pytest.raises(ArtifactError, match=r"arrays\.npz: cannot read \(No such file or directory\)"):
        load_model(copy)
    (saved / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing; is this a cxr-monitor model"):
        load_model(saved)


def test_manifest_not_json(saved: Path) -> None:
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"manifest\.json: not valid JSON"):
        load_model(saved)


def test_other_format_version(saved: Path) -> None:
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["format_version"] = 99
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ArtifactError, match=f"model format version 99, this cxr-monitor reads {FORMAT_VERSION}"
    ):
        load_model(saved)


def test_other_spec_version_asks_for_refit(saved: Path) -> None:
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["spec_version"] = "1.0"
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ArtifactError,
        match=r"fitted with spectral profile spec '1\.0', this cxr-monitor computes spec '2\.0'; refit the model",
    ):
        load_model(saved)


class _Trap:
    """Unpickling this object creates ``path``: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_object_array_is_refused_even_with_a_valid_manifest(saved: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    with np.load(saved / "arrays.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["reference_mix"] = np.array([_Trap(marker)], dtype=object)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (saved / "arrays.npz").write_bytes(buf.getvalue())
    _rewrite_manifest(saved)
    with pytest.raises(ArtifactError, match=r"model content is invalid \(ValueError: .*allow_pickle"):
        load_model(saved)
    assert not marker.exists()


def test_consistent_but_incomplete_content(saved: Path) -> None:
    doc = json.loads((saved / "model.json").read_text())
    del doc["failure_rates"]
    (saved / "model.json").write_text(json.dumps(doc))
    _rewrite_manifest(saved)
    with pytest.raises(ArtifactError, match=r"model content is invalid \(KeyError: 'failure_rates'\)"):
        load_model(saved)


def test_feature_names_of_another_spec(saved: Path) -> None:
    doc = json.loads((saved / "model.json").read_text())
    doc["spectrum"]["feature_names"][0] = "something_else"
    (saved / "model.json").write_text(json.dumps(doc))
    _rewrite_manifest(saved)
    with pytest.raises(ArtifactError, match="feature names differ from those of profile spec 2.0"):
        load_model(saved)


def test_bundled_default_model_loads() -> None:
    directory = Path(__file__).parents[1] / "models" / "default"
    model = load_model(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert model.model_id == manifest["model_id"]
    assert model.fingerprint() == model.model_id
    assert len(model.feature_names) == 42
    assert model.fit_profiles is not None and model.fit_profiles.shape == (len(model.fit_records), 42)


def test_drift_rank_table_round_trip_and_older_artifacts(saved: Path, fitted) -> None:
    model = fitted[0]
    assert model.drift_ranks is not None and model.drift_ranks.n_points == len(model.fit_profiles)
    back = load_model(saved)
    np.testing.assert_array_equal(back.drift_ranks.table_, model.drift_ranks.table_)
    # A model saved before the table existed rebuilds the same one from its fit profiles.
    with np.load(saved / "arrays.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "drift_rank_table"}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (saved / "arrays.npz").write_bytes(buf.getvalue())
    _rewrite_manifest(saved)
    older = load_model(saved)
    np.testing.assert_allclose(older.drift_ranks.table_, model.drift_ranks.table_)
    w_new, w_old = model.new_window(), older.new_window()
    z = model.standardise(fitted[1][:40])
    for row in z:
        w_new.add(0, False, 0.1, row)
        w_old.add(0, False, 0.1, row)
    assert model.drift(w_new).feature_drift == older.drift(w_old).feature_drift
