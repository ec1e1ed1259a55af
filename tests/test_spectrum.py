"""Tests for monitor.spectrum: invariances, known answers on synthetic images, validation, threads, wisdom."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from monitor.errors import InvalidImageError, InvalidInputError
from monitor.imaging import load_image
from monitor.spectrum import (
    DEFAULT_N_BANDS,
    DEFAULT_WORKING_SIZE,
    INTENSITY_FEATURES,
    PROFILE_STAGES,
    SPEC_VERSION,
    SpectralProfiler,
    StageTimes,
    full_scale,
    load_wisdom,
    save_wisdom,
)
from monitor.types import ImageMeta, LoadedImage

N_EXTRA = 7  # slopes (2), directions (3), peak, blockiness
N_INTENSITY = 11


@pytest.fixture(scope="module")
def profiler() -> SpectralProfiler:
    return SpectralProfiler()


@pytest.fixture(scope="module")
def small() -> SpectralProfiler:
    """A small working size for the synthetic known-answer checks (bands up to 128 cycles/image)."""
    return SpectralProfiler(working_size=256, n_bands=16)


@pytest.fixture(scope="module")
def nih_pixels(data_dir: Path) -> list[np.ndarray]:
    paths = sorted((data_dir / "nih" / "images").glob("*.webp"))[:4]
    return [load_image(p).pixels for p in paths]


def _feature(p: SpectralProfiler, image: np.ndarray, name: str) -> float:
    return float(p.profile(image)[p.feature_names.index(name)])


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    return y, x


def _brown(n: int, seed: int) -> np.ndarray:
    """A random field with power ~ 1/f^2 (amplitude ~ 1/f)."""
    rng = np.random.default_rng(seed)
    ky = np.fft.fftfreq(n)[:, None]
    kx = np.fft.fftfreq(n)[None, :]
    r = np.hypot(kx, ky)
    r[0, 0] = 1.0
    return np.fft.ifft2(np.fft.fft2(rng.normal(size=(n, n))) / r).real


# --------------------------------------------------------------------------- names, bands, spec


def test_feature_names_count_unique_and_stable(profiler: SpectralProfiler) -> None:
    names = profiler.feature_names
    assert len(names) == DEFAULT_N_BANDS + N_EXTRA + N_INTENSITY == 42
    assert names[profiler.n_spectral :] == INTENSITY_FEATURES == profiler.intensity_feature_names
    assert profiler.spectral_feature_names == names[: profiler.n_spectral]
    assert len(set(names)) == len(names)
    assert names == SpectralProfiler().feature_names
    assert names[0] == "log_energy_band_00" and names[DEFAULT_N_BANDS - 1] == "log_energy_band_23"
    assert names[DEFAULT_N_BANDS : profiler.n_spectral] == (
        "spectral_slope_mid",
        "spectral_slope_high",
        "direction_x_over_y_mid",
        "direction_x_over_y_high",
        "direction_axes_over_diagonal_high",
        "peak_to_band_mean_high",
        "jpeg_blockiness",
    )
    other = SpectralProfiler(working_size=128, n_bands=12)
    assert len(other.feature_names) == 12 + N_EXTRA + N_INTENSITY


def test_spec_describes_profile(profiler: SpectralProfiler) -> None:
    spec = profiler.spec()
    assert spec["spec_version"] == SPEC_VERSION
    assert spec["working_size"] == DEFAULT_WORKING_SIZE
    assert spec["n_bands"] == DEFAULT_N_BANDS
    assert spec["feature_names"] == list(profiler.feature_names)
    assert len(spec["band_edges_cycles_per_image"]) == DEFAULT_N_BANDS + 1


@pytest.mark.filterwarnings("error")  # e.g. numpy's RankWarning for a slope through one band
@pytest.mark.parametrize(("working_size", "n_bands"), [(512, 24), (64, 8), (128, 12), (256, 16), (1024, 32)])
def test_every_band_holds_bins(working_size: int, n_bands: int) -> None:
    p = SpectralProfiler(working_size=working_size, n_bands=n_bands, planner_effort="FFTW_ESTIMATE")
    edges = p.band_edges
    assert edges.shape == (n_bands + 1,)
    assert edges[0] == 1.0 and edges[1] == 2.0 and edges[-1] == pytest.approx(working_size / 2)
    assert np.all(np.diff(edges) > 0)
    # Every band holds at least one frequency bin: on white noise no band is at the 1e-12 floor.
    features = p.profile(np.random.default_rng(0).normal(size=(working_size, working_size)))
    assert np.all(features[:n_bands] > -6)


def test_band_edges_returns_a_copy(profiler: SpectralProfiler) -> None:
    edges = profiler.band_edges
    edges[:] = 0
    assert profiler.band_edges[0] == 1.0


def test_too_many_bands_for_size_is_refused() -> None:
    # Accepted by the range check (24 <= 192 // 8) but the lowest log bands hold no bin at 192.
    with pytest.raises(InvalidInputError, match="working size 192 is too small for 24 bands"):
        SpectralProfiler(working_size=192, n_bands=24)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"working_size": 48}, r"working_size must be a multiple of 16 and >= 64, got 48"),
        ({"working_size": 100}, r"working_size must be a multiple of 16 and >= 64, got 100"),
        ({"n_bands": 3}, r"n_bands must be in \[4, 64\], got 3"),
        ({"working_size": 64, "n_bands": 9}, r"n_bands must be in \[4, 8\], got 9"),
        ({"fft_threads": 0}, r"fft_threads must be >= 1, got 0"),
        ({"planner_effort": "FFTW_FAST"}, r"planner_effort must be one of .*got 'FFTW_FAST'"),
    ],
)
def test_constructor_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        SpectralProfiler(**kwargs)


@pytest.mark.parametrize("value", [0.0, 7.0, -3.5])
def test_constant_image_is_rejected(small: SpectralProfiler, value: float) -> None:
    with pytest.raises(InvalidImageError, match="image is constant or not finite after resampling"):
        small.profile(np.full((100, 120), value, dtype=np.float32))


def test_non_finite_image_is_rejected(small: SpectralProfiler) -> None:
    image = np.random.default_rng(0).random((100, 100))
    image[3, 4] = np.nan
    with pytest.raises(InvalidImageError, match="constant or not finite"):
        small.profile(image)


@pytest.mark.parametrize("shape", [(10, 100), (100,), (20, 20, 3), (15, 15)])
def test_bad_shape_is_rejected(small: SpectralProfiler, shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidImageError, match=r"expected a 2-D image of at least 16x16 pixels, got shape"):
        small.profile(np.random.default_rng(0).random(shape))


# --------------------------------------------------------------------------- invariance


AFFINE = [(2.0, 0.0), (0.5, 10.0), (3.0, -100.0), (0.01, 0.0), (100.0, 5000.0), (1.0, 1e4), (-1.5, 7.0)]


@pytest.mark.parametrize(("a", "b"), AFFINE)
def test_affine_invariance_real_image(profiler: SpectralProfiler, nih_pixels: list[np.ndarray], a, b) -> None:
    image = nih_pixels[0]
    base = profiler.profile(image)[: profiler.n_spectral]
    moved = profiler.profile(image * np.float32(a) + np.float32(b))[: profiler.n_spectral]
    assert np.abs(moved - base).max() < 1e-4
    np.testing.assert_array_equal(base, profiler.spectral_profile(image))


@pytest.mark.parametrize(("a", "b"), AFFINE)
def test_affine_invariance_synthetic(profiler: SpectralProfiler, a: float, b: float) -> None:
    # Non-square, smaller than the working size (linear upsampling path) and float64.
    image = np.random.default_rng(3).normal(size=(300, 280)).cumsum(axis=0).cumsum(axis=1)
    base = profiler.spectral_profile(image)
    assert np.abs(profiler.spectral_profile(image * a + b) - base).max() < 1e-4


# --------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("cycles", [3, 10, 40, 100])
def test_sinusoid_energy_in_its_band(small: SpectralProfiler, cycles: int) -> None:
    n = small.working_size
    _, x = _grid(n)
    image = np.sin(2 * np.pi * cycles * x / n)
    features = small.profile(image)
    band = int(np.searchsorted(small.band_edges, cycles, side="right") - 1)
    energy = 10.0 ** features[: small.n_bands]
    assert int(np.argmax(energy)) == band
    # The Hann window leaks into the neighbours; the band itself still holds most of the energy.
    assert energy[band] > 0.5


def test_white_noise_high_slope_flatter_than_brown(small: SpectralProfiler) -> None:
    n = small.working_size
    white = np.random.default_rng(1).normal(size=(n, n))
    brown = _brown(n, seed=2)
    for name in ("spectral_slope_high", "spectral_slope_mid"):
        s_white, s_brown = _feature(small, white, name), _feature(small, brown, name)
        assert abs(s_white) < 0.3, name  # flat spectrum
        assert s_brown == pytest.approx(-2.0, abs=0.3), name  # power ~ f^-2
        assert s_white > s_brown + 1.5


@pytest.mark.parametrize(("cycles", "zone"), [(30, "mid"), (80, "high")])
def test_direction_sign(small: SpectralProfiler, cycles: int, zone: str) -> None:
    # docs/spectral-profile.md: E_x = bins near the kx axis = patterns varying along x = vertical lines.
    n = small.working_size
    y, x = _grid(n)
    noise = 0.01 * np.random.default_rng(4).normal(size=(n, n))
    vertical = np.sin(2 * np.pi * cycles * x / n) + noise
    horizontal = np.sin(2 * np.pi * cycles * y / n) + noise
    name = f"direction_x_over_y_{zone}"
    assert _feature(small, vertical, name) > 2.0
    assert _feature(small, horizontal, name) < -2.0
    assert abs(_feature(small, noise, name)) < 0.3


def test_block_steps_raise_blockiness(small: SpectralProfiler) -> None:
    rng = np.random.default_rng(5)
    n = 512
    blocks = np.kron(rng.normal(size=(n // 8, n // 8)), np.ones((8, 8)))
    noise = rng.normal(size=(n, n))
    blocky = _feature(small, blocks + 0.05 * noise, "jpeg_blockiness")
    smooth = _feature(small, noise, "jpeg_blockiness")
    assert blocky > 0.2
    assert abs(smooth) < 0.02


def test_periodic_grid_raises_peak(small: SpectralProfiler) -> None:
    from scipy.ndimage import gaussian_filter

    n = 512
    smooth = gaussian_filter(np.random.default_rng(6).normal(size=(n, n)), 2)
    grid = smooth.copy()
    grid[::8, :] += 3 * smooth.std()
    grid[:, ::8] += 3 * smooth.std()
    plain = _feature(small, smooth, "peak_to_band_mean_high")
    gridded = _feature(small, grid, "peak_to_band_mean_high")
    assert gridded > plain + 1.0


@pytest.mark.parametrize(
    "shape", [(224, 224), (512, 512), (1024, 1024), (1955, 1841), (1841, 1955), (300, 17)]
)
def test_native_sizes_give_finite_profiles(profiler: SpectralProfiler, shape: tuple[int, int]) -> None:
    image = np.random.default_rng(7).normal(size=shape).cumsum(axis=1)
    features = profiler.profile(image.astype(np.float32))
    assert features.shape == (42,) and features.dtype == np.float64
    assert np.all(np.isfinite(features))


def test_real_dicom_size_gives_finite_profile(profiler: SpectralProfiler, data_dir: Path) -> None:
    image = load_image(data_dir / "dicom" / "cxr_pa_cr_philips_j2k.dcm")
    assert image.pixels.shape == (1841, 1955) or image.pixels.shape == (1955, 1841)
    assert np.all(np.isfinite(profiler.profile(image.pixels)))


# --------------------------------------------------------------------------- determinism and threads


def test_same_input_same_output(profiler: SpectralProfiler, nih_pixels: list[np.ndarray]) -> None:
    first = profiler.profile(nih_pixels[1])
    assert np.array_equal(first, profiler.profile(nih_pixels[1]))
    assert np.array_equal(first, SpectralProfiler().profile(nih_pixels[1].copy()))


def test_profile_does_not_modify_input(small: SpectralProfiler) -> None:
    image = np.random.default_rng(8).random((256, 256)).astype(np.float32)
    before = image.copy()
    small.profile(image)
    assert np.array_equal(image, before)


def test_threads_give_serial_results(profiler: SpectralProfiler, nih_pixels: list[np.ndarray]) -> None:
    synthetic = [np.random.default_rng(s).normal(size=(600, 700)).cumsum(axis=0) for s in range(2)]
    images = nih_pixels + synthetic
    serial = [profiler.profile(im) for im in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            parallel = list(pool.map(profiler.profile, images))
            for s, p in zip(serial, parallel, strict=True):
                assert np.array_equal(s, p)


# --------------------------------------------------------------------------- wisdom


def test_wisdom_round_trip(tmp_path: Path, small: SpectralProfiler) -> None:
    small.profile(np.random.default_rng(9).random((64, 64)))  # at least one plan exists
    path = tmp_path / "sub" / "wisdom.txt"
    save_wisdom(path)
    assert path.is_file() and path.stat().st_size > 0
    assert not path.with_suffix(".txt.tmp").exists()
    assert load_wisdom(path) is True


def test_wisdom_missing_or_garbage(tmp_path: Path) -> None:
    assert load_wisdom(tmp_path / "absent.txt") is False
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(b"not wisdom at all")
    assert load_wisdom(garbage) is False
    three_parts = tmp_path / "parts.txt"
    three_parts.write_bytes(b"a\n--cxr-monitor-wisdom--\nb\n--cxr-monitor-wisdom--\nc")
    assert load_wisdom(three_parts) is False


@pytest.mark.parametrize(
    ("working_size", "n_bands", "n_mid", "n_high"), [(64, 4, 1, 1), (64, 6, 1, 3), (512, 6, 3, 1)]
)
def test_single_band_slopes_are_refused(working_size: int, n_bands: int, n_mid: int, n_high: int) -> None:
    with pytest.raises(
        InvalidInputError,
        match=rf"working_size {working_size} with {n_bands} bands leaves {n_mid} band\(s\) for the mid and "
        rf"{n_high} for the high spectral slope; each needs at least 2",
    ):
        SpectralProfiler(working_size=working_size, n_bands=n_bands)


@pytest.mark.parametrize(("working_size", "n_bands"), [(64, 8), (128, 16), (256, 24), (512, 24)])
def test_default_band_count_follows_small_sizes(working_size: int, n_bands: int) -> None:
    assert SpectralProfiler(working_size=working_size).n_bands == n_bands


_PROCESS_SCRIPT = """
import hashlib, sys
import numpy as np
from monitor.spectrum import SpectralProfiler
images = [np.random.default_rng(s).normal(size=(700, 650)).cumsum(axis=0) for s in range(3)]
kwargs = {} if sys.argv[1] == "default" else {"planner_effort": sys.argv[1]}
p = SpectralProfiler(**kwargs)
print(hashlib.sha256(b"".join(p.profile(im).tobytes() for im in images)).hexdigest())
"""


def _profiles_in_processes(effort: str, n: int = 3) -> set[str]:
    import subprocess
    import sys

    procs = [
        subprocess.Popen([sys.executable, "-c", _PROCESS_SCRIPT, effort], stdout=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    return set(outs)


def test_estimate_plans_agree_across_processes() -> None:
    assert len(_profiles_in_processes("FFTW_ESTIMATE", n=2)) == 1


def test_default_profiles_agree_across_processes() -> None:
    assert len(_profiles_in_processes("default")) == 1


def test_from_spec_is_the_inverse_of_spec() -> None:
    p = SpectralProfiler(working_size=128, n_bands=12)
    q = SpectralProfiler.from_spec(p.spec(), fft_threads=2)
    assert q.spec() == p.spec() and q.fft_threads == 2
    x = np.random.default_rng(3).random((150, 140))
    np.testing.assert_array_equal(q.profile(x), p.profile(x))


def test_from_spec_refuses_another_version_or_other_features() -> None:
    spec = SpectralProfiler(working_size=128, n_bands=12).spec()
    with pytest.raises(InvalidInputError, match=r"profile spec version '0.9' is not supported"):
        SpectralProfiler.from_spec({**spec, "spec_version": "0.9"})
    with pytest.raises(InvalidInputError, match="feature names differ"):
        SpectralProfiler.from_spec({**spec, "feature_names": spec["feature_names"][::-1]})


# --------------------------------------------------------------------------- intensity component


def _intensity(p: SpectralProfiler, image: np.ndarray, bits: int | None = 8) -> dict[str, float]:
    values = p.profile(image, bits)[p.n_spectral :]
    return dict(zip(INTENSITY_FEATURES, values, strict=True))


SHAPE = INTENSITY_FEATURES[:5]
LEVEL = INTENSITY_FEATURES[5:9]
SATURATION = INTENSITY_FEATURES[9:]


@pytest.mark.parametrize(("a", "b"), [(0.5, 10.0), (0.8, 30.0), (0.3, 0.0), (1.0, -20.0)])
def test_intensity_shape_and_saturation_invariant_to_increasing_affine_maps(
    profiler: SpectralProfiler, nih_pixels: list[np.ndarray], a: float, b: float
) -> None:
    # Maps that keep the 8-bit image inside [0, 255] where it had data (nothing new clips).
    image = nih_pixels[2]
    base = _intensity(profiler, image)
    moved = _intensity(profiler, np.clip(image * np.float32(a) + np.float32(b), -1e9, None))
    for name in SHAPE + SATURATION:
        assert moved[name] == pytest.approx(base[name], abs=1e-3), name
    # The level features are there to move: mean and spread relative to the stored range.
    assert moved["intensity_mean_of_range"] == pytest.approx(
        a * base["intensity_mean_of_range"] + b / 255, abs=1e-4
    )
    assert moved["intensity_std_of_range"] == pytest.approx(a * base["intensity_std_of_range"], rel=1e-4)
    assert moved["intensity_p99_of_range"] == pytest.approx(
        a * base["intensity_p99_of_range"] + b / 255, abs=2e-3
    )


def test_gamma_moves_shape_but_not_saturation(
    profiler: SpectralProfiler, nih_pixels: list[np.ndarray]
) -> None:
    image = nih_pixels[0]
    base = _intensity(profiler, image)
    bright = _intensity(profiler, 255 * (image / 255) ** 0.7)
    dark = _intensity(profiler, 255 * (image / 255) ** 1.3)
    # A gamma below 1 lifts the mid-tones: quantiles move up within the [p1, p99] span.
    assert bright["intensity_quantile_position_50"] > base["intensity_quantile_position_50"] + 0.02
    assert dark["intensity_quantile_position_50"] < base["intensity_quantile_position_50"] - 0.02
    assert (
        bright["intensity_mean_of_range"] > base["intensity_mean_of_range"] > dark["intensity_mean_of_range"]
    )


def test_clipping_raises_the_share_at_the_end(
    profiler: SpectralProfiler, nih_pixels: list[np.ndarray]
) -> None:
    image = nih_pixels[0]
    base = _intensity(profiler, image)
    clipped = _intensity(profiler, np.clip(image * np.float32(1.3), 0, 255))
    assert clipped["intensity_log_share_at_max"] > base["intensity_log_share_at_max"] + 0.5


def test_known_answers_on_a_uniform_ramp(small: SpectralProfiler) -> None:
    # 256 columns 0..255 repeated: a uniform distribution over the full 8-bit range.
    ramp = np.tile(np.arange(256, dtype=np.float32), (256, 1))
    f = _intensity(small, ramp)
    assert f["intensity_quantile_position_50"] == pytest.approx(0.5, abs=0.01)
    assert f["intensity_quantile_position_25"] == pytest.approx(0.245, abs=0.01)
    assert f["intensity_skewness"] == pytest.approx(0.0, abs=0.01)
    assert f["intensity_histogram_entropy"] == pytest.approx(1.0, abs=0.01)
    assert f["intensity_mean_of_range"] == pytest.approx(0.5, abs=0.01)
    assert f["intensity_std_of_range"] == pytest.approx(1 / np.sqrt(12), abs=0.01)
    assert f["intensity_p01_of_range"] == pytest.approx(0.01, abs=0.01)
    assert f["intensity_p99_of_range"] == pytest.approx(0.99, abs=0.01)
    assert f["intensity_log_share_at_max"] == pytest.approx(np.log10(1 / 256 + 1e-4), abs=0.05)


def test_level_is_relative_to_the_stored_bit_depth(small: SpectralProfiler) -> None:
    x = np.random.default_rng(4).random((128, 128)).astype(np.float32) * 1000
    eight = _intensity(small, x / 1000 * 255, 8)
    sixteen = _intensity(small, x / 1000 * 65535, 16)
    for name in INTENSITY_FEATURES:
        assert sixteen[name] == pytest.approx(eight[name], abs=1e-4), name
    # Twelve-bit data read as 16-bit sits in the bottom sixteenth of the range.
    low = _intensity(small, x / 1000 * 4095, 16)
    assert low["intensity_mean_of_range"] == pytest.approx(eight["intensity_mean_of_range"] / 16, rel=0.01)


def test_full_scale_from_header_or_inferred() -> None:
    x = np.array([[0.0, 900.0]])
    assert full_scale(x, 12) == 4095
    assert full_scale(x, None) == 1023  # the smallest 2**b - 1 holding the maximum
    assert full_scale(np.array([[0.0, 255.0]]), None) == 255
    assert full_scale(np.array([[0.0, 0.5]]), None) == 1


def test_profile_image_takes_the_bit_depth_from_the_header(small: SpectralProfiler) -> None:
    x = np.random.default_rng(5).random((128, 128)).astype(np.float32) * 200
    meta = ImageMeta(source="t", format="array", rows=128, columns=128, bits_stored=12)
    np.testing.assert_array_equal(small.profile_image(LoadedImage(x, meta)), small.profile(x, 12))
    assert not np.array_equal(small.profile(x, 12), small.profile(x, 8))


# --------------------------------------------------------------------------- stage timings


def test_timed_profile_is_bit_identical_to_the_untimed_one(
    profiler: SpectralProfiler, nih_pixels: list[np.ndarray], data_dir: Path
) -> None:
    """profile_timed shares profile's code path: the same bits, for v2 and the spectral part alone."""
    dicom = load_image(data_dir / "dicom" / "cxr_pa_cr_philips_j2k.dcm")
    cases = [(p, None) for p in nih_pixels[:2]] + [(dicom.pixels, dicom.meta.bits_stored)]
    cases.append((np.random.default_rng(3).random((300, 200)).astype(np.float32), None))  # enlarged
    for pixels, bits in cases:
        features, times = profiler.profile_timed(pixels, bits)
        assert features.tobytes() == profiler.profile(pixels, bits).tobytes()
        spectral, spectral_times = profiler.profile_timed(pixels, spectral_only=True)
        assert spectral.tobytes() == profiler.spectral_profile(pixels).tobytes()
        assert isinstance(times, StageTimes) and list(times.to_dict()) == list(PROFILE_STAGES)
        assert all(v >= 0 for v in times.to_dict().values()) and times.total > 0
        assert spectral_times.intensity == 0.0  # not run
        assert times.total == pytest.approx(sum(times.to_dict().values()))


def test_timed_profile_validates_like_the_untimed_one(small: SpectralProfiler) -> None:
    with pytest.raises(InvalidImageError, match="constant"):
        small.profile_timed(np.zeros((64, 64)))
    with pytest.raises(InvalidImageError, match="2-D"):
        small.profile_timed(np.zeros((8, 8)))
