"""The colour rule on a corpus built by code (benchmarks/colour_corpus.py): near-grey exports are
converted to luminance and say so; genuinely coloured images are refused with a clear error."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.colour_corpus import CASES, chest_phantom, encode, grey_rgb_noise  # noqa: E402
from monitor.colour import COLOUR_KINDS, assess_colour, luminance  # noqa: E402
from monitor.errors import UnsupportedImageError  # noqa: E402
from monitor.imaging import from_array, load_bytes  # noqa: E402

GREY = chest_phantom(384)
ACCEPTED = [c for c in CASES if c.grey_in_substance]
REJECTED = [c for c in CASES if not c.grey_in_substance]


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.name for c in ACCEPTED])
def test_near_grey_is_accepted_and_recorded(case) -> None:
    image = load_bytes(case.build(GREY, np.random.default_rng(0)), name="x")
    meta = image.meta
    assert image.pixels.ndim == 2 and image.pixels.dtype == np.float32
    if case.name.startswith("grey RGB PNG"):
        assert meta.colour_conversion is None  # identical channels: nothing to convert
    elif meta.colour_conversion is None:  # the JPEG decoder gave identical channels back
        assert meta.coloured_share is None
    else:
        assert meta.colour_conversion in COLOUR_KINDS
        assert 0.0 <= meta.coloured_share <= 0.05
    if "tint" in case.name and "arrow" not in case.name:
        assert meta.colour_conversion == "tint"
    if any(w in case.name for w in ("arrow", "stamp", "title bar")):
        assert meta.colour_conversion == "overlay"


@pytest.mark.parametrize("case", REJECTED, ids=[c.name for c in REJECTED])
def test_genuinely_coloured_is_rejected(case) -> None:
    with pytest.raises(UnsupportedImageError, match=r"^x: colour image is not supported \(.*must be grey\)$"):
        load_bytes(case.build(GREY, np.random.default_rng(0)), name="x")


def test_tint_and_noise_leave_the_grey_image() -> None:
    """Luminance of a tinted or noisy export is the grey image, up to rounding and JPEG loss."""
    sepia = np.clip(GREY[..., None] * np.array([1.0, 0.9, 0.7]), 0, 255).astype(np.uint8)
    expected = 0.299 * 1.0 + 0.587 * 0.9 + 0.114 * 0.7  # a tint scales the luminance only
    out = from_array(sepia)
    assert out.meta.colour_conversion == "tint"
    np.testing.assert_allclose(out.pixels, GREY * expected, atol=1.0)
    noisy = load_bytes(encode(grey_rgb_noise(GREY, np.random.default_rng(1), 4.0), quality=95, subsampling=0))
    assert noisy.meta.colour_conversion == "noise"
    assert np.abs(noisy.pixels - GREY).mean() < 3.0  # the dither alone is up to 4 levels per channel


def test_overlay_pixels_become_grey_luminance() -> None:
    rgb = np.repeat(GREY[..., None], 3, axis=2)
    rgb[10:20, 10:60] = (255, 0, 0)
    out = from_array(rgb)
    assert out.meta.colour_conversion == "overlay"
    assert out.pixels[15, 30] == pytest.approx(0.299 * 255, abs=0.01)
    np.testing.assert_allclose(out.pixels[100:], GREY[100:], atol=0.01)


def test_rule_is_independent_of_bit_depth_and_dtype() -> None:
    """16-bit and float arrays are judged on the same 8-bit-level scale as 8-bit ones."""
    rgb = np.repeat(np.minimum(GREY, 250)[..., None], 3, axis=2).astype(np.float64)
    rgb[..., 2] += 2.0  # a faint blue cast: noise at 8 bits
    for arr in (rgb.astype(np.uint8), (rgb * 257).astype(np.uint16), rgb / 255.0):
        assert assess_colour(arr).kind in ("noise", "tint")
    heat = np.stack([GREY, GREY[::-1], GREY[:, ::-1]], axis=-1)
    for arr in (heat, heat.astype(np.uint16) * 257, heat / 255.0):
        assert assess_colour(arr).kind is None


def test_luminance_is_bt601() -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 1] = (0, 0, 255)
    np.testing.assert_allclose(luminance(rgb), [[0.299 * 255, 0], [0, 0.114 * 255]], rtol=1e-6)
