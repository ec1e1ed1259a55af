"""End-to-end tests of monitor.engine with the bundled NIH model on real radiographs.

The NIH images used for the drift checks are part of the default model's fit set: a window of
them is the reference itself, which is exactly the no-drift case this unit test needs.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from monitor.artifact import load_model
from monitor.engine import Engine
from monitor.errors import ImageTooLargeError, InvalidImageError
from monitor.imaging import load_image
from monitor.types import ScoredImage

MODEL_DIR = Path(__file__).parents[1] / "models" / "default"
DICOMS = ("cxr_pa_monochrome2_jpeg.dcm", "cxr_pa_monochrome1_jpeg.dcm", "cxr_pa_cr_philips_j2k.dcm")
N_DRIFT = 60


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load_model(MODEL_DIR))


@pytest.fixture(scope="module")
def kermany_paths(data_dir: Path) -> list[Path]:
    normal = sorted((data_dir / "kermany" / "test" / "NORMAL").glob("*.jpeg"))[: N_DRIFT // 2]
    pneumonia = sorted((data_dir / "kermany" / "test" / "PNEUMONIA").glob("*.jpeg"))[: N_DRIFT // 2]
    return normal + pneumonia


@pytest.fixture(scope="module")
def nih_paths(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "nih" / "images").glob("*.webp"))[:N_DRIFT]


@pytest.fixture(scope="module")
def kermany_scored(engine: Engine, kermany_paths: list[Path]) -> list[ScoredImage]:
    return [engine.score(p) for p in kermany_paths]


@pytest.fixture(scope="module")
def nih_scored(engine: Engine, nih_paths: list[Path]) -> list[ScoredImage]:
    return [engine.score(p) for p in nih_paths]


def _assert_finite(s: ScoredImage, n_clusters: int) -> None:
    r = s.result
    values = [r.failure_probability, r.reliability, r.novelty, r.log_likelihood, *r.failure_interval]
    assert np.all(np.isfinite(values))
    assert len(r.memberships) == n_clusters and sum(r.memberships) == pytest.approx(1.0)
    assert 0 <= r.failure_probability <= 1 and 0 <= r.novelty <= 1
    assert s.z_profile.shape == (42,) and np.all(np.isfinite(s.z_profile))
    assert set(s.timings) == {"decode", "profile", "score"}
    assert all(t >= 0 for t in s.timings.values())


@pytest.mark.parametrize("name", DICOMS)
def test_score_real_dicoms(engine: Engine, data_dir: Path, name: str) -> None:
    scored = engine.score(data_dir / "dicom" / name)
    _assert_finite(scored, engine.model.n_clusters)
    assert scored.meta.format == "dicom"
    assert scored.result.method == "cluster"


def test_score_kermany_jpeg(engine: Engine, kermany_scored: list[ScoredImage]) -> None:
    for s in kermany_scored[:3]:
        _assert_finite(s, engine.model.n_clusters)
        assert s.meta.format == "jpeg" and (s.meta.rows, s.meta.columns) != (1024, 1024)


def test_kermany_more_novel_than_nih(
    kermany_scored: list[ScoredImage], nih_scored: list[ScoredImage]
) -> None:
    kermany = np.array([s.result.novelty for s in kermany_scored])
    nih = np.array([s.result.novelty for s in nih_scored])
    assert kermany[0] > nih[0]  # the single-image check of the brief
    assert np.median(kermany) > np.median(nih)
    assert np.mean([s.result.is_novel for s in kermany_scored]) > 0.5
    assert np.mean([s.result.is_novel for s in nih_scored]) < 0.1


def test_score_bytes_equals_score_path(engine: Engine, kermany_paths: list[Path], data_dir: Path) -> None:
    for path in (kermany_paths[0], data_dir / "dicom" / DICOMS[2]):
        by_path = engine.score(path)
        by_bytes = engine.score(path.read_bytes(), name=path.name)
        assert by_bytes.result == by_path.result
        assert np.array_equal(by_bytes.z_profile, by_path.z_profile)
        assert by_bytes.meta.rows == by_path.meta.rows and by_bytes.meta.format == by_path.meta.format


def test_score_array_equals_score_path(engine: Engine, nih_paths: list[Path]) -> None:
    pixels = load_image(nih_paths[0]).pixels
    assert engine.score(pixels).result == engine.score(nih_paths[0]).result


def test_classifier_score_uses_calibration(engine: Engine, nih_paths: list[Path]) -> None:
    assert engine.model.calibrator is not None
    low = engine.score(nih_paths[0], classifier_score=0.01).result
    high = engine.score(nih_paths[0], classifier_score=0.99).result
    assert low.method == high.method == "calibrated_score"
    assert low.cluster_failure_probability == high.cluster_failure_probability
    assert low.failure_probability != high.failure_probability


def test_max_pixels_is_enforced(nih_paths: list[Path]) -> None:
    small = Engine.from_directory(MODEL_DIR, max_pixels=500_000)
    with pytest.raises(ImageTooLargeError):
        small.score(nih_paths[0])


def test_bad_bytes(engine: Engine) -> None:
    with pytest.raises(InvalidImageError):
        engine.score(b"definitely not an image", name="junk.bin")


def test_memory_does_not_grow(engine: Engine, kermany_paths: list[Path]) -> None:
    """Scoring one image 300 times holds no memory beyond what the first 20 calls allocated."""
    data = kermany_paths[0].read_bytes()
    tracemalloc.start()
    try:
        for _ in range(20):
            engine.score(data, name="same.jpeg")
        after_warmup = tracemalloc.get_traced_memory()[0]
        for _ in range(280):
            engine.score(data, name="same.jpeg")
        after_all = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after_all - after_warmup < 5 * 2**20, (after_warmup, after_all)


def test_batch_drift_kermany_drifts(engine: Engine, kermany_scored: list[ScoredImage]) -> None:
    report = engine.batch_drift(kermany_scored)
    assert report.n_images == N_DRIFT
    assert report.drift is True
    assert any(reason.startswith("novel images") for reason in report.reasons)


def test_batch_drift_nih_does_not_drift(engine: Engine, nih_scored: list[ScoredImage]) -> None:
    report = engine.batch_drift(nih_scored)
    assert report.n_images == N_DRIFT
    assert report.drift is False, report.reasons
    assert report.reasons == ()


def test_sliding_window(
    engine: Engine, nih_scored: list[ScoredImage], kermany_scored: list[ScoredImage]
) -> None:
    window = engine.new_window(max_images=40)
    for t, s in enumerate(nih_scored + kermany_scored):
        window.add(
            float(t), s.result.cluster, s.result.is_novel, s.result.cluster_failure_probability, s.z_profile
        )
    report = engine.window_drift(window, now=float(len(nih_scored) + len(kermany_scored)))
    assert report.n_images == 40  # only Kermany images are left in the window
    assert report.drift is True
    assert engine.batch_drift([]).n_images == 0
