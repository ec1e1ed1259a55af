"""Acquisition and preprocessing shifts with a known strength, applied to real radiographs.

Each shift is a pure function of an image (a 2-D array in its native intensity range
``[0, max_value]``, e.g. 8-bit for Kermany and NIH) and one physical strength parameter; it
returns ``float32`` in the same range, clipped. Shifts with randomness (noise, the phase of
the grid) take a ``seed`` and are deterministic for it. :data:`LEVELS` gives three graded
strengths per shift (``mild``, ``moderate``, ``strong``) and :data:`IDENTITY` the strength
that leaves an image unchanged, where one exists (JPEG re-compression has none).

Strengths are in native pixels of the image the shift is applied to (1024x1024 for NIH,
224x224 for Kermany), which is where a detector or a post-processing step would act.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "IDENTITY",
    "LEVELS",
    "LEVEL_NAMES",
    "SHIFTS",
    "OUTPUT_BITS",
    "apply_shift",
    "blur",
    "brightness",
    "clahe",
    "contrast",
    "downsample_upsample",
    "equalize",
    "gamma",
    "grid",
    "jpeg",
    "quantum_noise",
    "unsharp_mask",
    "voi_window",
]

LEVEL_NAMES = ("mild", "moderate", "strong")


def _as_float(pixels: np.ndarray, max_value: float) -> np.ndarray:
    x = np.asarray(pixels, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {x.shape}")
    if max_value <= 0:
        raise ValueError(f"max_value must be positive, got {max_value}")
    return x


def _clip(x: np.ndarray, max_value: float) -> np.ndarray:
    return np.clip(x, 0.0, max_value).astype(np.float32, copy=False)


def blur(pixels: np.ndarray, sigma: float, *, max_value: float = 255.0, seed: int = 0) -> np.ndarray:
    """Gaussian blur of standard deviation ``sigma`` pixels: a detector or processing with lower MTF."""
    x = _as_float(pixels, max_value)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return _clip(x.copy(), max_value)
    return _clip(ndimage.gaussian_filter(x, sigma, mode="reflect"), max_value)


def unsharp_mask(
    pixels: np.ndarray, amount: float, *, radius: float = 2.0, max_value: float = 255.0, seed: int = 0
) -> np.ndarray:
    """Edge enhancement ``x + amount * (x - blur(x, radius))``, as vendor post-processing applies."""
    x = _as_float(pixels, max_value)
    if amount < 0:
        raise ValueError(f"amount must be >= 0, got {amount}")
    if amount == 0:
        return _clip(x.copy(), max_value)
    return _clip(x + amount * (x - ndimage.gaussian_filter(x, radius, mode="reflect")), max_value)


def quantum_noise(
    pixels: np.ndarray, relative_std: float, *, max_value: float = 255.0, seed: int = 0
) -> np.ndarray:
    """Signal-dependent (Poisson) noise: a lower dose.

    The image is read as photon counts with ``N0 = 0.5 / relative_std**2`` counts at full
    scale, so the noise standard deviation at mid-grey is ``relative_std * max_value`` and
    grows with the square root of the signal.
    """
    x = _as_float(pixels, max_value)
    if relative_std < 0:
        raise ValueError(f"relative_std must be >= 0, got {relative_std}")
    if relative_std == 0:
        return _clip(x.copy(), max_value)
    n0 = 0.5 / relative_std**2
    rng = np.random.default_rng(seed)
    counts = rng.poisson(np.clip(x, 0, max_value).astype(np.float64) / max_value * n0)
    return _clip(counts / n0 * max_value, max_value)


def jpeg(pixels: np.ndarray, quality: int, *, max_value: float = 255.0, seed: int = 0) -> np.ndarray:
    """Re-compress as 8-bit baseline JPEG at ``quality`` (Pillow scale 1..95) and decode."""
    x = _as_float(pixels, max_value)
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    q8 = np.clip(np.rint(x / max_value * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(q8, mode="L").save(buf, format="JPEG", quality=int(quality), subsampling=0)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        back = np.asarray(im.convert("L"), dtype=np.float32)
    return _clip(back * np.float32(max_value / 255.0), max_value)


def downsample_upsample(
    pixels: np.ndarray, factor: float, *, max_value: float = 255.0, seed: int = 0
) -> np.ndarray:
    """Area-average down by ``factor`` (a coarser detector), then bilinear back to the original size."""
    x = _as_float(pixels, max_value)
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if factor == 1:
        return _clip(x.copy(), max_value)
    h, w = x.shape
    small = (max(1, round(w / factor)), max(1, round(h / factor)))
    im = Image.fromarray(x, mode="F")
    out = im.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BILINEAR)
    return _clip(np.asarray(out, dtype=np.float32), max_value)


def gamma(pixels: np.ndarray, exponent: float, *, max_value: float = 255.0, seed: int = 0) -> np.ndarray:
    """Display curve change ``max * (x / max) ** exponent`` (< 1 brightens, > 1 darkens)."""
    x = _as_float(pixels, max_value)
    if exponent <= 0:
        raise ValueError(f"gamma exponent must be > 0, got {exponent}")
    if exponent == 1:
        return _clip(x.copy(), max_value)
    return _clip(max_value * np.power(np.clip(x / max_value, 0, 1), exponent), max_value)


def brightness(pixels: np.ndarray, factor: float, *, max_value: float = 255.0, seed: int = 0) -> np.ndarray:
    """Exposure or gain change ``x * factor``, clipped to the stored range."""
    x = _as_float(pixels, max_value)
    if factor <= 0:
        raise ValueError(f"brightness factor must be > 0, got {factor}")
    return _clip(x * np.float32(factor), max_value)


def contrast(pixels: np.ndarray, factor: float, *, max_value: float = 255.0, seed: int = 0) -> np.ndarray:
    """Contrast change around the image mean, ``m + factor * (x - m)``, clipped to the stored range."""
    x = _as_float(pixels, max_value)
    if factor <= 0:
        raise ValueError(f"contrast factor must be > 0, got {factor}")
    if factor == 1:
        return _clip(x.copy(), max_value)
    m = np.float32(x.mean(dtype=np.float64))
    return _clip(m + np.float32(factor) * (x - m), max_value)


def voi_window(pixels: np.ndarray, width: float, *, max_value: float = 255.0, seed: int = 0) -> np.ndarray:
    """A new VOI window of relative ``width`` centred on mid-range, baked into 16-bit stored data.

    ``y = clip((x / max - 0.5) / width + 0.5, 0, 1)``, quantised to 16 bits (0..65535) and
    returned rescaled to ``[0, max_value]``; benchmarks profile it as 16-bit data
    (:data:`OUTPUT_BITS`): ``rint(y * 65535)`` with ``bits_stored=16``.
    """
    x = _as_float(pixels, max_value)
    if not 0 < width <= 4:
        raise ValueError(f"VOI width must be in (0, 4], got {width}")
    if width == 1:
        return _clip(x.copy(), max_value)
    y = np.clip((x / max_value - 0.5) / width + 0.5, 0.0, 1.0)
    return _clip(np.rint(y * 65535.0) / 65535.0 * max_value, max_value)


def equalize(pixels: np.ndarray, strength: float, *, max_value: float = 255.0, seed: int = 0) -> np.ndarray:
    """Global histogram equalisation on 256 grey levels, blended: ``(1 - s) x + s eq(x)``."""
    x = _as_float(pixels, max_value)
    if not 0 <= strength <= 1:
        raise ValueError(f"equalisation strength must be in [0, 1], got {strength}")
    levels = np.clip(np.rint(x / max_value * 255), 0, 255).astype(np.intp)
    cdf = np.cumsum(np.bincount(levels.ravel(), minlength=256)).astype(np.float64)
    cdf = (cdf - cdf[0]) / max(cdf[-1] - cdf[0], 1.0)
    eq = (cdf[levels] * max_value).astype(np.float32)
    return _clip((1 - strength) * x + np.float32(strength) * eq, max_value)


def clahe(
    pixels: np.ndarray, clip_limit: float, *, tiles: int = 8, max_value: float = 255.0, seed: int = 0
) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (CLAHE) on 256 grey levels.

    ``tiles x tiles`` tiles; each tile's histogram is clipped at ``clip_limit`` times its mean
    bin count, the excess spread evenly, and its CDF is the tile's mapping; every pixel blends
    the mappings of the four nearest tile centres bilinearly (the classic Zuiderveld scheme).
    """
    x = _as_float(pixels, max_value)
    if clip_limit < 1:
        raise ValueError(f"CLAHE clip limit must be >= 1, got {clip_limit}")
    h, w = x.shape
    levels = np.clip(np.rint(x / max_value * 255), 0, 255).astype(np.intp)
    ty = np.linspace(0, h, tiles + 1).astype(int)
    tx = np.linspace(0, w, tiles + 1).astype(int)
    maps = np.empty((tiles, tiles, 256))
    for i in range(tiles):
        for j in range(tiles):
            tile = levels[ty[i] : ty[i + 1], tx[j] : tx[j + 1]]
            hist = np.bincount(tile.ravel(), minlength=256).astype(np.float64)
            limit = clip_limit * tile.size / 256
            excess = np.maximum(hist - limit, 0).sum()
            hist = np.minimum(hist, limit) + excess / 256
            cdf = np.cumsum(hist)
            maps[i, j] = cdf / cdf[-1]
    # Position of each row/column between tile centres.
    cy = (ty[:-1] + ty[1:]) / 2
    cx = (tx[:-1] + tx[1:]) / 2
    fy = np.clip(np.interp(np.arange(h), cy, np.arange(tiles)), 0, tiles - 1)
    fx = np.clip(np.interp(np.arange(w), cx, np.arange(tiles)), 0, tiles - 1)
    y0 = np.minimum(np.floor(fy).astype(int), tiles - 2)
    x0 = np.minimum(np.floor(fx).astype(int), tiles - 2)
    wy = (fy - y0)[:, None]
    wx = (fx - x0)[None, :]
    Y0, X0 = y0[:, None], x0[None, :]
    out = (
        (1 - wy) * (1 - wx) * maps[Y0, X0, levels]
        + (1 - wy) * wx * maps[Y0, X0 + 1, levels]
        + wy * (1 - wx) * maps[Y0 + 1, X0, levels]
        + wy * wx * maps[Y0 + 1, X0 + 1, levels]
    )
    return _clip(out * max_value, max_value)


GRID_FREQUENCY = 0.35
"""Grid line frequency in cycles per native pixel (lines run vertically, the pattern varies along x)."""


def grid(
    pixels: np.ndarray,
    amplitude: float,
    *,
    frequency: float = GRID_FREQUENCY,
    max_value: float = 255.0,
    seed: int = 0,
) -> np.ndarray:
    """A stationary anti-scatter grid left in the image: ``x * (1 - a * (1 + cos(2 pi f col + phi)) / 2)``.

    Multiplicative because the lead strips absorb a fixed share of the primary beam;
    ``phi`` is drawn from ``seed``.
    """
    x = _as_float(pixels, max_value)
    if not 0 <= amplitude < 1:
        raise ValueError(f"grid amplitude must be in [0, 1), got {amplitude}")
    if not 0 < frequency <= 0.5:
        raise ValueError(f"grid frequency must be in (0, 0.5] cycles/pixel, got {frequency}")
    if amplitude == 0:
        return _clip(x.copy(), max_value)
    phi = np.random.default_rng(seed).uniform(0, 2 * np.pi)
    cols = np.arange(x.shape[1], dtype=np.float64)
    line = 1.0 - amplitude * 0.5 * (1.0 + np.cos(2 * np.pi * frequency * cols + phi))
    return _clip(x * line[None, :].astype(np.float32), max_value)


ShiftFunction = Callable[..., np.ndarray]

SHIFTS: dict[str, ShiftFunction] = {
    "blur": blur,
    "sharpen": unsharp_mask,
    "noise": quantum_noise,
    "jpeg": jpeg,
    "resample": downsample_upsample,
    "gamma": gamma,
    "grid": grid,
    "gamma_dark": gamma,
    "bright": brightness,
    "dark": brightness,
    "contrast_up": contrast,
    "contrast_down": contrast,
    "voi": voi_window,
    "equalize": equalize,
    "clahe": clahe,
}

PHOTOMETRIC = (
    "gamma",
    "gamma_dark",
    "bright",
    "dark",
    "contrast_up",
    "contrast_down",
    "voi",
    "equalize",
    "clahe",
)
"""The shifts a mean/std-normalised spectrum cannot see (or barely): the intensity component's job."""

OUTPUT_BITS: dict[str, int] = {"voi": 16}
"""Shifts whose output stands for data stored at another bit depth than the input (default: same)."""

LEVELS: dict[str, dict[str, float]] = {
    "blur": {"mild": 1.0, "moderate": 2.0, "strong": 3.0},  # sigma, pixels
    "sharpen": {"mild": 0.5, "moderate": 1.0, "strong": 2.0},  # unsharp amount, radius 2 px
    "noise": {"mild": 0.02, "moderate": 0.04, "strong": 0.08},  # noise std at mid-grey / full scale
    "jpeg": {"mild": 50, "moderate": 25, "strong": 10},  # Pillow quality
    "resample": {"mild": 2, "moderate": 3, "strong": 4},  # down/up factor
    "gamma": {"mild": 0.9, "moderate": 0.8, "strong": 0.7},  # exponent < 1: brighter mid-tones
    "grid": {"mild": 0.03, "moderate": 0.06, "strong": 0.12},  # modulation depth
    "gamma_dark": {"mild": 1.1, "moderate": 1.2, "strong": 1.3},  # exponent > 1: darker mid-tones
    "bright": {"mild": 1.1, "moderate": 1.2, "strong": 1.3},  # gain
    "dark": {"mild": 0.9, "moderate": 0.8, "strong": 0.7},  # gain
    "contrast_up": {"mild": 1.1, "moderate": 1.2, "strong": 1.3},  # factor around the mean
    "contrast_down": {"mild": 0.9, "moderate": 0.8, "strong": 0.7},  # factor around the mean
    "voi": {"mild": 0.9, "moderate": 0.8, "strong": 0.7},  # relative window width (16-bit output)
    "equalize": {"mild": 0.33, "moderate": 0.67, "strong": 1.0},  # blend with the equalised image
    "clahe": {"mild": 1.5, "moderate": 2.0, "strong": 3.0},  # clip limit, 8x8 tiles
}

IDENTITY: dict[str, float] = {
    "blur": 0.0,
    "sharpen": 0.0,
    "noise": 0.0,
    "resample": 1,
    "gamma": 1.0,
    "grid": 0.0,
    "gamma_dark": 1.0,
    "bright": 1.0,
    "dark": 1.0,
    "contrast_up": 1.0,
    "contrast_down": 1.0,
    "voi": 1.0,
    "equalize": 0.0,
}


def apply_shift(
    pixels: np.ndarray, kind: str, level: str | float, *, max_value: float = 255.0, seed: int = 0
) -> np.ndarray:
    """Apply shift ``kind`` at a named level of :data:`LEVELS` or at an explicit strength.

    Returns
    -------
    ndarray of shape ``pixels.shape``, dtype=float32, values in ``[0, max_value]``.
    """
    if kind not in SHIFTS:
        raise ValueError(f"unknown shift {kind!r}; known: {', '.join(SHIFTS)}")
    if isinstance(level, str):
        if level not in LEVELS[kind]:
            raise ValueError(f"unknown level {level!r} for {kind}; known: {', '.join(LEVELS[kind])}")
        level = LEVELS[kind][level]
    return SHIFTS[kind](pixels, level, max_value=max_value, seed=seed)
