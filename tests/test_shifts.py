"""Tests for benchmarks/shifts.py: determinism, identities, ranges and one known property per shift."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import shifts  # noqa: E402
from benchmarks.shifts import IDENTITY, LEVELS, SHIFTS, apply_shift  # noqa: E402


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A smooth 8-bit 'radiograph' with texture: low-frequency body plus mild fine structure."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:128, 0:128] / 128.0
    body = 150 + 60 * np.sin(3 * xx) * np.cos(2 * yy)
    texture = np.asarray(
        np.fft.irfft2(np.fft.rfft2(rng.normal(size=(128, 128))) / (1 + np.hypot(*np.mgrid[0:128, 0:65]))),
        dtype=np.float64,
    )
    x = body + 400 * texture
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def high_frequency_energy(x: np.ndarray) -> float:
    """Share of the (mean-removed) spectral energy above a quarter of the sampling rate."""
    f = np.abs(np.fft.fft2(x - x.mean())) ** 2
    ky = np.fft.fftfreq(x.shape[0])[:, None]
    kx = np.fft.fftfreq(x.shape[1])[None, :]
    return float(f[np.hypot(ky, kx) > 0.25].sum() / f.sum())


def blockiness(x: np.ndarray) -> float:
    """Mean absolute step across 8-pixel block borders over that elsewhere (columns)."""
    d = np.abs(np.diff(np.asarray(x, dtype=np.float64), axis=1)).mean(axis=0)
    border = (np.arange(d.size) + 1) % 8 == 0
    return float(d[border].mean() / d[~border].mean())


@pytest.mark.parametrize("kind", sorted(SHIFTS))
@pytest.mark.parametrize("level", ["mild", "moderate", "strong"])
def test_deterministic_float32_in_range(image: np.ndarray, kind: str, level: str) -> None:
    a = apply_shift(image, kind, level, seed=3)
    b = apply_shift(image, kind, level, seed=3)
    assert a.dtype == np.float32 and a.shape == image.shape
    assert a.min() >= 0 and a.max() <= 255
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - image).mean() > 0.1  # every level actually changes the image


def test_seed_changes_random_shifts(image: np.ndarray) -> None:
    assert not np.array_equal(
        apply_shift(image, "noise", "mild", seed=0), apply_shift(image, "noise", "mild", seed=1)
    )
    assert not np.array_equal(
        apply_shift(image, "grid", "mild", seed=0), apply_shift(image, "grid", "mild", seed=1)
    )


@pytest.mark.parametrize("kind", sorted(IDENTITY))
def test_identity_strength(image: np.ndarray, kind: str) -> None:
    np.testing.assert_array_equal(apply_shift(image, kind, IDENTITY[kind]), image.astype(np.float32))


def test_levels_are_graded(image: np.ndarray) -> None:
    for kind in SHIFTS:
        change = [
            np.abs(apply_shift(image, kind, lv) - image).mean() for lv in ("mild", "moderate", "strong")
        ]
        assert change[0] < change[1] < change[2], (kind, change)


def test_blur_lowers_and_noise_raises_high_frequency_energy(image: np.ndarray) -> None:
    base = high_frequency_energy(image)
    assert high_frequency_energy(apply_shift(image, "blur", "mild")) < 0.5 * base
    assert high_frequency_energy(apply_shift(image, "noise", "moderate")) > 2 * base
    assert high_frequency_energy(apply_shift(image, "sharpen", "moderate")) > base


def test_grid_adds_peak_at_its_frequency() -> None:
    flat = np.full((64, 200), 128, dtype=np.uint8)
    out = shifts.grid(flat, 0.1, frequency=0.25)
    profile = np.abs(np.fft.rfft(out.mean(axis=0) - out.mean()))
    assert np.argmax(profile) == 50  # 0.25 cycles/pixel * 200 pixels
    # Multiplicative with depth a: values within [128 (1 - a), 128], mean 128 (1 - a / 2).
    assert out.max() <= 128 and out.min() >= 128 * 0.9 - 1e-3
    assert out.mean() == pytest.approx(128 * 0.95, abs=0.1)


def test_jpeg_lower_quality_more_blocky(image: np.ndarray) -> None:
    b = [blockiness(apply_shift(image, "jpeg", q)) for q in (90, 50, 10)]
    assert b[0] < b[1] < b[2]


def test_gamma_and_resample_known_values() -> None:
    x = np.array([[0, 64, 255, 255], [255, 255, 64, 0]] * 2, dtype=np.uint8)
    g = shifts.gamma(x, 0.5)
    assert g[0, 1] == pytest.approx(255 * np.sqrt(64 / 255), rel=1e-5)
    assert g[0, 0] == 0 and g[0, 2] == 255
    ramp = np.tile(np.arange(16, dtype=np.float32) * 10, (16, 1))
    # A linear ramp survives area-averaging + bilinear interpolation away from the borders.
    np.testing.assert_allclose(shifts.downsample_upsample(ramp, 2)[:, 2:-2], ramp[:, 2:-2], atol=1e-3)


def test_noise_is_signal_dependent() -> None:
    lo = np.full((128, 128), 30, dtype=np.uint8)
    hi = np.full((128, 128), 220, dtype=np.uint8)
    s_lo = (shifts.quantum_noise(lo, 0.04) - 30).std()
    s_hi = (shifts.quantum_noise(hi, 0.04) - 220).std()
    assert s_hi / s_lo == pytest.approx(np.sqrt(220 / 30), rel=0.15)
    mid = shifts.quantum_noise(np.full((128, 128), 127.5, dtype=np.float32), 0.04)
    assert mid.std() == pytest.approx(0.04 * 255, rel=0.1)


def test_bad_arguments() -> None:
    x = np.zeros((16, 16), dtype=np.uint8)
    with pytest.raises(ValueError, match="unknown shift 'tilt'"):
        apply_shift(x, "tilt", "mild")
    with pytest.raises(ValueError, match="unknown level 'extreme' for blur"):
        apply_shift(x, "blur", "extreme")
    with pytest.raises(ValueError, match="expected a 2-D grey image"):
        shifts.blur(np.zeros((4, 4, 3)), 1.0)
    with pytest.raises(ValueError, match="JPEG quality must be in 1..100"):
        shifts.jpeg(x, 0)
    assert set(LEVELS) == set(SHIFTS)


def test_photometric_shifts_known_values() -> None:
    x = np.array([[0, 50, 100, 200]] * 4, dtype=np.float32)
    np.testing.assert_allclose(shifts.brightness(x, 1.3)[0], [0, 65, 130, 255])  # 260 clips
    m = x.mean()  # 87.5
    np.testing.assert_allclose(shifts.contrast(x, 0.5)[0], m + 0.5 * (x[0] - m), rtol=1e-6)
    # A window of half the range centred on mid-range: the middle half spans the full range.
    v = shifts.voi_window(np.array([[0, 63.75, 127.5, 191.25, 255]] * 2, dtype=np.float32), 0.5)
    np.testing.assert_allclose(v[0], [0, 0, 127.5, 255, 255], atol=255 / 65535)


def test_equalize_flattens_the_histogram() -> None:
    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(80, 15, size=(256, 256)), 0, 255).astype(np.float32)
    eq = shifts.equalize(x, 1.0)
    counts = np.histogram(eq, bins=8, range=(0, 255))[0]
    assert counts.max() / counts.min() < 1.6  # ~uniform; the input piles up in two bins
    assert np.histogram(x, bins=8, range=(0, 255))[0].max() > 0.5 * x.size


def test_clahe_equalises_each_region_locally() -> None:
    # Left half dark, right half bright, both with small texture: CLAHE stretches each half's
    # own range, so both halves end up with far more contrast than the input had.
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(40, 4, (128, 64)), rng.normal(200, 4, (128, 64))], axis=1)
    x = np.clip(x, 0, 255).astype(np.float32)
    out = shifts.clahe(x, 3.0, tiles=4)
    assert out[:, :24].std() > 3 * x[:, :24].std() and out[:, -24:].std() > 3 * x[:, -24:].std()
    assert out.min() >= 0 and out.max() <= 255
