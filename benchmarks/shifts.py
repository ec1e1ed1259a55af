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
    "apply_shift",
    "blur",
    "downsample_upsample",
    "gamma",
    "grid",
    "jpeg",
    "quantum_noise",
    "unsharp_mask",
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
}

LEVELS: dict[str, dict[str, float]] = {
    "blur": {"mild": 1.0, "moderate": 2.0, "strong": 3.0},  # sigma, pixels
    "sharpen": {"mild": 0.5, "moderate": 1.0, "strong": 2.0},  # unsharp amount, radius 2 px
    "noise": {"mild": 0.02, "moderate": 0.04, "strong": 0.08},  # noise std at mid-grey / full scale
    "jpeg": {"mild": 50, "moderate": 25, "strong": 10},  # Pillow quality
    "resample": {"mild": 2, "moderate": 3, "strong": 4},  # down/up factor
    "gamma": {"mild": 0.8, "moderate": 0.6, "strong": 0.4},  # exponent
    "grid": {"mild": 0.03, "moderate": 0.06, "strong": 0.12},  # modulation depth
}

IDENTITY: dict[str, float] = {
    "blur": 0.0,
    "sharpen": 0.0,
    "noise": 0.0,
    "resample": 1,
    "gamma": 1.0,
    "grid": 0.0,
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
