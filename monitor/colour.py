"""Is a colour-coded image grey in substance? If so, its luminance.

Real exports of grey radiographs often arrive as RGB: JPEG chroma noise, colour management, a
sepia or blue tint, a red arrow or a coloured text stamp. Their colour is either noise, a tint
(a colour that depends on brightness only, so their luminance is the grey image) or a few
marked pixels. A colour photograph, a heat-map overlay or a false-colour figure instead has
colour that is not a function of brightness on a large share of its pixels.

The rule (measured in ``benchmarks/colour_tolerance.py``, results in
``benchmarks/results/colour_tolerance.md``), in 8-bit JPEG YCbCr levels:

1. chroma of each pixel: the (Cb, Cr) vector of JPEG's full-range BT.601 transform;
2. tint: per luminance bin (32 bins), the median chroma; a tint must keep one hue (bins
   with a visible tint within :data:`TINT_HUE_SPREAD_DEGREES` of their common hue) and cover
   most of the visibly coloured bins and at least 10% of the pixels;
3. coloured pixels: chroma farther than :data:`NOISE_LEVEL` from the tint of their bin (and
   from the tint of their 3x3 neighbourhood's darkest and brightest pixel: JPEG keeps chroma
   at half resolution, so at edges a pixel carries its neighbours' tint);
4. accepted when at most :data:`MAX_COLOURED_SHARE` of the pixels are coloured; the image
   becomes its BT.601 luminance ``0.299 R + 0.587 G + 0.114 B`` (a grey JPEG's Y channel).

numpy and scipy.ndimage only; used by :mod:`monitor.imaging`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "COLOUR_KINDS",
    "ColourAssessment",
    "MAX_COLOURED_SHARE",
    "NOISE_LEVEL",
    "OVERLAY_MIN_SHARE",
    "TINT_HUE_SPREAD_DEGREES",
    "TINT_LEVEL",
    "assess_colour",
    "luminance",
]

NOISE_LEVEL = 12.0
"""Chroma distance (8-bit levels) from the tint that compression or colour management reaches."""

TINT_LEVEL = 2.0
"""Median chroma (8-bit levels) from which a luminance bin counts as tinted rather than noisy."""

MAX_COLOURED_SHARE = 0.05
"""Largest share of coloured pixels (overlays: arrows, text, a UI bar) converted to grey."""

OVERLAY_MIN_SHARE = 0.001
"""Coloured share above which a conversion is reported as removing an overlay (below: a tint or
noise; the label only, the verdict does not depend on it)."""

TINT_HUE_SPREAD_DEGREES = 45.0
"""Largest hue difference between a tinted bin and the tint's common hue."""

COLOUR_KINDS = ("noise", "tint", "overlay")
"""What a conversion removed (``ImageMeta.colour_conversion``), most significant last."""

_BINS = 32
_SAMPLE_PIXELS = 1 << 20  # the decision reads a strided sample of at most ~1 M pixels
_MIN_BIN_SHARE = 0.002  # bins with fewer sampled pixels take their tint from their neighbours

# Full-range BT.601 (JPEG/JFIF) RGB → Y, Cb, Cr rows.
_Y = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_CB = np.array([-0.168736, -0.331264, 0.5], dtype=np.float32)
_CR = np.array([0.5, -0.418688, -0.081312], dtype=np.float32)


@dataclass(frozen=True)
class ColourAssessment:
    """What :func:`assess_colour` found.

    Attributes
    ----------
    kind : {"noise", "tint", "overlay"} or None
        What converting to luminance removes; ``None`` when the image is genuinely coloured.
    coloured_share : float
        Share of pixels whose chroma is beyond :data:`NOISE_LEVEL` from the tint.
    tint_chroma : float
        Largest median chroma of a luminance bin (8-bit levels).
    hue_spread : float
        Largest hue difference (degrees) between tinted bins and their common hue.
    reason : str
        Why the image is genuinely coloured (empty when accepted).
    """

    kind: str | None
    coloured_share: float
    tint_chroma: float
    hue_spread: float
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.kind is not None


def luminance(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luminance of an RGB image.

    Parameters
    ----------
    rgb : ndarray of shape (rows, columns, 3), any integer or float dtype

    Returns
    -------
    ndarray of shape (rows, columns), dtype=float32, C-contiguous
    """
    out = np.zeros(rgb.shape[:2], dtype=np.float32)
    for c in range(3):
        # One channel at a time keeps the peak memory at one float32 plane.
        out += _Y[c] * rgb[..., c].astype(np.float32, copy=False)
    return out


def _full_scale(rgb: np.ndarray) -> tuple[float, float]:
    """(offset, full-scale range) mapping the pixel values onto 0..255 levels."""
    if rgb.dtype == np.uint8:
        return 0.0, 255.0
    if rgb.dtype == np.uint16:
        return 0.0, 65535.0
    lo, hi = float(rgb.min()), float(rgb.max())
    return lo, max(hi - lo, 1e-12)


def assess_colour(
    rgb: np.ndarray, lum: np.ndarray | None = None, *, noise_level: float = NOISE_LEVEL
) -> ColourAssessment:
    """Decide whether an RGB image is grey up to noise, a tint or small overlays.

    Parameters
    ----------
    rgb : ndarray of shape (rows, columns, 3)
        Any integer or float dtype; assumed finite (the caller checks values afterwards).
    lum : ndarray of shape (rows, columns), optional
        ``luminance(rgb)`` if the caller has it already.
    noise_level : float
        Chroma distance from the tint (8-bit levels) below which a pixel is grey; the
        default is the measured :data:`NOISE_LEVEL` (other values are for measuring it).

    Returns
    -------
    ColourAssessment
    """
    rows, columns = rgb.shape[:2]
    step = max(1, math.ceil(math.sqrt(rows * columns / _SAMPLE_PIXELS)))
    sample = rgb[::step, ::step].reshape(-1, 3).astype(np.float32)
    offset, full = _full_scale(rgb)
    to_levels = np.float32(255.0 / full)
    sample = (sample - np.float32(offset)) * to_levels
    y = sample @ _Y
    chroma = np.stack([sample @ _CB, sample @ _CR], axis=1)
    del sample

    bins = _bin(y)
    tint, counts, hue_spread = _tint_by_bin(bins, chroma)
    tint_chroma = float(np.hypot(tint[:, 0], tint[:, 1]).max())
    # JPEG stores chroma at half resolution, so at an edge of a tinted image a pixel carries the
    # tint of its neighbours' brightness: compare with the tint at the darkest and brightest
    # pixel of its 3x3 neighbourhood too, and count it as coloured only if it is far from all.
    if lum is None:
        lum = luminance(rgb)
    near = [bins]
    for extreme in (ndimage.minimum_filter, ndimage.maximum_filter):
        near.append(_bin((extreme(lum, size=3)[::step, ::step].ravel() - np.float32(offset)) * to_levels))
    dist2 = np.min([np.einsum("ij,ij->i", chroma - tint[b], chroma - tint[b]) for b in near], axis=0)
    coloured = dist2 > noise_level**2
    share = float(coloured.mean())

    common = {"coloured_share": share, "tint_chroma": tint_chroma, "hue_spread": hue_spread}
    if share > MAX_COLOURED_SHARE:
        hint = (
            f"; its colour changes hue with brightness by up to {hue_spread:.0f} degrees (false colour)"
            if hue_spread > TINT_HUE_SPREAD_DEGREES
            else ""
        )
        return ColourAssessment(
            kind=None,
            reason=(
                f"{share:.1%} of its pixels carry colour beyond compression noise and a tint; at most "
                f"{MAX_COLOURED_SHARE:.0%} (arrows, text, overlays) can be converted to grey{hint}"
            ),
            **common,
        )
    if share > OVERLAY_MIN_SHARE:
        kind = "overlay"
    elif tint_chroma > TINT_LEVEL:
        kind = "tint"
    else:
        kind = "noise"
    return ColourAssessment(kind=kind, **common)


def _bin(y: np.ndarray) -> np.ndarray:
    """Luminance bin of 8-bit-level luminance values."""
    return np.clip((y * (_BINS / 256.0)).astype(np.intp), 0, _BINS - 1)


def _tint_by_bin(bins: np.ndarray, chroma: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The tint: median (Cb, Cr) of each luminance bin where that is one global hue, else 0.

    Returns the tint of each bin, the sampled pixels per bin and the largest hue difference
    (degrees) between a tinted bin and the common hue. Bins off the common hue, and bins
    holding few pixels, get no tint, so their colour counts as colour. A tint must hold most
    of the visibly coloured bins' pixels and at least twice :data:`MAX_COLOURED_SHARE` of
    all pixels: a coloured bar that fills the bins of its own brightness is an overlay.
    """
    counts = np.bincount(bins, minlength=_BINS)
    order = np.argsort(bins, kind="stable")
    groups = np.split(chroma[order], np.cumsum(counts)[:-1])
    median = np.zeros((_BINS, 2), dtype=np.float64)
    populated = counts >= max(1, _MIN_BIN_SHARE * bins.size)
    for b in np.flatnonzero(populated):
        median[b] = np.median(groups[b], axis=0)
    magnitude = np.hypot(median[:, 0], median[:, 1])
    tinted = populated & (magnitude > TINT_LEVEL)
    tint = np.zeros_like(median)
    if not tinted.any():
        return tint, counts, 0.0
    unit = median[tinted] / magnitude[tinted, None]
    mean = (unit * counts[tinted, None]).sum(axis=0)
    norm = float(np.hypot(*mean))
    angle = np.full(_BINS, 180.0)
    if norm > 1e-9:
        angle[tinted] = np.degrees(np.arccos(np.clip(unit @ (mean / norm), -1.0, 1.0)))
    hue_spread = float(angle[tinted].max())
    one_hue = tinted & (angle <= TINT_HUE_SPREAD_DEGREES)
    n_one_hue = counts[one_hue].sum()
    if n_one_hue >= 0.5 * counts[tinted].sum() and n_one_hue >= 2 * MAX_COLOURED_SHARE * bins.size:
        tint[one_hue] = median[one_hue]
    return tint, counts, hue_spread
