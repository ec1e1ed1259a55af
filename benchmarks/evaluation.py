"""Reusable evaluation helpers for the benchmarks: folds, metrics, baselines, concentration statistics.

Everything here is a pure function of arrays (no files, no globals), so the experiment scripts
stay short and ``tests/test_evaluation.py`` can check each helper on a case with a known answer.

- :func:`youden_threshold` — the decision rule of ``models/build_default.py`` (re-exported from monitor.reliability).
- :func:`repeated_stratified_folds`, :func:`out_of_fold` — the out-of-fold fitting loop.
- :func:`auroc`, :func:`auprc`, :func:`delong_paired`, :func:`bootstrap_auc_difference` — metrics.
- :func:`concentration` — how unevenly failures fall over the groups of any partition: chi-square
  and G-test p, Cramér's V, per-group rates with Beta intervals, Fisher tests with BH, and the
  largest lift among groups significant after BH.
- :func:`random_partition`, :func:`random_partition_null` — the "same sizes, no information" baseline.
- :func:`intensity_features` — the grey-level statistics generic image-drift tools compute.
- :func:`age_bands`, :func:`spacing_groups`, :func:`group_rate_predictor` — metadata slices.
- :func:`ami` — adjusted mutual information between two labelings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import adjusted_mutual_info_score, average_precision_score, roc_auc_score
from sklearn.model_selection import RepeatedStratifiedKFold

from monitor.reliability import benjamini_hochberg, cramers_v, youden_threshold

__all__ = [
    "INTENSITY_FEATURE_NAMES",
    "age_bands",
    "ami",
    "auprc",
    "auroc",
    "benjamini_hochberg",
    "bootstrap_auc_difference",
    "concentration",
    "contingency",
    "cramers_v",
    "delong_paired",
    "group_rate_predictor",
    "intensity_features",
    "out_of_fold",
    "random_partition",
    "random_partition_null",
    "repeated_stratified_folds",
    "spacing_groups",
    "youden_threshold",
]

INTENSITY_FEATURE_NAMES: tuple[str, ...] = (
    "mean",
    "std",
    "p01",
    "p05",
    "p25",
    "p50",
    "p75",
    "p95",
    "p99",
    "entropy_bits",
)


# --------------------------------------------------------------------------- decision rule


# --------------------------------------------------------------------------- folds


def repeated_stratified_folds(
    strata: Any, n_splits: int = 5, n_repeats: int = 5, seed: int = 0
) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Repeated stratified K-fold splits as ``(repeat, fold, train_idx, test_idx)``.

    Within one repeat the test sets are disjoint and cover every index once.
    """
    strata = np.asarray(strata)
    rskf = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=seed)
    out = []
    for i, (tr, te) in enumerate(rskf.split(np.zeros(strata.size), strata)):
        out.append((i // n_splits, i % n_splits, tr, te))
    return out


def out_of_fold(
    folds: Sequence[tuple[int, int, np.ndarray, np.ndarray]],
    n: int,
    fit_predict: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Run ``fit_predict(train_idx, test_idx)`` on every fold and collect held-out outputs.

    ``fit_predict`` returns a dict of arrays of shape (len(test_idx),); the result maps each key
    to an array of shape (n_repeats, n) with every image's held-out value in each repeat
    (``nan`` if an image was never held out, which cannot happen with complete K-fold splits).
    """
    n_repeats = max(f[0] for f in folds) + 1
    out: dict[str, np.ndarray] = {}
    for rep, _fold, tr, te in folds:
        pred = fit_predict(tr, te)
        for key, val in pred.items():
            if key not in out:
                out[key] = np.full((n_repeats, n), np.nan)
            out[key][rep, te] = val
    return out


# --------------------------------------------------------------------------- metrics


def auroc(y: Any, score: Any) -> float:
    """Area under the ROC curve (0.5 for a constant score)."""
    y = np.asarray(y)
    score = np.asarray(score, dtype=np.float64)
    if np.ptp(score) == 0:
        return 0.5
    return float(roc_auc_score(y, score))


def auprc(y: Any, score: Any) -> float:
    """Average precision (area under the precision-recall curve)."""
    return float(average_precision_score(np.asarray(y), np.asarray(score, dtype=np.float64)))


def _rank_auc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Mann–Whitney AUROC (ties count one half); the fast path of the bootstrap."""
    r = stats.rankdata(np.concatenate([pos_scores, neg_scores]))
    m, n = pos_scores.size, neg_scores.size
    return float((r[:m].sum() - m * (m + 1) / 2) / (m * n))


def _midrank(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x, method="average")


def delong_paired(y: Any, score_a: Any, score_b: Any, confidence: float = 0.95) -> dict[str, float]:
    """DeLong test of two correlated AUROCs on the same images (fast midrank form, Sun & Xu 2014).

    Returns ``auc_a``, ``auc_b``, ``diff`` (a - b), its standard error, a normal CI and two-sided p.
    """
    y = np.asarray(y).astype(bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    m, n = pos.size, neg.size
    if m == 0 or n == 0:
        raise ValueError("DeLong needs both positive and negative images")
    aucs, v10, v01 = [], [], []
    for s in (np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)):
        tx, ty, tz = _midrank(s[pos]), _midrank(s[neg]), _midrank(np.concatenate([s[pos], s[neg]]))
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)
        v01.append(1.0 - (tz[m:] - ty) / m)
    s10, s01 = np.cov(np.vstack(v10)), np.cov(np.vstack(v01))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    se = float(np.sqrt(max(var, 0.0)))
    diff = float(aucs[0] - aucs[1])
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = float(2 * stats.norm.sf(abs(diff) / se)) if se > 0 else (1.0 if diff == 0 else 0.0)
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "diff": diff,
        "se": se,
        "ci_low": diff - z * se,
        "ci_high": diff + z * se,
        "p": p,
    }


def bootstrap_auc_difference(
    y: Any, score_a: Any, score_b: Any, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, float]:
    """Paired bootstrap (images resampled, stratified by class) of AUROC(a) - AUROC(b)."""
    y = np.asarray(y).astype(int)
    a, b = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        ip, ineg = rng.choice(pos, pos.size), rng.choice(neg, neg.size)
        diffs[i] = _rank_auc(a[ip], a[ineg]) - _rank_auc(b[ip], b[ineg])
    tail = (1 - confidence) / 2
    return {
        "diff": auroc(y, a) - auroc(y, b),
        "ci_low": float(np.quantile(diffs, tail)),
        "ci_high": float(np.quantile(diffs, 1 - tail)),
        "share_positive": float(np.mean(diffs > 0)),
    }


# --------------------------------------------------------------------------- concentration


def contingency(groups: Any, failures: Any) -> tuple[np.ndarray, np.ndarray]:
    """Group ids (sorted) and the (n_groups, 2) table of [successes, failures]."""
    groups = np.asarray(groups)
    failures = np.asarray(failures).astype(int)
    ids, inv = np.unique(groups, return_inverse=True)
    n = np.bincount(inv, minlength=ids.size)
    f = np.bincount(inv, weights=failures, minlength=ids.size).astype(int)
    return ids, np.stack([n - f, f], axis=1)


def _chi2_g(table: np.ndarray) -> tuple[float, float, float]:
    t = table[table.sum(axis=1) > 0]
    if t.shape[0] < 2 or (t.sum(axis=0) == 0).any():
        return 0.0, 1.0, 1.0
    chi2, p = stats.chi2_contingency(t, correction=False)[:2]
    g_p = stats.chi2_contingency(t, correction=False, lambda_="log-likelihood")[1]
    return float(chi2), float(p), float(g_p)


def concentration(
    groups: Any, failures: Any, fdr: float = 0.05, confidence: float = 0.95, per_group: bool = True
) -> dict[str, Any]:
    """How unevenly failures fall over the groups of a partition.

    Parameters
    ----------
    groups : array-like of shape (n,)
        Any hashable group ids (clusters, metadata values, random labels).
    failures : array-like of shape (n,), 0/1
    per_group : bool
        Include per-group rows (rates, Jeffreys Beta(f + 1/2, n - f + 1/2) intervals,
        Fisher p of the group against the rest, BH q, lift).

    Returns
    -------
    dict with ``n_groups``, ``chi2``, ``chi2_p``, ``g_p``, ``cramers_v``, ``global_rate``,
    ``max_significant_lift`` (largest rate / global rate among groups with q < fdr and a rate
    above the global one; ``None`` when no group qualifies) and, if asked, ``groups``.
    """
    ids, table = contingency(groups, failures)
    n_g = table.sum(axis=1)
    f_g = table[:, 1]
    n, f = int(n_g.sum()), int(f_g.sum())
    g = f / n if n else float("nan")
    chi2, chi2_p, g_p = _chi2_g(table)
    out: dict[str, Any] = {
        "n": n,
        "n_groups": int(ids.size),
        "global_rate": g,
        "chi2": chi2,
        "chi2_p": chi2_p,
        "g_p": g_p,
        "cramers_v": cramers_v(table),
    }
    p = np.ones(ids.size)
    for i in range(ids.size):
        t = [[f_g[i], n_g[i] - f_g[i]], [f - f_g[i], n - f - (n_g[i] - f_g[i])]]
        p[i] = stats.fisher_exact(t).pvalue
    q = benjamini_hochberg(p)
    rate = f_g / np.maximum(n_g, 1)
    lift = rate / g if g > 0 else np.full(ids.size, np.nan)
    sig_up = (q < fdr) & (rate > g)
    out["max_significant_lift"] = float(lift[sig_up].max()) if sig_up.any() else None
    out["n_significant_groups"] = int((q < fdr).sum())
    if per_group:
        tail = (1 - confidence) / 2
        lo = stats.beta.ppf(tail, f_g + 0.5, n_g - f_g + 0.5)
        hi = stats.beta.ppf(1 - tail, f_g + 0.5, n_g - f_g + 0.5)
        out["groups"] = [
            {
                "group": ids[i].item() if hasattr(ids[i], "item") else ids[i],
                "n": int(n_g[i]),
                "failures": int(f_g[i]),
                "rate": float(rate[i]),
                "lower": float(lo[i]),
                "upper": float(hi[i]),
                "lift": float(lift[i]),
                "fisher_p": float(p[i]),
                "q": float(q[i]),
            }
            for i in range(ids.size)
        ]
    return out


# --------------------------------------------------------------------------- random partitions


def random_partition(groups: Any, rng: np.random.Generator) -> np.ndarray:
    """A random relabelling with exactly the same group sizes (a permutation of ``groups``)."""
    return rng.permutation(np.asarray(groups))


def random_partition_null(groups: Any, failures: Any, n_perm: int = 200, seed: int = 0) -> dict[str, Any]:
    """Cramér's V and chi-square p of ``n_perm`` random partitions of the same sizes.

    ``empirical_p`` is (1 + #{V_random >= V_observed}) / (1 + n_perm): how often a partition
    carrying no information concentrates failures at least as strongly.
    """
    groups = np.asarray(groups)
    failures = np.asarray(failures).astype(int)
    rng = np.random.default_rng(seed)
    v_obs = cramers_v(contingency(groups, failures)[1])
    vs, ps = np.empty(n_perm), np.empty(n_perm)
    for i in range(n_perm):
        t = contingency(random_partition(groups, rng), failures)[1]
        vs[i] = cramers_v(t)
        ps[i] = _chi2_g(t)[1]
    return {
        "observed_v": v_obs,
        "null_v_mean": float(vs.mean()),
        "null_v_q95": float(np.quantile(vs, 0.95)),
        "null_chi2_p_median": float(np.median(ps)),
        "null_share_p_below_0.05": float(np.mean(ps < 0.05)),
        "empirical_p": float((1 + np.sum(vs >= v_obs - 1e-12)) / (1 + n_perm)),
        "n_perm": n_perm,
    }


# --------------------------------------------------------------------------- baselines


def intensity_features(pixels: Any, bins: int = 256) -> np.ndarray:
    """Grey-level statistics of one image, in :data:`INTENSITY_FEATURE_NAMES` order.

    Mean, standard deviation, the 1/5/25/50/75/95/99th percentiles of the raw pixel values, and
    the Shannon entropy (bits) of a ``bins``-bin histogram over the image's own min..max range —
    what generic image-drift tools compute. A constant image has std 0 and entropy 0.
    """
    x = np.asarray(pixels, dtype=np.float64).ravel()
    pct = np.percentile(x, [1, 5, 25, 50, 75, 95, 99])
    lo, hi = x.min(), x.max()
    if hi > lo:
        h = np.bincount(
            np.minimum(((x - lo) / (hi - lo) * bins).astype(np.intp), bins - 1), minlength=bins
        ).astype(np.float64)
        p = h[h > 0] / h.sum()
        entropy = float(-(p * np.log2(p)).sum())
    else:
        entropy = 0.0
    return np.concatenate([[x.mean(), x.std()], pct, [entropy]])


def age_bands(ages: Any, edges: Sequence[float] = (30, 45, 60, 75)) -> np.ndarray:
    """Age band labels such as ``"<30"``, ``"30-44"``, ``"75+"``."""
    ages = np.asarray(ages, dtype=np.float64)
    names = [f"<{int(edges[0])}"]
    names += [f"{int(a)}-{int(b) - 1}" for a, b in zip(edges[:-1], edges[1:], strict=False)]
    names += [f"{int(edges[-1])}+"]
    return np.array(names, dtype=object)[np.searchsorted(edges, ages, side="right")]


def spacing_groups(spacing: Any, decimals: int = 3) -> np.ndarray:
    """Pixel spacing (mm) rounded to ``decimals`` as string labels (the scanner proxy)."""
    return np.array([f"{float(s):.{decimals}f}" for s in spacing], dtype=object)


def group_rate_predictor(
    train_groups: Any, train_failures: Any, test_groups: Any, prior_strength: float = 10.0
) -> np.ndarray:
    """Held-out failure probability = the training failure rate of the image's group.

    Rates are shrunk toward the global training rate with ``prior_strength`` pseudo-images
    (as :class:`monitor.reliability.ClusterFailureRates` does); unseen groups get the global rate.
    """
    tg = np.asarray(train_groups)
    tf = np.asarray(train_failures).astype(np.float64)
    g = tf.mean()
    rates = {}
    for gid in np.unique(tg):
        m = tg == gid
        rates[gid] = (tf[m].sum() + prior_strength * g) / (m.sum() + prior_strength)
    return np.array([rates.get(gid, g) for gid in np.asarray(test_groups)], dtype=np.float64)


def ami(a: Any, b: Any) -> float:
    """Adjusted mutual information between two labelings (1 = identical up to renaming, ~0 = unrelated)."""
    return float(adjusted_mutual_info_score(np.asarray(a).astype(str), np.asarray(b).astype(str)))
