"""Label-free drift baselines: KS on intensity statistics and kernel MMD on small thumbnails.

Both compare a window of images with a reference set and return a p-value, so their
false-alarm rate can be set (nominal ``alpha``) or matched to another detector's.

* :func:`ks_drift_test`: two-sample Kolmogorov–Smirnov test per intensity statistic
  (:func:`intensity_statistics`), Bonferroni-combined (p = min(1, m * min p)).
* :func:`mmd_permutation_test`: squared maximum mean discrepancy (biased V-statistic) with
  a Gaussian RBF kernel, bandwidth by the median heuristic, p-value by permutation.
  :func:`mmd_permutation_test_kernel` works on a precomputed pooled kernel matrix so that a
  benchmark with many windows computes each kernel entry once.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = [
    "INTENSITY_STATISTICS",
    "KSReference",
    "intensity_statistics",
    "ks_drift_test",
    "median_bandwidth",
    "mmd_permutation_test",
    "mmd_permutation_test_kernel",
    "rbf_kernel",
    "thumbnail",
]

INTENSITY_STATISTICS = ("mean", "std", "p01", "p05", "p25", "p50", "p75", "p95", "p99", "entropy")


def intensity_statistics(pixels: np.ndarray, max_value: float = 255.0) -> np.ndarray:
    """Grey-level statistics of one image, in :data:`INTENSITY_STATISTICS` order.

    Parameters
    ----------
    pixels : ndarray of shape (rows, columns)
        Values in ``[0, max_value]``.

    Returns
    -------
    ndarray of shape (10,), dtype=float64
        Mean, standard deviation and percentiles in units of ``max_value``; the entropy
        (bits) of a 256-bin histogram over ``[0, max_value]``.
    """
    x = np.asarray(pixels, dtype=np.float64)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"expected a non-empty 2-D image, got shape {x.shape}")
    u = x.ravel() / max_value
    pct = np.percentile(u, [1, 5, 25, 50, 75, 95, 99])
    hist = np.bincount(np.clip((u * 256).astype(np.intp), 0, 255), minlength=256) / u.size
    nz = hist[hist > 0]
    entropy = float(-(nz * np.log2(nz)).sum())
    return np.concatenate([[u.mean(), u.std()], pct, [entropy]])


def thumbnail(pixels: np.ndarray, size: int = 32, max_value: float = 255.0) -> np.ndarray:
    """Centre square crop, area-averaged to ``size`` x ``size``, flattened, in units of ``max_value``.

    Returns
    -------
    ndarray of shape (size * size,), dtype=float32
    """
    x = np.asarray(pixels, dtype=np.float32)
    h, w = x.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[top : top + s, left : left + s]
    if s % size == 0:
        f = s // size
        small = x.reshape(size, f, size, f).mean(axis=(1, 3), dtype=np.float64)
        return (small / max_value).astype(np.float32).ravel()
    # Exact area averaging onto size x size via a bin-weight matrix (s need not divide by size).
    edges = np.linspace(0, s, size + 1)
    m = np.zeros((size, s), dtype=np.float32)
    for i in range(size):
        lo, hi = edges[i], edges[i + 1]
        j0, j1 = int(np.floor(lo)), min(int(np.ceil(hi)), s)
        for j in range(j0, j1):
            m[i, j] = min(hi, j + 1) - max(lo, j)
    m /= m.sum(axis=1, keepdims=True)
    return ((m @ x @ m.T) / np.float32(max_value)).ravel()


def ks_drift_test(window: np.ndarray, reference: np.ndarray) -> tuple[float, np.ndarray]:
    """KS test of every column of ``window`` against the same column of ``reference``.

    Parameters
    ----------
    window : ndarray of shape (n, m)
    reference : ndarray of shape (N, m)

    Returns
    -------
    p_bonferroni : float
        ``min(1, m * min_j p_j)``: reject "no drift" at level alpha when below alpha.
    p : ndarray of shape (m,)
        Per-column two-sided asymptotic KS p-values.
    """
    window = np.asarray(window, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if window.ndim != 2 or reference.ndim != 2 or window.shape[1] != reference.shape[1]:
        raise ValueError(f"window {window.shape} and reference {reference.shape} must be (n, m) and (N, m)")
    p = np.asarray(stats.ks_2samp(window, reference, axis=0, method="asymp").pvalue, dtype=np.float64)
    return float(min(1.0, p.size * p.min())), p


class KSReference:
    """:func:`ks_drift_test` against one fixed reference, for many windows: the same statistics and
    p-values, with the reference sorted once and each (statistic, effective size) p-value of the
    finite-n Kolmogorov distribution computed once (it dominates the cost otherwise)."""

    def __init__(self, reference: np.ndarray) -> None:
        reference = np.asarray(reference, dtype=np.float64)
        if reference.ndim != 2:
            raise ValueError(f"reference must be (N, m), got shape {reference.shape}")
        self.sorted_ = np.sort(reference, axis=0)
        self._p: dict[tuple[float, float], float] = {}

    def test(self, window: np.ndarray) -> tuple[float, np.ndarray]:
        """As :func:`ks_drift_test` (``method="asymp"``): Bonferroni p and per-column p-values."""
        window = np.sort(np.asarray(window, dtype=np.float64), axis=0)
        n, m = window.shape[0], self.sorted_.shape[0]
        if window.ndim != 2 or window.shape[1] != self.sorted_.shape[1]:
            raise ValueError(f"window {window.shape} must be (n, {self.sorted_.shape[1]})")
        en = float(np.round(m * n / (m + n)))
        p = np.empty(window.shape[1])
        for j in range(window.shape[1]):
            both = np.concatenate([window[:, j], self.sorted_[:, j]])
            d = np.abs(
                np.searchsorted(window[:, j], both, side="right") / n
                - np.searchsorted(self.sorted_[:, j], both, side="right") / m
            ).max()
            key = (round(float(d), 12), en)
            if key not in self._p:
                self._p[key] = float(np.clip(stats.kstwo.sf(d, en), 0.0, 1.0))
            p[j] = self._p[key]
        return float(min(1.0, p.size * p.min())), p


def _sq_dists(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    a = np.einsum("ij,ij->i", A, A)[:, None]
    b = np.einsum("ij,ij->i", B, B)[None, :]
    return np.maximum(a + b - 2.0 * (A @ B.T), 0.0)


def median_bandwidth(X: np.ndarray, max_points: int = 500, seed: int = 0) -> float:
    """Median pairwise Euclidean distance of (up to ``max_points`` rows of) X: the RBF sigma."""
    X = np.asarray(X, dtype=np.float64)
    if X.shape[0] > max_points:
        X = X[np.random.default_rng(seed).choice(X.shape[0], max_points, replace=False)]
    d = _sq_dists(X, X)[np.triu_indices(X.shape[0], k=1)]
    sigma = float(np.sqrt(np.median(d)))
    if not sigma > 0:
        raise ValueError("median pairwise distance is zero: the reference rows are identical")
    return sigma


def rbf_kernel(A: np.ndarray, B: np.ndarray, sigma: float) -> np.ndarray:
    """``exp(-|a - b|^2 / (2 sigma^2))``, shape (len(A), len(B))."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    return np.exp(-_sq_dists(A, B) / (2.0 * sigma**2))


def mmd_permutation_test_kernel(
    K: np.ndarray, n_x: int, n_permutations: int = 200, seed: int = 0
) -> tuple[float, float]:
    """MMD² and permutation p-value from the kernel matrix of the pooled sample.

    Parameters
    ----------
    K : ndarray of shape (n_x + n_y, n_x + n_y)
        Kernel of the pooled sample, the first ``n_x`` rows being X.
    n_x : int
    n_permutations : int
    seed : int

    Returns
    -------
    mmd2 : float
        Biased (V-statistic) squared MMD of the observed split.
    p : float
        ``(1 + #{permuted >= observed}) / (1 + n_permutations)``.
    """
    n = K.shape[0]
    n_y = n - n_x
    if K.shape != (n, n) or not 0 < n_x < n:
        raise ValueError(f"K must be square with 0 < n_x < {n}, got shape {K.shape} and n_x={n_x}")
    rng = np.random.default_rng(seed)
    # Each column is one split as a signed weight vector w (1/n_x on X, -1/n_y on Y): MMD² = w' K w.
    member = np.zeros((n, n_permutations + 1), dtype=bool)
    member[:n_x, 0] = True
    for j in range(1, n_permutations + 1):
        member[rng.permutation(n)[:n_x], j] = True
    W = np.where(member, 1.0 / n_x, -1.0 / n_y)
    mmd2 = np.einsum("ip,ip->p", W, K @ W)
    p = (1.0 + np.sum(mmd2[1:] >= mmd2[0] - 1e-12)) / (1.0 + n_permutations)
    return float(mmd2[0]), float(p)


def mmd_permutation_test(
    X: np.ndarray,
    Y: np.ndarray,
    *,
    sigma: float | None = None,
    n_permutations: int = 200,
    seed: int = 0,
) -> tuple[float, float]:
    """Two-sample RBF-kernel MMD test of X (n_x, d) against Y (n_y, d).

    ``sigma`` defaults to the median heuristic on the pooled sample.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"X {X.shape} and Y {Y.shape} must be 2-D with the same number of columns")
    Z = np.vstack([X, Y])
    if sigma is None:
        sigma = median_bandwidth(Z, seed=seed)
    return mmd_permutation_test_kernel(rbf_kernel(Z, Z, sigma), X.shape[0], n_permutations, seed)
