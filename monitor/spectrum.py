"""Image → profile: how signal energy spreads over frequency, plus the intensity distribution.

The profile has two components. The *spectral* features see the image after mean and
standard-deviation normalisation (invariant to ``a*x + b``); the *intensity* features see
what that normalisation hides: the shape of the grey-level distribution and its level within
the stored bit range. The full specification (geometry, normalisation, window, transform,
features and their invariances) is in ``docs/spectral-profile.md``; :data:`SPEC_VERSION` changes whenever any number a profile
holds would change. FFTs run through pyFFTW with one plan per (shape, threads) per
thread, built once and reused; ``execute`` releases the GIL, so threads scale.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyfftw

from .errors import InvalidImageError, InvalidInputError
from .types import LoadedImage

__all__ = [
    "DEFAULT_N_BANDS",
    "DEFAULT_WORKING_SIZE",
    "INTENSITY_FEATURES",
    "PROFILE_STAGES",
    "SPEC_VERSION",
    "SpectralProfiler",
    "StageTimes",
    "full_scale",
    "load_wisdom",
    "save_wisdom",
]

SPEC_VERSION = "2.0"
DEFAULT_WORKING_SIZE = 512
DEFAULT_N_BANDS = 24
# Intensity histogram: fine bins over the working image's own [min, max]; entropy on coarse
# bins over its [1st, 99th] percentile (both counts are part of the spec).
_FINE_BINS = 1024
_ENTROPY_BINS = 64
_SHARE_FLOOR = 1e-4  # log10 of a share of pixels: 0 becomes -4 (1 in 10^4)

INTENSITY_FEATURES: tuple[str, ...] = (
    # shape of the distribution: invariant to a*x + b (a > 0) while nothing clips
    "intensity_quantile_position_25",
    "intensity_quantile_position_50",
    "intensity_quantile_position_75",
    "intensity_skewness",
    "intensity_histogram_entropy",
    # level within the stored range [0, 2**bits_stored - 1]: moved by a*x + b on purpose
    "intensity_mean_of_range",
    "intensity_std_of_range",
    "intensity_p01_of_range",
    "intensity_p99_of_range",
    # saturation: share at either end of the image's own range; invariant to a*x + b (a > 0),
    # moved by clipping
    "intensity_log_share_at_min",
    "intensity_log_share_at_max",
)
_PLANNER_EFFORTS = ("FFTW_ESTIMATE", "FFTW_MEASURE", "FFTW_PATIENT")

PROFILE_STAGES: tuple[str, ...] = (
    "working_image",
    "normalise",
    "intensity",
    "window",
    "fft",
    "spectral_features",
    "blockiness",
)
"""The stages of a profile, in the order they run (see :class:`StageTimes`)."""


@dataclass(frozen=True)
class StageTimes:
    """Seconds one profile spent in each stage (:meth:`SpectralProfiler.profile_timed`).

    Attributes
    ----------
    working_image : float
        Centre square crop and anti-aliased resample to the working size (incl. the copy
        into the FFT plan's input buffer).
    normalise : float
        Mean and standard deviation of the working image; subtracting the mean.
    intensity : float
        The intensity component (histogram, quantiles, moments); 0 for the spectral
        component alone.
    window : float
        Hann window and scaling by the standard deviation.
    fft : float
        The working-size real FFT.
    spectral_features : float
        Power spectrum, band energies, slopes, sector ratios and the peak feature.
    blockiness : float
        JPEG blockiness on the native image.
    """

    working_image: float
    normalise: float
    intensity: float
    window: float
    fft: float
    spectral_features: float
    blockiness: float

    @property
    def total(self) -> float:
        """Sum of the stages: the profile's time but its input check and FFT plan lookup."""
        return float(sum(self.to_dict().values()))

    def to_dict(self) -> dict[str, float]:
        """Seconds per stage, in the order of :data:`PROFILE_STAGES`."""
        return {name: float(getattr(self, name)) for name in PROFILE_STAGES}


# Planning mutates FFTW's global planner state; executing a finished plan does not.
_PLAN_LOCK = threading.Lock()
_LOCAL = threading.local()
_WISDOM_LOADED: set[str] = set()
# A plan that takes longer than this was not covered by wisdom: worth saving what was learnt.
_SLOW_PLAN_SECONDS = 0.05


def _plan(n: int, threads: int, effort: str, wisdom_path: str | None = None) -> pyfftw.FFTW:
    """This thread's rfft2 plan for an (n, n) float32 image, with its own buffers."""
    plans = getattr(_LOCAL, "plans", None)
    if plans is None:
        plans = _LOCAL.plans = {}
    key = (n, threads, effort)
    plan = plans.get(key)
    if plan is None:
        if wisdom_path is not None and wisdom_path not in _WISDOM_LOADED:
            load_wisdom(wisdom_path)
            _WISDOM_LOADED.add(wisdom_path)
        src = pyfftw.empty_aligned((n, n), dtype=np.float32)
        dst = pyfftw.empty_aligned((n, n // 2 + 1), dtype=np.complex64)
        t0 = time.perf_counter()
        with _PLAN_LOCK:
            plan = pyfftw.FFTW(src, dst, axes=(0, 1), flags=(effort,), threads=threads)
        if wisdom_path is not None and time.perf_counter() - t0 > _SLOW_PLAN_SECONDS:
            try:
                save_wisdom(wisdom_path)
            except OSError:
                pass  # a read-only cache only costs planning time next start
        plans[key] = plan
    return plan


def load_wisdom(path: str | os.PathLike) -> bool:
    """Import FFTW wisdom saved by :func:`save_wisdom`; ``False`` if absent or unusable."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return False
    parts = raw.split(b"\n--cxr-monitor-wisdom--\n")
    if len(parts) != 3:
        return False
    with _PLAN_LOCK:
        return bool(any(pyfftw.import_wisdom(tuple(parts))))


def save_wisdom(path: str | os.PathLike) -> None:
    """Write FFTW's accumulated wisdom (plain text, not pickle) so later runs plan instantly."""
    with _PLAN_LOCK:
        wisdom = pyfftw.export_wisdom()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(b"\n--cxr-monitor-wisdom--\n".join(wisdom))
    tmp.replace(path)


@lru_cache(maxsize=32)
def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix: box (area) averaging when shrinking, linear when enlarging."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    if n_in >= n_out:
        scale = n_in / n_out
        for i in range(n_out):
            lo, hi = i * scale, (i + 1) * scale
            j0, j1 = int(np.floor(lo)), min(int(np.ceil(hi)), n_in)
            for j in range(j0, j1):
                m[i, j] = min(hi, j + 1) - max(lo, j)
        m /= scale
    else:
        x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        x = np.clip(x, 0, n_in - 1)
        j0 = np.floor(x).astype(int)
        j1 = np.minimum(j0 + 1, n_in - 1)
        frac = x - j0
        m[np.arange(n_out), j0] += 1 - frac
        m[np.arange(n_out), j1] += frac
    return m.astype(np.float32)


def _box_mean(x: np.ndarray, f: int) -> np.ndarray:
    """Mean over f x f blocks of a square image, float32.

    Strided adds stream through memory; numpy's reduction of a length-f inner axis
    (``reshape(m, f, m, f).sum``) was 4-13x slower on 1024-2048 px images.
    """
    m = x.shape[0] // f
    x = x[: m * f, : m * f]
    cols = x[:, 0::f].astype(np.float32, copy=True)
    for j in range(1, f):
        cols += x[:, j::f]
    out = cols[0::f].copy()
    for i in range(1, f):
        out += cols[i::f]
    out *= np.float32(1.0 / (f * f))
    return out


@lru_cache(maxsize=32)
def _resample_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The resampling matrix as taps: ``index, weight`` of shape (n_taps, n_out).

    Each output pixel draws on a few neighbouring input pixels, so a sum over the few
    taps replaces a dense matrix product: no BLAS, whose result depends on its thread
    count, and a fixed summation order, so a profile is the same bits in every process.
    """
    m = _resample_matrix(n_in, n_out)
    nonzero = m != 0
    n_taps = int(nonzero.sum(axis=1).max())
    index = np.zeros((n_taps, n_out), dtype=np.intp)
    weight = np.zeros((n_taps, n_out), dtype=np.float32)
    for i in range(n_out):
        cols = np.flatnonzero(nonzero[i])
        index[: cols.size, i] = cols
        index[cols.size :, i] = cols[-1]  # padding taps carry weight 0
        weight[: cols.size, i] = m[i, cols]
    return index, weight


def _apply_taps(x: np.ndarray, taps: tuple[np.ndarray, np.ndarray], axis: int) -> np.ndarray:
    """Resample ``x`` along ``axis`` (0: rows, 1: columns) with precomputed taps; float32."""
    index, weight = taps
    out = None
    for idx, w in zip(index, weight, strict=True):
        term = x[idx, :] * w[:, None] if axis == 0 else x[:, idx] * w[None, :]
        out = term if out is None else out + term
    return np.ascontiguousarray(out, dtype=np.float32)


@lru_cache(maxsize=8)
def _hann2d(n: int) -> np.ndarray:
    w = np.hanning(n + 2)[1:-1]
    return np.outer(w, w).astype(np.float32)


@dataclass(frozen=True)
class _Bins:
    """Precomputed frequency-plane bookkeeping for one (working size, band count)."""

    edges: np.ndarray  # (n_bands + 1,) cycles per image
    centers: np.ndarray  # (n_bands,) geometric band centres
    flat_index: np.ndarray  # bins inside [edges[0], edges[-1]), into the flattened half plane
    band_of_bin: np.ndarray
    weight: np.ndarray  # 2 for bins that stand for a mirrored twin in the full plane
    bin_count: np.ndarray  # (n_bands,) weighted number of bins per band
    sector: np.ndarray  # 0 = along x, 1 = along y, 2 = diagonal, -1 = other
    mid: np.ndarray  # bool masks over the selected bins
    high: np.ndarray
    peak_zone: np.ndarray


@lru_cache(maxsize=8)
def _bins(n: int, n_bands: int) -> _Bins:
    ky = np.fft.fftfreq(n, d=1.0 / n)[:, None]
    kx = np.arange(n // 2 + 1, dtype=np.float64)[None, :]
    r = np.hypot(ky, kx)
    edges = np.concatenate([[1.0], np.geomspace(2.0, n / 2, n_bands)])
    band = np.searchsorted(edges, r, side="right") - 1
    band[r >= n / 2] = -1  # corners beyond Nyquist along the axes are anisotropic
    weight = np.where((kx > 0) & (kx < n // 2), 2.0, 1.0) * np.ones_like(r)
    sel = np.flatnonzero(band.ravel() >= 0)
    band_sel = band.ravel()[sel]
    w_sel = weight.ravel()[sel]
    theta = np.degrees(np.arctan2(np.abs(ky), kx) * np.ones_like(r)).ravel()[sel]
    sector = np.full(sel.shape, -1)
    sector[theta < 10] = 0
    sector[theta > 80] = 1
    sector[(theta > 35) & (theta < 55)] = 2
    r_sel = r.ravel()[sel]
    counts = np.bincount(band_sel, weights=w_sel, minlength=n_bands)
    if np.any(counts == 0):
        raise InvalidInputError(
            f"working size {n} is too small for {n_bands} bands: some bands hold no frequency bin"
        )
    return _Bins(
        edges=edges,
        centers=np.sqrt(edges[:-1] * edges[1:]),
        flat_index=sel.astype(np.intp),
        band_of_bin=band_sel.astype(np.intp),
        weight=w_sel.astype(np.float64),
        bin_count=counts,
        sector=sector,
        mid=(r_sel >= n / 16) & (r_sel < n / 4),
        high=(r_sel >= n / 4),
        peak_zone=(r_sel >= n / 16),
    )


def _log10_ratio(a: float, b: float) -> float:
    tiny = 1e-30
    return float(np.log10((a + tiny) / (b + tiny)))


def _blockiness(x: np.ndarray, period: int = 8, stride: int = 4) -> float:
    """log10 of the mean gradient across period-aligned block borders over that elsewhere.

    JPEG's 8x8 DCT blocks leave steps at every 8th pixel of the native image; every
    ``stride``-th line is enough for a stable mean and keeps this off the hot path.
    """
    ratios = []
    for lines in (x[::stride], x[:, ::stride].T):
        d = np.abs(np.diff(lines, axis=1)).mean(axis=0)
        border = (np.arange(d.size) + 1) % period == 0
        if border.sum() == 0 or (~border).sum() == 0:
            continue
        ratios.append(d[border].mean() / max(d[~border].mean(), 1e-30))
    return float(np.log10(np.mean(ratios))) if ratios else 0.0


def full_scale(pixels: np.ndarray, bits_stored: int | None) -> float:
    """Top of the stored range, ``2**bits_stored - 1``; inferred when the header does not say.

    Without a bit depth (float arrays, unknown sources) the range is the smallest
    ``2**b - 1`` (b >= 1) that holds the image's maximum: a guess, documented in the spec.
    """
    if bits_stored is not None and bits_stored >= 1:
        return float(2 ** int(bits_stored) - 1)
    top = float(np.max(pixels))
    if not np.isfinite(top) or top <= 1.0:
        return 1.0
    return float(2 ** int(np.ceil(np.log2(top + 1.0))) - 1)


def _quantiles(cdf: np.ndarray, lo: float, width: float, probs: tuple[float, ...]) -> np.ndarray:
    """Quantiles from a fine histogram's cumulative shares, linear within the crossing bin."""
    out = np.empty(len(probs))
    for k, p in enumerate(probs):
        i = int(np.searchsorted(cdf, p, side="left"))
        i = min(i, cdf.size - 1)
        below = cdf[i - 1] if i > 0 else 0.0
        inside = cdf[i] - below
        frac = (p - below) / inside if inside > 0 else 0.5
        out[k] = lo + (i + frac) * width
    return out


def _intensity_features(centred: np.ndarray, mean: float, std: float, scale: float) -> np.ndarray:
    """The intensity component from the working image minus its mean (before scaling).

    ``mean`` and ``std`` are the working image's (already computed for the spectrum);
    ``scale`` is the top of the stored range.
    """
    x = centred
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo
    n_bins = _FINE_BINS
    idx = ((x - np.float32(lo)) * np.float32(n_bins / span)).astype(np.intp)
    np.minimum(idx, n_bins - 1, out=idx)
    hist = np.bincount(idx.ravel(), minlength=n_bins).astype(np.float64)
    total = hist.sum()
    share = hist / total
    width = span / n_bins
    centres = lo + (np.arange(n_bins) + 0.5) * width
    q01, q25, q50, q75, q99 = _quantiles(np.cumsum(share), lo, width, (0.01, 0.25, 0.5, 0.75, 0.99))
    spread = max(q99 - q01, 1e-12 * span)
    hmean = float(share @ centres)
    dev = centres - hmean
    var = float(share @ dev**2)
    skew = float(share @ dev**3) / max(var, 1e-300) ** 1.5
    # Entropy of the distribution between its 1st and 99th percentiles, on coarse bins:
    # each fine bin goes wholly to the coarse bin of its centre.
    inner = (centres >= q01) & (centres <= q99)
    coarse = np.minimum(((centres[inner] - q01) / spread * _ENTROPY_BINS).astype(np.intp), _ENTROPY_BINS - 1)
    ch = np.bincount(coarse, weights=hist[inner], minlength=_ENTROPY_BINS)
    cp = ch[ch > 0] / ch.sum()
    entropy = float(-(cp * np.log2(cp)).sum() / np.log2(_ENTROPY_BINS))
    return np.array(
        [
            (q25 - q01) / spread,
            (q50 - q01) / spread,
            (q75 - q01) / spread,
            skew,
            entropy,
            mean / scale,
            std / scale,
            (q01 + mean) / scale,
            (q99 + mean) / scale,
            np.log10(share[0] + _SHARE_FLOOR),
            np.log10(share[-1] + _SHARE_FLOOR),
        ]
    )


class SpectralProfiler:
    """Compute the profile of a radiograph: spectral component + intensity component.

    Parameters
    ----------
    working_size : int, default=512
        Side of the square working image, in pixels; frequencies are in cycles per
        image over the centre square crop, so images of any native size compare.
    n_bands : int, optional
        Number of radial frequency bands (the first is [1, 2) cycles/image, the rest
        log-spaced up to working_size/2); default 24, or working_size // 8 when smaller.
    fft_threads : int, default=1
        FFTW threads per transform. Servers scale by running several transforms
        at once instead (see docs/spectral-profile.md for the measurement).
    planner_effort : {"FFTW_ESTIMATE", "FFTW_MEASURE", "FFTW_PATIENT"}, default="FFTW_ESTIMATE"
        ``FFTW_ESTIMATE`` picks the algorithm by heuristics, so every process computes
        bit-identical profiles; the measuring efforts time candidates and may pick
        another algorithm per process (profiles then differ by ~1e-6 between runs).
    wisdom_path : str, optional
        FFTW wisdom file: read before the first plan of each process, rewritten
        when a plan had to be measured. Not part of the profile specification.

    Examples
    --------
    >>> import numpy as np
    >>> p = SpectralProfiler(working_size=128, n_bands=12)
    >>> p.profile(np.random.default_rng(0).random((200, 180))).shape
    (30,)
    >>> p.spectral_profile(np.random.default_rng(0).random((200, 180))).shape
    (19,)
    """

    def __init__(
        self,
        working_size: int = DEFAULT_WORKING_SIZE,
        n_bands: int | None = None,
        fft_threads: int = 1,
        planner_effort: str = "FFTW_ESTIMATE",
        wisdom_path: str | os.PathLike | None = None,
    ) -> None:
        if working_size < 64 or working_size % 16:
            raise InvalidInputError(f"working_size must be a multiple of 16 and >= 64, got {working_size}")
        if n_bands is None:
            n_bands = min(DEFAULT_N_BANDS, working_size // 8)
        if not 4 <= n_bands <= working_size // 8:
            raise InvalidInputError(f"n_bands must be in [4, {working_size // 8}], got {n_bands}")
        if fft_threads < 1:
            raise InvalidInputError(f"fft_threads must be >= 1, got {fft_threads}")
        if planner_effort not in _PLANNER_EFFORTS:
            raise InvalidInputError(
                f"planner_effort must be one of {_PLANNER_EFFORTS}, got {planner_effort!r}"
            )
        self.working_size = working_size
        self.n_bands = n_bands
        self.fft_threads = fft_threads
        self.planner_effort = planner_effort
        self.wisdom_path = None if wisdom_path is None else str(wisdom_path)
        self._bins = _bins(working_size, n_bands)
        centers = self._bins.centers
        n_mid = int(np.sum((centers >= 4) & (centers < working_size / 8)))
        n_high = int(np.sum(centers >= working_size / 8))
        if min(n_mid, n_high) < 2:
            raise InvalidInputError(
                f"working_size {working_size} with {n_bands} bands leaves {n_mid} band(s) for the mid "
                f"and {n_high} for the high spectral slope; each needs at least 2 (use more bands)"
            )

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Every feature of a profile: the spectral ones, then :data:`INTENSITY_FEATURES`."""
        return self.spectral_feature_names + INTENSITY_FEATURES

    @property
    def intensity_feature_names(self) -> tuple[str, ...]:
        return INTENSITY_FEATURES

    @property
    def n_spectral(self) -> int:
        """How many leading features of a profile are spectral."""
        return self.n_bands + 7

    @property
    def spectral_feature_names(self) -> tuple[str, ...]:
        bands = tuple(f"log_energy_band_{i:02d}" for i in range(self.n_bands))
        return bands + (
            "spectral_slope_mid",
            "spectral_slope_high",
            "direction_x_over_y_mid",
            "direction_x_over_y_high",
            "direction_axes_over_diagonal_high",
            "peak_to_band_mean_high",
            "jpeg_blockiness",
        )

    @property
    def band_edges(self) -> np.ndarray:
        """Band edges in cycles per image, shape (n_bands + 1,)."""
        return self._bins.edges.copy()

    def spec(self) -> dict:
        """The parameters that define a profile, for the model artifact."""
        return {
            "spec_version": SPEC_VERSION,
            "working_size": self.working_size,
            "n_bands": self.n_bands,
            "band_edges_cycles_per_image": [round(float(e), 6) for e in self._bins.edges],
            "intensity_fine_bins": _FINE_BINS,
            "intensity_entropy_bins": _ENTROPY_BINS,
            "feature_names": list(self.feature_names),
        }

    @classmethod
    def from_spec(cls, spec: dict, **runtime: Any) -> SpectralProfiler:
        """The profiler a :meth:`spec` describes; the inverse of :meth:`spec`.

        Parameters
        ----------
        spec : dict
            As written by :meth:`spec` (e.g. read back from a model artifact).
        **runtime
            Settings that do not change the profile: ``fft_threads``, ``planner_effort``,
            ``wisdom_path``.

        Raises
        ------
        InvalidInputError
            The spec is of another version, or names other features than this version computes.
        """
        version = spec.get("spec_version")
        if version != SPEC_VERSION:
            raise InvalidInputError(
                f"profile spec version {version!r} is not supported (this build computes {SPEC_VERSION!r})"
            )
        for key, value in (("intensity_fine_bins", _FINE_BINS), ("intensity_entropy_bins", _ENTROPY_BINS)):
            if spec.get(key, value) != value:
                raise InvalidInputError(f"{key} {spec[key]!r} differs from this build's {value}")
        profiler = cls(working_size=int(spec["working_size"]), n_bands=int(spec["n_bands"]), **runtime)
        names = spec.get("feature_names")
        if names is not None and list(names) != list(profiler.feature_names):
            raise InvalidInputError(f"feature names differ from those of profile spec {SPEC_VERSION}")
        return profiler

    def profile_image(self, image: LoadedImage) -> np.ndarray:
        """Profile of a decoded image (pixels and header); the entry point of the per-image path.

        The header's ``bits_stored`` sets the range the intensity level features are relative to.
        """
        return self.profile(image.pixels, bits_stored=image.meta.bits_stored)

    def _working_image(self, pixels: np.ndarray) -> np.ndarray:
        """Centre square crop, anti-aliased resample to working_size; float32."""
        h, w = pixels.shape
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = pixels[top : top + s, left : left + s]
        n = self.working_size
        f = s // n
        if f >= 2:
            x = _box_mean(x, f)
            s = x.shape[0]
        else:
            x = np.asarray(x, dtype=np.float32)
        if s != n:
            taps = _resample_taps(s, n)
            x = _apply_taps(_apply_taps(x, taps, axis=0), taps, axis=1)
        return x

    def profile(self, pixels: np.ndarray, bits_stored: int | None = None) -> np.ndarray:
        """Profile of one image: spectral features, then intensity features.

        Parameters
        ----------
        pixels : ndarray of shape (rows, columns)
            Any real dtype; one polarity (see :mod:`monitor.imaging`).
        bits_stored : int, optional
            Bit depth of the stored pixels: the intensity level features are relative to
            ``[0, 2**bits_stored - 1]``. Without it the range is inferred from the maximum
            (see :func:`full_scale`); per-image callers use :meth:`profile_image`, which
            takes it from the header.

        Returns
        -------
        features : ndarray of shape (n_features,), dtype=float64
            In the order of :attr:`feature_names`.

        Raises
        ------
        InvalidImageError
            If the image is not 2-D, not finite, too small or constant.
        """
        return self._profile(pixels, bits_stored, intensity=True)

    def profile_timed(
        self, pixels: np.ndarray, bits_stored: int | None = None, *, spectral_only: bool = False
    ) -> tuple[np.ndarray, StageTimes]:
        """:meth:`profile` (or :meth:`spectral_profile`) and the seconds each stage took.

        The same code path as the untimed methods, which return bit-identical features: it
        only reads the clock between stages. For benchmarks and diagnostics; the per-image
        path does not time stages.

        Parameters
        ----------
        pixels, bits_stored
            As for :meth:`profile`.
        spectral_only : bool, default=False
            Compute the spectral component alone (as :meth:`spectral_profile`; the
            ``intensity`` stage is then 0).

        Returns
        -------
        features : ndarray of shape (n_features,) or (n_spectral,), dtype=float64
        times : StageTimes

        Examples
        --------
        >>> import numpy as np
        >>> p = SpectralProfiler(working_size=128, n_bands=12)
        >>> img = np.random.default_rng(0).random((200, 180))
        >>> features, times = p.profile_timed(img)
        >>> bool(np.array_equal(features, p.profile(img))), sorted(times.to_dict()) == sorted(PROFILE_STAGES)
        (True, True)
        """
        marks: list[float] = []
        features = self._profile(pixels, bits_stored, intensity=not spectral_only, marks=marks)
        # marks: start, then the end of each stage in PROFILE_STAGES order.
        return features, StageTimes(*np.diff(marks).tolist())

    def _profile(
        self,
        pixels: np.ndarray,
        bits_stored: int | None,
        *,
        intensity: bool,
        marks: list[float] | None = None,
    ) -> np.ndarray:
        """The profile; with ``marks``, appends the clock at the start and after every stage.

        The untimed path pays one ``is None`` test per stage (nanoseconds against milliseconds).
        """
        pixels = np.asarray(pixels)
        if pixels.ndim != 2 or min(pixels.shape) < 16:
            raise InvalidImageError(
                f"expected a 2-D image of at least 16x16 pixels, got shape {pixels.shape}"
            )
        n = self.working_size
        plan = _plan(n, self.fft_threads, self.planner_effort, self.wisdom_path)
        src = plan.input_array
        if marks is not None:
            marks.append(time.perf_counter())
        src[...] = self._working_image(pixels)
        if marks is not None:
            marks.append(time.perf_counter())
        mean = float(src.mean(dtype=np.float64))
        src -= np.float32(mean)
        std = float(np.sqrt(np.mean(np.square(src, dtype=np.float64))))
        if not np.isfinite(std) or std <= 1e-12 * max(1.0, abs(mean)):
            raise InvalidImageError("image is constant or not finite after resampling: it has no spectrum")
        if marks is not None:
            marks.append(time.perf_counter())
        intensity_features = None
        if intensity:
            intensity_features = _intensity_features(src, mean, std, full_scale(pixels, bits_stored))
        if marks is not None:
            marks.append(time.perf_counter() if intensity else marks[-1])  # a stage not run took 0 s
        src *= _hann2d(n)
        src *= np.float32(1.0 / std)
        if marks is not None:
            marks.append(time.perf_counter())
        plan.execute()
        if marks is not None:
            marks.append(time.perf_counter())
        spec = plan.output_array
        power = (np.square(spec.real) + np.square(spec.imag)).ravel()[self._bins.flat_index]
        band_features = self._features(power.astype(np.float64))
        if marks is not None:
            marks.append(time.perf_counter())
        blockiness = _blockiness(pixels.astype(np.float32, copy=False))
        if marks is not None:
            marks.append(time.perf_counter())
        parts = [band_features, [blockiness]]
        if intensity_features is not None:
            parts.append(intensity_features)
        return np.concatenate(parts)

    def spectral_profile(self, pixels: np.ndarray) -> np.ndarray:
        """The spectral component only (:attr:`spectral_feature_names`), invariant to ``a*x + b``."""
        return self._profile(pixels, None, intensity=False)

    def _features(self, power: np.ndarray) -> np.ndarray:
        """Spectral features but the last (blockiness) from the selected bins' power (assumes the bin
        layout of ``self._bins``)."""
        b = self._bins
        wp = power * b.weight
        energy = np.bincount(b.band_of_bin, weights=wp, minlength=self.n_bands)
        total = energy.sum()
        log_frac = np.log10(energy / total + 1e-12)
        mean_power = energy / b.bin_count
        log_c, log_p = np.log10(b.centers), np.log10(mean_power + 1e-30)
        n = self.working_size
        mid_bands = (b.centers >= 4) & (b.centers < n / 8)
        high_bands = b.centers >= n / 8
        slope_mid = float(np.polyfit(log_c[mid_bands], log_p[mid_bands], 1)[0])
        slope_high = float(np.polyfit(log_c[high_bands], log_p[high_bands], 1)[0])

        def sector_energy(zone: np.ndarray, sector: int) -> float:
            return float(wp[zone & (b.sector == sector)].sum())

        x_mid, y_mid = sector_energy(b.mid, 0), sector_energy(b.mid, 1)
        x_high, y_high = sector_energy(b.high, 0), sector_energy(b.high, 1)
        diag_high = sector_energy(b.high, 2)
        rel = power[b.peak_zone] / mean_power[b.band_of_bin[b.peak_zone]]
        peak = float(np.log10(rel.max()))
        return np.concatenate(
            [
                log_frac,
                [
                    slope_mid,
                    slope_high,
                    _log10_ratio(x_mid, y_mid),
                    _log10_ratio(x_high, y_high),
                    _log10_ratio(x_high + y_high, diag_high),
                    peak,
                ],
            ]
        )
