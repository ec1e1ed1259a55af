"""Tests for monitor.batch: profiling many files, per-file errors, the content-keyed Parquet profile cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monitor.batch import BatchResult, default_cache_dir, iter_profiled_files, profile_files
from monitor.profilestore import ParquetProfileStore
from monitor.spectrum import SpectralProfiler


@pytest.fixture(scope="module")
def profiler() -> SpectralProfiler:
    return SpectralProfiler(working_size=64, n_bands=8, planner_effort="FFTW_ESTIMATE")


def _png(path: Path, seed: int, size: tuple[int, int] = (96, 80)) -> Path:
    rng = np.random.default_rng(seed)
    pixels = (rng.random(size).cumsum(axis=0) % 256).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    return [_png(folder / f"im{i}.png", seed=i) for i in range(6)]


def test_profiles_in_input_order(images: list[Path], profiler: SpectralProfiler) -> None:
    from monitor.imaging import load_image

    result = profile_files(images, profiler)
    assert isinstance(result, BatchResult)
    assert result.paths == images
    assert result.errors == [] and result.cache_hits == 0
    assert result.profiles.shape == (6, len(profiler.feature_names))
    for path, row in zip(images, result.profiles, strict=True):
        assert np.array_equal(row, profiler.profile_image(load_image(path)))
    assert all("source" not in m for m in result.metas)
    assert result.metas[0]["format"] == "png" and result.metas[0]["rows"] == 96


def test_cache_second_run_hits_everything(
    images: list[Path], profiler: SpectralProfiler, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = profile_files(images, profiler, cache_dir=cache)
    assert first.cache_hits == 0
    second = profile_files(images, profiler, cache_dir=cache)
    assert second.cache_hits == len(images)
    assert np.array_equal(second.profiles, first.profiles)
    assert second.metas == first.metas
    assert second.paths == first.paths
    store = ParquetProfileStore.in_cache_dir(cache, profiler.spec())
    assert store.read_all().num_rows == len(images)
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob("*.npz"))


def test_cache_key_follows_content(images: list[Path], profiler: SpectralProfiler, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = profile_files(images, profiler, cache_dir=cache)
    _png(images[2], seed=100)  # same name, new content
    again = profile_files(images, profiler, cache_dir=cache)
    assert again.cache_hits == len(images) - 1
    assert not np.array_equal(again.profiles[2], first.profiles[2])
    np.testing.assert_array_equal(np.delete(again.profiles, 2, axis=0), np.delete(first.profiles, 2, axis=0))
    # A copy under another name is the same content: a hit.
    copy = images[0].with_name("copy.png")
    copy.write_bytes(images[0].read_bytes())
    assert profile_files([copy], profiler, cache_dir=cache).cache_hits == 1


def test_cache_key_follows_spec(images: list[Path], profiler: SpectralProfiler, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    profile_files(images, profiler, cache_dir=cache)
    other = SpectralProfiler(working_size=64, n_bands=7, planner_effort="FFTW_ESTIMATE")
    result = profile_files(images, other, cache_dir=cache)
    assert result.cache_hits == 0
    assert result.profiles.shape == (6, len(other.feature_names))
    a = ParquetProfileStore.in_cache_dir(cache, other.spec())
    b = ParquetProfileStore.in_cache_dir(cache, profiler.spec())
    assert a.path != b.path


def test_corrupt_cache_entry_is_recomputed(
    images: list[Path], profiler: SpectralProfiler, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = profile_files(images[:2], profiler, cache_dir=cache)
    for entry in cache.rglob("*.parquet"):
        if entry.is_file():
            entry.write_bytes(b"not parquet")
    again = profile_files(images[:2], profiler, cache_dir=cache)
    assert again.cache_hits == 0
    assert np.array_equal(again.profiles, first.profiles)
    assert profile_files(images[:2], profiler, cache_dir=cache).cache_hits == 2


def test_bad_files_are_reported_and_others_profiled(images: list[Path], profiler: SpectralProfiler) -> None:
    folder = images[0].parent
    not_image = folder / "notes.png"
    not_image.write_text("this is not an image")
    constant = folder / "flat.png"
    Image.fromarray(np.full((80, 80), 7, dtype=np.uint8)).save(constant)
    missing = folder / "missing.png"
    paths = [images[0], not_image, images[1], missing, constant, images[2]]
    result = profile_files(paths, profiler)
    assert result.paths == [images[0], images[1], images[2]]
    assert result.profiles.shape == (3, len(profiler.feature_names))
    reasons = dict(result.errors)
    assert list(reasons) == [not_image, missing, constant]
    assert str(not_image) in reasons[not_image]
    assert reasons[missing] == f"{missing}: cannot read (No such file or directory)"
    assert "constant" in reasons[constant]


def test_nothing_profiled(profiler: SpectralProfiler, tmp_path: Path) -> None:
    result = profile_files([tmp_path / "absent.png"], profiler)
    assert result.profiles.shape == (0, len(profiler.feature_names))
    assert len(result.errors) == 1 and result.paths == []


def test_two_processes_match_one(images: list[Path], profiler: SpectralProfiler, tmp_path: Path) -> None:
    # FFTW_ESTIMATE plans are the same in every process, so the profiles are bit-identical.
    serial = profile_files(images, profiler)
    parallel = profile_files(images, profiler, jobs=2, cache_dir=tmp_path / "cache")
    assert parallel.paths == serial.paths
    assert np.array_equal(parallel.profiles, serial.profiles)
    assert profile_files(images, profiler, cache_dir=tmp_path / "cache").cache_hits == len(images)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "cxr-monitor"


def test_an_old_npz_cache_is_ignored(images: list[Path], profiler: SpectralProfiler, tmp_path: Path) -> None:
    """Caches of earlier versions (``profiles-<digest>/<sha[:2]>/<sha>.npz``) are neither read nor removed."""
    cache = tmp_path / "cache"
    old = cache / "profiles-0123456789abcdef" / "ab" / ("ab" + "0" * 62 + ".npz")
    old.parent.mkdir(parents=True)
    old.write_bytes(b"an old entry")
    result = profile_files(images, profiler, cache_dir=cache)
    assert result.cache_hits == 0 and result.errors == []
    assert old.read_bytes() == b"an old entry"


def test_streamed_in_input_order_across_chunks(
    images: list[Path], profiler: SpectralProfiler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import monitor.batch

    monkeypatch.setattr(monitor.batch, "_CHUNK", 4)  # 6 images: two chunks, the second half cached
    cache = tmp_path / "cache"
    profile_files(images[3:], profiler, cache_dir=cache)
    items = list(iter_profiled_files(images, profiler, cache_dir=cache))
    assert [i.index for i in items] == list(range(6))
    assert [i.source for i in items] == [str(p) for p in images]
    assert [i.cached for i in items] == [False] * 3 + [True] * 3
