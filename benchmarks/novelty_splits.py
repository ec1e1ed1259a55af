"""Per-image novelty on splits with a known domain change, against a domain classifier's ceiling.

Issue 12, item 3. For each split a reference set is fitted and the novelty flag
(score above a threshold calibrated on held-out reference scores) is counted on (a) held-out
reference images (false positives; target <= 2 %) and (b) the images of the other domain
(target >= 80 % where a domain classifier separates them). Beside it, and to explain the
numbers, every split gets measurements of *why* (see ``domain_analysis``).

Splits:

* NIH leave-one-scanner-group-out: every pixel-spacing group and every original-size group
  with >= 25 images is left out in turn; the other images are split 2:1 into reference and
  held-out reference (seeded).
* Kermany (another hospital, 224 x 224 JPEG): reference = 2/3 of NIH, held-out = the rest.

Novelty scores compared (larger = more novel). Every hyper-parameter is fixed in advance or
chosen on the reference alone (never on the left-out group); thresholds are the 99th
percentile of 5-fold held-out reference scores, as the monitor does:

* ``v2``: what the monitor ships (``SpectralClusterer.novelty`` on the 42-feature v2 profile):
  Mahalanobis distance, Ledoit–Wolf covariance, full standardised space;
* ``v1``: the same on the 31 spectral features only (what the monitor flagged before);
* ``knn1``, ``knn5``: mean Euclidean distance to the 1 / 5 nearest reference images after
  Ledoit–Wolf whitening (full space, no directions dropped);
* ``lof``: local outlier factor (20 neighbours) in the whitened space;
* ``iforest``: isolation forest (200 trees) on the standardised profile;
* ``gmm3``: negative log-likelihood of a 3-component full-covariance mixture (reg 0.05);
* ``gmm_bic``: the same with 1-8 components chosen by BIC on the reference (tight per-cluster
  full-covariance densities);
* ``minor``: Mahalanobis distance in the directions a 95 %-variance PCA drops;
* ``acq``: Mahalanobis distance on the features that carry acquisition (upper 12 frequency
  bands, high-frequency slope, direction and peak features, JPEG blockiness);
* ``power``: Mahalanobis distance after a per-feature Yeo–Johnson transform fitted on the
  reference (lighter tails);
* ``maxz``: the largest absolute standardised feature (sparse, one-feature shifts);
* ``groups`` (NIH splits only, *not* label-free): the smallest Ledoit–Wolf Mahalanobis
  distance to any *known* scanner group of the reference (groups of >= 10 images): what
  knowing the remaining scanners, e.g. from DICOM headers, would give.

Ceiling: out-of-fold AUROC (5-fold) of an L2 logistic regression separating the held-out
reference from the other domain on the v2 features, and that classifier's true-positive rate
at 2 % false positives. Run from the repository root::

    .venv/bin/python benchmarks/novelty_splits.py [--jobs 2]

Writes benchmarks/results/novelty_splits.{md,json}.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import stats
from scipy.optimize import brentq, nnls
from sklearn.covariance import LedoitWolf
from sklearn.ensemble import IsolationForest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import LocalOutlierFactor
from sklearn.preprocessing import PowerTransformer
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.e2_acquisition_shifts import DEFAULT_DATA, RESULTS, kermany_files  # noqa: E402
from monitor.batch import default_cache_dir, profile_files  # noqa: E402
from monitor.clustering import SpectralClusterer  # noqa: E402
from monitor.reliability import benjamini_hochberg  # noqa: E402
from monitor.spectrum import SpectralProfiler  # noqa: E402

METHODS = ("v2", "v1", "knn1", "knn5", "lof", "iforest", "gmm3", "gmm_bic", "minor", "acq", "power", "maxz")
QUANTILE = 0.99
FPR = 0.02  # the target false-positive rate, for the "best achievable" columns
MIN_KNOWN_GROUP = 10
WINDOW = 25  # images per batch window (the smallest left-out group has 28)
N_WINDOWS = 50
Scorer = Callable[[np.ndarray], np.ndarray]


def acquisition_columns(names: list[str]) -> np.ndarray:
    """Columns that carry the acquisition signature (fixed a priori, not chosen on any split)."""
    high = {f"log_energy_band_{b:02d}" for b in range(12, 24)}
    keep = high | {
        "spectral_slope_high",
        "direction_x_over_y_high",
        "direction_axes_over_diagonal_high",
        "peak_to_band_mean_high",
        "jpeg_blockiness",
    }
    return np.array([i for i, n in enumerate(names) if n in keep])


def _standardiser(R: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    mu, sd = R.mean(axis=0), R.std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return lambda X: (X - mu) / sd


def _mahalanobis(R: np.ndarray) -> Scorer:
    std = _standardiser(R)
    lw = LedoitWolf().fit(std(R))
    return lambda X: np.sqrt(
        np.einsum("ij,jk,ik->i", std(X) - lw.location_, lw.precision_, std(X) - lw.location_)
    )


def _whitener(R: np.ndarray) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]:
    std = _standardiser(R)
    Z = std(R)
    w, V = np.linalg.eigh(LedoitWolf().fit(Z).covariance_)
    white = V @ np.diag(w**-0.5) @ V.T
    return (lambda X: std(X) @ white), Z @ white


def _knn(R: np.ndarray, k: int) -> Scorer:
    to_white, Y = _whitener(R)

    def score(X: np.ndarray) -> np.ndarray:
        d = np.sqrt(((to_white(X)[:, None, :] - Y[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, :k].mean(axis=1)

    return score


def _minor_directions(R: np.ndarray, variance_kept: float = 0.95) -> Scorer:
    std = _standardiser(R)
    Z = std(R)
    mu = Z.mean(axis=0)
    _, s, vt = np.linalg.svd(Z - mu, full_matrices=False)
    # At least one direction is left to score, even where the kept share needs every component.
    n_kept = min(int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), variance_kept) + 1), len(s) - 1)
    V, var = vt[n_kept:], s[n_kept:] ** 2 / len(Z)
    return lambda X: np.sqrt((((std(X) - mu) @ V.T) ** 2 / var).sum(axis=1))


def fit_scorer(R: np.ndarray, method: str, n_spectral: int, acq: np.ndarray, seed: int = 0) -> Scorer:
    """A novelty score fitted on reference profiles ``R`` (larger = more novel)."""
    if method in ("v1", "v2"):
        cols = slice(0, n_spectral) if method == "v1" else slice(None)
        cl = SpectralClusterer(n_clusters=2, random_state=seed, cluster_features=None).fit(R[:, cols])
        return lambda X: cl.novelty(X[:, cols])[1]
    if method in ("knn1", "knn5"):
        return _knn(R, int(method[3:]))
    if method == "lof":
        to_white, Y = _whitener(R)
        lof = LocalOutlierFactor(n_neighbors=20, novelty=True).fit(Y)
        return lambda X: -lof.score_samples(to_white(X))
    if method == "minor":
        return _minor_directions(R)
    if method == "acq":
        f = _mahalanobis(R[:, acq])
        return lambda X: f(X[:, acq])
    if method == "power":
        pt = PowerTransformer().fit(R)
        f = _mahalanobis(pt.transform(R))
        return lambda X: f(pt.transform(X))
    std = _standardiser(R)
    if method == "maxz":
        return lambda X: np.abs(std(X)).max(axis=1)
    if method == "iforest":
        forest = IsolationForest(n_estimators=200, random_state=seed).fit(std(R))
        return lambda X: -forest.score_samples(std(X))
    if method == "gmm3":
        g = GaussianMixture(3, covariance_type="full", reg_covar=0.05, n_init=2, random_state=seed).fit(
            std(R)
        )
        return lambda X: -g.score_samples(std(X))
    if method == "gmm_bic":
        Z = std(R)
        fits = [
            GaussianMixture(k, covariance_type="full", reg_covar=1e-3, n_init=2, random_state=seed).fit(Z)
            for k in range(1, 9)
        ]
        g = min(fits, key=lambda m: m.bic(Z))
        return lambda X: -g.score_samples(std(X))
    raise ValueError(method)


def fit_group_scorer(R: np.ndarray, labels: np.ndarray) -> Scorer:
    """Smallest Mahalanobis distance to any known group of ``R`` with >= MIN_KNOWN_GROUP images."""
    std = _standardiser(R)
    Z = std(R)
    models = []
    for v in np.unique(labels):
        if np.sum(labels == v) >= MIN_KNOWN_GROUP:
            lw = LedoitWolf().fit(Z[labels == v])
            models.append((lw.location_, lw.precision_))

    def score(X: np.ndarray) -> np.ndarray:
        Y = std(X)
        return np.min([np.sqrt(np.einsum("ij,jk,ik->i", Y - m, p, Y - m)) for m, p in models], axis=0)

    return score


def held_out_threshold(
    R: np.ndarray, fit: Callable[[np.ndarray, np.ndarray], Scorer], folds: int = 5
) -> float:
    """The 99th percentile of reference scores, each from a scorer fitted without it.

    ``fit(R_train, train_index)`` returns a scorer; the index lets label-aware scorers
    look up the training rows' groups.
    """
    fold = np.random.default_rng(0).permutation(len(R)) % folds
    scores = np.empty(len(R))
    for f in range(folds):
        scores[fold == f] = fit(R[fold != f], np.flatnonzero(fold != f))(R[fold == f])
    return float(np.quantile(scores, QUANTILE))


def _oof_decision(A: np.ndarray, B: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    X = np.r_[A, B]
    y = np.r_[np.zeros(len(A)), np.ones(len(B))]
    X = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-12)
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    p = cross_val_predict(LogisticRegression(C=1.0, max_iter=3000), X, y, cv=cv, method="decision_function")
    return p, y


def domain_auroc(A: np.ndarray, B: np.ndarray, seed: int = 0) -> float:
    """Out-of-fold AUROC of a logistic domain classifier, A (0) vs B (1)."""
    p, y = _oof_decision(A, B, seed)
    return float(roc_auc_score(y, p))


def tpr_at_fpr(negatives: np.ndarray, positives: np.ndarray, fpr: float = FPR) -> float:
    """Share of positives above the (1 - fpr) quantile of the negatives: the best any threshold does."""
    return float(np.mean(positives > np.quantile(negatives, 1 - fpr)))


def domain_analysis(
    R: np.ndarray,
    H: np.ndarray,
    other: np.ndarray,
    names: list[str],
    ref_groups: np.ndarray | None,
    seed: int = 0,
) -> dict:
    """Why a label-free score does or does not flag ``other``: measurements in the reference's units.

    * ``supervised_tpr``: the domain classifier's TPR at 2 % FPR (out-of-fold scores).
    * ``inside_reference``: share of ``other`` whose projection on the classifier direction (fitted on
      H vs the other folds of ``other``; R never seen) lies within R's 1-99 % projection range: those
      images are not extreme even along the one direction that separates them best.
    * ``hull_distance``: Mahalanobis distance (R's metric) from the mean of ``other`` to the
      nearest convex combination of the known reference groups' means: ~0 if the group
      interpolates between known scanners, ~``delta`` if it differs in a new direction;
      ``known_group_separation``: median distance between two known groups' means, in the same
      metric (how far apart the scanners the reference already tolerates are).
    * ``delta``: Mahalanobis distance of the mean of ``other`` from that of R (Ledoit–Wolf, standardised space) and
      ``gaussian_omnibus_tpr``: the share a Mahalanobis detector at 1 % FPR would flag if R
      were Gaussian (noncentral chi-square with ``len(names)`` degrees of freedom).
    * ``spread_ratio``: median over features of sd(other) / sd(R).
    * ``top_shifts`` / ``top_coefficients``: the largest mean shifts (in R standard
      deviations) and the classifier's largest standardised coefficients.
    """
    mu, sd = R.mean(axis=0), R.std(axis=0) + 1e-12
    z = lambda X: (X - mu) / sd  # noqa: E731
    p, y = _oof_decision(H, other, seed)
    out: dict = {"supervised_tpr": tpr_at_fpr(p[y == 0], p[y == 1])}
    X = np.r_[z(H), z(other)]
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    inside = []
    for train, test in cv.split(X, y):
        clf = LogisticRegression(C=1.0, max_iter=3000).fit(X[train], y[train])
        lo, hi = np.quantile(clf.decision_function(z(R)), [0.01, 0.99])
        po = clf.decision_function(X[test][y[test] == 1])
        inside.append((po >= lo) & (po <= hi))
    out["inside_reference"] = float(np.mean(np.concatenate(inside)))
    lw = LedoitWolf().fit(z(R))
    chol = np.linalg.cholesky(lw.precision_)  # Euclidean distances of x @ chol are Mahalanobis
    diff = z(other).mean(axis=0) - lw.location_
    delta = float(np.sqrt(diff @ lw.precision_ @ diff))
    dof = R.shape[1]
    out["delta"] = delta
    out["gaussian_omnibus_tpr"] = float(stats.ncx2.sf(stats.chi2.ppf(QUANTILE, dof), dof, delta**2))
    if ref_groups is not None:
        known = [v for v in np.unique(ref_groups) if np.sum(ref_groups == v) >= MIN_KNOWN_GROUP]
        M = np.array([z(R[ref_groups == v]).mean(axis=0) @ chol for v in known]).T
        target = z(other).mean(axis=0) @ chol
        # Non-negative weights summing to one (the constraint as a heavily weighted extra row).
        weights, _ = nnls(np.r_[M, 1e3 * np.ones((1, M.shape[1]))], np.r_[target, 1e3])
        out["hull_distance"] = float(np.linalg.norm(M @ weights - target))
        pairs = [np.linalg.norm(M[:, i] - M[:, j]) for i in range(len(known)) for j in range(i)]
        out["known_group_separation"] = float(np.median(pairs))
    out["spread_ratio"] = float(np.median(z(other).std(axis=0)))
    shift = z(other).mean(axis=0) - z(R).mean(axis=0)
    out["top_shifts"] = [[names[i], float(shift[i])] for i in np.argsort(-np.abs(shift))[:3]]
    coef = LogisticRegression(C=1.0, max_iter=3000).fit(X, y).coef_[0]
    out["top_coefficients"] = [[names[i], float(coef[i])] for i in np.argsort(-np.abs(coef))[:3]]
    return out


def window_detection(R: np.ndarray, H: np.ndarray, other: np.ndarray, seed: int = 0) -> dict:
    """Share of ``WINDOW``-image windows in which some feature's mean has moved (batch view).

    A window is flagged when any feature's mean, in reference SDs, differs from the
    reference's by more than 0.5 SD with a Benjamini–Hochberg q < 0.01 (Welch statistic with
    the window's own variance and the reference mean's uncertainty, two-sided normal p). A
    self-contained test of what one window of images shows, not the monitor's drift verdict.
    """
    rng = np.random.default_rng(seed)
    mu, sd = R.mean(axis=0), R.std(axis=0) + 1e-12

    def flagged(X: np.ndarray) -> bool:
        Z = (X - mu) / sd
        shift = Z.mean(axis=0)
        se = np.sqrt(Z.var(axis=0, ddof=1) / len(Z) + 1.0 / len(R))
        q = benjamini_hochberg(2.0 * stats.norm.sf(np.abs(shift / se)))
        return bool(np.any((q < 0.01) & (np.abs(shift) > 0.5)))

    draw = lambda X: X[rng.choice(len(X), WINDOW, replace=False)]  # noqa: E731
    return {
        "held_out_windows_flagged": float(np.mean([flagged(draw(H)) for _ in range(N_WINDOWS)])),
        "other_windows_flagged": float(np.mean([flagged(draw(other)) for _ in range(N_WINDOWS)])),
    }


def evaluate(
    name: str,
    R: np.ndarray,
    H: np.ndarray,
    other: np.ndarray,
    n_spectral: int,
    names: list[str],
    ref_groups: np.ndarray | None = None,
) -> dict:
    row: dict = {"split": name, "n_reference": len(R), "n_held_out": len(H), "n_other": len(other)}
    row["domain_auroc"] = domain_auroc(H, other)
    row["why"] = domain_analysis(R, H, other, names, ref_groups)
    row["windows"] = window_detection(R, H, other)
    acq = acquisition_columns(names)
    fitters: dict[str, Callable[[np.ndarray, np.ndarray], Scorer]] = {
        m: (lambda Rt, _i, m=m: fit_scorer(Rt, m, n_spectral, acq)) for m in METHODS
    }
    if ref_groups is not None:
        fitters["groups"] = lambda Rt, i: fit_group_scorer(Rt, ref_groups[i])
    for m, fit in fitters.items():
        thr = held_out_threshold(R, fit)
        f = fit(R, np.arange(len(R)))
        sh, so = f(H), f(other)
        row[m] = {
            "held_out_flagged": float(np.mean(sh > thr)),
            "other_flagged": float(np.mean(so > thr)),
            "auroc": float(roc_auc_score(np.r_[np.zeros(len(sh)), np.ones(len(so))], np.r_[sh, so])),
            "tpr_at_2pct_fpr": tpr_at_fpr(sh, so),
            "threshold": thr,
            "held_out_median": float(np.median(sh)),
            "other_median": float(np.median(so)),
        }
    print(f"  {name}: " + json.dumps({k: row[k] for k in ("domain_auroc", "v2")}), file=sys.stderr)
    return row


def reference_tail(P: np.ndarray, names: list[str], views: np.ndarray, seed: int = 0) -> dict:
    """How heavy the reference's own tail is: what sets the 1 % threshold on all of NIH."""
    fold = np.random.default_rng(seed).permutation(len(P)) % 5
    d = np.empty(len(P))
    for f in range(5):
        d[fold == f] = _mahalanobis(P[fold != f])(P[fold == f])
    Z = _standardiser(P)(P)
    kurt = stats.kurtosis(Z, axis=0)
    top = np.argsort(-d)[: int(np.ceil(FPR * len(P)))]
    return {
        "held_out_median": float(np.median(d)),
        "held_out_q99": float(np.quantile(d, QUANTILE)),
        "gaussian_q99": float(np.sqrt(stats.chi2.ppf(QUANTILE, P.shape[1]))),
        "gaussian_median": float(np.sqrt(stats.chi2.ppf(0.5, P.shape[1]))),
        "most_kurtotic": [[names[i], float(kurt[i])] for i in np.argsort(-kurt)[:5]],
        "n_features_excess_kurtosis_over_3": int(np.sum(kurt > 3)),
        "top_2pct_ap_share": float(np.mean(views[top] == "AP")),
        "ap_share": float(np.mean(views == "AP")),
        "feature_names": names,
    }


def pairwise_group_auroc(P: np.ndarray, g: np.ndarray, min_group: int) -> dict:
    """Out-of-fold domain AUROC between every pair of groups with >= min_group images."""
    values, counts = np.unique(g, return_counts=True)
    values = [str(v) for v in values[counts >= min_group]]
    return {
        "groups": values,
        "auroc": [[domain_auroc(P[g == a], P[g == b]) if a != b else None for b in values] for a in values],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-group", type=int, default=25)
    args = ap.parse_args(argv)
    threadpool_limits(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    t0 = time.perf_counter()
    profiler = SpectralProfiler()
    n_spectral = profiler.n_spectral
    names = list(profiler.feature_names)
    rows = list(csv.DictReader((args.data / "nih" / "labels.csv").open()))
    files = [args.data / "nih" / "images" / r["image"] for r in rows]
    # Profiled once (and cached on disk); every split reuses these arrays.
    P = profile_files(files, profiler, jobs=args.jobs, cache_dir=default_cache_dir()).profiles
    kf, _ = kermany_files(args.data, "test")
    K = profile_files(kf, profiler, jobs=args.jobs, cache_dir=default_cache_dir()).profiles
    groups = {
        "pixel spacing": np.array([f"{float(r['pixel_spacing_mm']):.3f} mm" for r in rows]),
        "original size": np.array([f"{r['original_width']}x{r['original_height']}" for r in rows]),
    }
    views = np.array([r["view"] for r in rows])
    rng = np.random.default_rng(args.seed)
    results = []
    for kind, g in groups.items():
        values, counts = np.unique(g, return_counts=True)
        for v in values[counts >= args.min_group]:
            idx = np.flatnonzero(g != v)
            rng.shuffle(idx)
            cut = len(idx) * 2 // 3
            row = evaluate(
                f"NIH without {kind} {v}",
                P[idx[:cut]],
                P[idx[cut:]],
                P[g == v],
                n_spectral,
                names,
                ref_groups=g[idx[:cut]],
            )
            # Which pixel spacings the left-out images have, and how many reference images share them:
            # a left-out image size whose scanner stays in the reference is not a new scanner.
            spacing = groups["pixel spacing"]
            row["other_spacings"] = sorted({str(x) for x in spacing[g == v]})
            row["reference_same_spacing"] = int(np.isin(spacing[idx[:cut]], spacing[g == v]).sum())
            results.append(row)
    idx = rng.permutation(len(P))
    cut = len(idx) * 2 // 3
    results.append(
        evaluate("Kermany test (another hospital)", P[idx[:cut]], P[idx[cut:]], K, n_spectral, names)
    )
    context = {
        "reference_tail": reference_tail(P, names, views, args.seed),
        "pairwise": {kind: pairwise_group_auroc(P, g, args.min_group) for kind, g in groups.items()},
    }
    meta = {
        "experiment": "per-image novelty on domain splits (issue 12, item 3)",
        "methods": [*METHODS, "groups"],
        "threshold_quantile": QUANTILE,
        "fpr_for_best_achievable": FPR,
        "seed": args.seed,
        "seconds": time.perf_counter() - t0,
        "command": "python benchmarks/novelty_splits.py",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "novelty_splits.json").write_text(
        json.dumps({"meta": meta, "splits": results, "context": context}, indent=1)
    )
    write_markdown(args.out / "novelty_splits.md", meta, results, context)
    print(f"novelty splits done in {meta['seconds']:.0f} s", file=sys.stderr)
    return 0


def best_calibrated(row: dict) -> str:
    """The label-free method flagging most of the other domain with held-out flags <= 2 %."""
    ok = [m for m in METHODS if row[m]["held_out_flagged"] <= FPR] or list(METHODS)
    return max(ok, key=lambda m: (row[m]["other_flagged"], row[m]["tpr_at_2pct_fpr"]))


def _method_table(
    title: str, results: list[dict], methods: list[str], cell: Callable[[dict], str]
) -> list[str]:
    """A markdown section: one row per split, one ``cell(row[method])`` per method."""
    L = ["", f"## {title}", "", "| split | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for r in results:
        L.append(f"| {r['split']} | " + " | ".join(cell(r[m]) if m in r else "n/a" for m in methods) + " |")
    return L


def write_markdown(path: Path, meta: dict, results: list[dict], context: dict) -> None:
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    methods = [m for m in meta["methods"]]
    nih = [r for r in results if r["split"].startswith("NIH")]
    L = [
        "# Per-image novelty on domain splits (issue 12, item 3)",
        "",
        "Flagged = share of images above the novelty threshold (99th percentile of 5-fold held-out "
        "reference scores). 'held-out' = reference-domain images not used in the fit (false positives, "
        "target <= 2%); 'other' = the left-out scanner group or hospital (target >= 80% where the domain "
        "classifier separates them). Domain AUROC: out-of-fold logistic regression on the v2 features, "
        "held-out reference vs other (the supervised ceiling); 'sup. TPR' = that classifier's true-positive "
        "rate at 2% false positives. Methods: see `benchmarks/novelty_splits.py`; `v2` is what the monitor "
        "ships; `groups` is not label-free (it knows the reference's scanner groups).",
        "",
        f"Regenerate: `{meta['command']}` ({meta['seconds']:.0f} s, shared 2-core machine; profiles "
        "computed once and cached, every split reuses them; seed "
        f"{meta['seed']}).",
        "",
        "## Summary: shipped method vs the best label-free candidate",
        "",
        "'Best candidate' = the label-free score that flags most of the other domain among those whose "
        "held-out rate stays <= 2% (chosen after the fact, so optimistic). 'Best at 2% FPR' = the highest "
        "TPR any label-free score reaches with its threshold set on the held-out images themselves (also "
        "optimistic): what the score could do with a perfect threshold. The last column is the batch "
        f"view: {N_WINDOWS} random windows of {WINDOW} images, flagged when any feature's mean moved by "
        "> 0.5 reference SD with Benjamini-Hochberg q < 0.01 (`window_detection`; a self-contained test, "
        "not the monitor's drift verdict).",
        "",
        "| split | n other | domain AUROC | sup. TPR @2% | v2 shipped: held-out / other | best candidate: "
        "held-out / other | best label-free TPR @2% FPR | groups (knows scanners): held-out / other | "
        f"{WINDOW}-image windows with a feature mean moved: held-out / other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = best_calibrated(r)
        top = max(METHODS, key=lambda m: r[m]["tpr_at_2pct_fpr"])
        grp = (
            f"{pct(r['groups']['held_out_flagged'])} / {pct(r['groups']['other_flagged'])}"
            if "groups" in r
            else "n/a"
        )
        L.append(
            f"| {r['split']} | {r['n_other']} | {r['domain_auroc']:.2f} | {pct(r['why']['supervised_tpr'])} | "
            f"{pct(r['v2']['held_out_flagged'])} / {pct(r['v2']['other_flagged'])} | "
            f"{b}: {pct(r[b]['held_out_flagged'])} / {pct(r[b]['other_flagged'])} | "
            f"{top}: {pct(r[top]['tpr_at_2pct_fpr'])} | {grp} | "
            f"{pct(r['windows']['held_out_windows_flagged'])} / {pct(r['windows']['other_windows_flagged'])} |"
        )
    L += _method_table(
        "Every score: held-out / other flagged at the calibrated threshold",
        results,
        methods,
        lambda c: f"{pct(c['held_out_flagged'])} / {pct(c['other_flagged'])}",
    )
    L += _method_table(
        "Every score: AUROC / TPR at 2% FPR (threshold on the held-out scores)",
        results,
        methods,
        lambda c: f"{c['auroc']:.2f} / {pct(c['tpr_at_2pct_fpr'])}",
    )
    tail = context["reference_tail"]
    L += [
        "",
        "## Why: measurements",
        "",
        "Per split, in the reference's units (`domain_analysis` in the script): 'inside' = share of the "
        "left-out images whose projection on the domain classifier's direction (fitted without R) lies "
        "within the reference's 1-99% range; delta = Mahalanobis distance (reference metric, Ledoit-Wolf) "
        "of its mean from the reference mean; 'Gaussian TPR' = what a Mahalanobis detector at 1% FPR "
        "would flag if the reference were Gaussian (noncentral chi-square, 42 degrees of freedom); 'hull "
        "distance' = distance from its mean to the nearest mix (convex combination) of the known groups' "
        "means (~0: it interpolates between known scanners; ~delta: it differs in a new direction), 'known "
        "separation' = median distance between two known groups' means; v2 threshold and medians = the "
        "shipped score's calibrated threshold and median distances; 'spread' = median sd(other)/"
        "sd(reference) over features.",
        "",
        "| split | domain AUROC | sup. TPR @2% | inside | delta | Gaussian TPR | hull distance / known "
        "separation | v2 threshold / held-out median / other median | spread | largest mean shifts "
        "(reference SD) | largest classifier coefficients |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        w = r["why"]
        hull = (
            f"{w['hull_distance']:.1f} / {w['known_group_separation']:.1f}" if "hull_distance" in w else "n/a"
        )
        v2 = r["v2"]
        shifts = ", ".join(f"{n} {v:+.1f}" for n, v in w["top_shifts"])
        coefs = ", ".join(f"{n} {v:+.1f}" for n, v in w["top_coefficients"])
        L.append(
            f"| {r['split']} | {r['domain_auroc']:.2f} | {pct(w['supervised_tpr'])} | "
            f"{pct(w['inside_reference'])} | {w['delta']:.1f} | {pct(w['gaussian_omnibus_tpr'])} | {hull} | "
            f"{v2['threshold']:.1f} / {v2['held_out_median']:.1f} / {v2['other_median']:.1f} | "
            f"{w['spread_ratio']:.2f} | {shifts} | {coefs} |"
        )
    L += [
        "",
        "The reference's own tail (all 621 NIH images, 5-fold held-out Mahalanobis distances): median "
        f"{tail['held_out_median']:.1f}, 99th percentile {tail['held_out_q99']:.1f}, where a Gaussian "
        f"reference would give {tail['gaussian_median']:.1f} and {tail['gaussian_q99']:.1f}. "
        f"{tail['n_features_excess_kurtosis_over_3']} of 42 features have excess kurtosis > 3 (largest: "
        + ", ".join(f"{n} {k:.0f}" for n, k in tail["most_kurtotic"][:3])
        + f"). AP (bedside) films are {pct(tail['ap_share'])} of the images but "
        f"{pct(tail['top_2pct_ap_share'])} of the 2% most novel.",
        "",
        "Pairwise domain AUROC between scanner groups (out-of-fold, all NIH images of the two groups):",
        "",
    ]
    for kind, pw in context["pairwise"].items():
        L.append(f"| {kind} | " + " | ".join(pw["groups"]) + " |")
        L.append("|---|" + "---|" * len(pw["groups"]))
        for a, rowv in zip(pw["groups"], pw["auroc"], strict=True):
            L.append(f"| {a} | " + " | ".join("" if v is None else f"{v:.2f}" for v in rowv) + " |")
        L.append("")
    L += _why_text(results, nih, tail)
    path.write_text("\n".join(L) + "\n")


def _delta_for(tpr: float, dof: int) -> float:
    """Mean shift (Mahalanobis) a Gaussian omnibus detector at 1 % FPR needs to flag ``tpr``."""
    crit = stats.chi2.ppf(QUANTILE, dof)
    return float(brentq(lambda d: stats.ncx2.sf(crit, dof, d**2) - tpr, 0.1, 50.0))


def _why_text(results: list[dict], nih: list[dict], tail: dict) -> list[str]:
    """The reading of the measurements above, with the figures taken from this run."""
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    span = lambda xs, f=pct: f(min(xs)) if f(min(xs)) == f(max(xs)) else f"{f(min(xs))}-{f(max(xs))}"  # noqa: E731
    one = lambda x: f"{x:.1f}"  # noqa: E731
    dof = len(tail["feature_names"])
    need = _delta_for(0.8, dof)
    sep = [r for r in nih if r["domain_auroc"] >= 0.95]
    small = [r for r in sep if r["why"]["delta"] < need]
    large = [r for r in sep if r["why"]["delta"] >= need]
    ws = [r["why"] for r in small]
    lines = [
        "## Why: reading",
        "",
        f"{len(sep)} of {len(nih)} NIH splits are separable (domain AUROC >= 0.95); on {len(small)} of them "
        f"the left-out group's mean shift is below the {need:.1f} (Mahalanobis) that a Gaussian omnibus "
        "detector would need for 80% at 1% FPR with "
        f"{dof} features.",
        "",
        f"1. **Small shifts spread over many features.** On those {len(small)} splits delta is "
        f"{span([w['delta'] for w in ws], one)}, made of mean shifts in several features (the largest "
        f"per split {span([abs(w['top_shifts'][0][1]) for w in ws], one)} reference SD): the resampling "
        "signature of the resize to 1024 x 1024 (upper frequency bands, high-frequency slope, x/y "
        "direction) and exposure (intensity quantiles, skewness, clipping). Even a Gaussian "
        f"reference would let a Mahalanobis detector flag only {span([w['gaussian_omnibus_tpr'] for w in ws])}. "
        "The supervised classifier combines the features it was shown the answer for: "
        f"{span([r['domain_auroc'] for r in small], lambda x: f'{x:.2f}')} AUROC, but only "
        f"{span([w['supervised_tpr'] for w in ws])} at 2% false positives, and along its own direction "
        f"{span([w['inside_reference'] for w in ws])} of the left-out images stay inside the reference's "
        "1-99% range.",
        "2. **The reference's heavy tail sets the threshold.** The 99th percentile of held-out distances "
        f"on all of NIH is {tail['held_out_q99']:.1f} against {tail['gaussian_q99']:.1f} for a Gaussian "
        f"(medians {tail['held_out_median']:.1f} and {tail['gaussian_median']:.1f}); the most novel reference "
        f"images are unusual films — AP bedside films are {pct(tail['ap_share'])} of the set but "
        f"{pct(tail['top_2pct_ap_share'])} of its 2% tail, with extreme histogram entropy, periodic-pattern or "
        "clipping features — not other scanners. Per split, the shipped score's threshold is "
        f"{span([r['v2']['threshold'] for r in nih], one)} while the left-out groups' median distance is "
        f"{span([r['v2']['other_median'] for r in nih], one)}.",
        "3. **Not interpolation, but a new direction of the same size as the known ones.** The distance "
        "from a left-out group's mean to the nearest mix of the known groups' means is "
        f"{span([w['hull_distance'] / w['delta'] for w in ws], lambda x: f'{x:.2f}')} of delta: it is "
        "not a blend of known scanners. But it is about as far from the reference (delta "
        f"{span([w['delta'] for w in ws], one)}) as the known scanners are from each other (median known "
        f"separation {span([w['known_group_separation'] for w in ws], one)}): the reference's spread is made of such "
        "scanner differences, and a score calibrated to accept them accepts one more. A one-class model per "
        f"known scanner group (`groups`, not label-free) flags {span([r['groups']['other_flagged'] for r in small])} "
        "on these splits: the groups overlap image by image although their means differ.",
    ]
    if large:
        lines.append(
            "4. **Where the shift is large it is concentrated in few features**: "
            + "; ".join(
                f"{r['split']} (delta {r['why']['delta']:.1f}, largest shift {r['why']['top_shifts'][0][0]} "
                f"{r['why']['top_shifts'][0][1]:+.1f} SD): v2 flags {pct(r['v2']['other_flagged'])} because the "
                f"reference tail lifts its threshold to {r['v2']['threshold']:.1f} (other median "
                f"{r['v2']['other_median']:.1f}); maxz {pct(r['maxz']['held_out_flagged'])} / "
                f"{pct(r['maxz']['other_flagged'])}, power {pct(r['power']['held_out_flagged'])} / "
                f"{pct(r['power']['other_flagged'])}, groups {pct(r['groups']['held_out_flagged'])} / "
                f"{pct(r['groups']['other_flagged'])} (held-out / other)"
                for r in large
            )
            + ". The single-feature score maxz exceeds 2% held-out (before rounding) on "
            f"{sum(r['maxz']['held_out_flagged'] > FPR for r in results)} of {len(results)} splits and flags "
            f"{span([r['maxz']['other_flagged'] for r in small])} of the small-shift groups, so it is no "
            "general replacement."
        )
    best_free = [max(r[m]["tpr_at_2pct_fpr"] for m in METHODS) for r in small]
    win = [r["windows"] for r in nih]
    lines += [
        f"5. **Best any label-free score reaches at 2% FPR** (threshold set on the held-out images "
        f"themselves, so optimistic) on the {len(small)} small-shift splits: {span(best_free)}, against "
        "the >= 80% target. Kermany (another hospital, another pipeline: delta "
        f"{results[-1]['why']['delta']:.0f}) is flagged {pct(results[-1]['v2']['other_flagged'])} by the "
        "shipped score.",
        f"6. **A window of images shows what one image cannot.** In {WINDOW}-image windows a feature mean "
        "moved by > 0.5 SD (BH q < 0.01) in "
        f"{span([r['windows']['other_windows_flagged'] for r in small])} of the windows of the small-shift "
        f"groups and in {span([x['held_out_windows_flagged'] for x in win])} of held-out windows (the "
        "false alarms of this simple, uncalibrated test; the monitor's drift verdict has its own): the mean "
        f"of {WINDOW} images has a standard error of {1 / WINDOW**0.5:.1f} SD, so the per-feature shifts "
        f"above (largest {span([abs(w['top_shifts'][0][1]) for w in ws], one)} SD) stand out in a batch "
        "although no single image is extreme.",
        "",
    ]
    odd = [r for r in nih if r["v2"]["auroc"] < 0.5]
    lines += [
        f"{r['split']}: the novelty AUROC is {r['v2']['auroc']:.2f} (< 0.5) and the group's spread "
        f"{r['why']['spread_ratio']:.2f} of the reference's: these images are *more* typical than the "
        f"reference. Its images all have pixel spacing {', '.join(r.get('other_spacings', []))}, shared "
        f"by {r.get('reference_same_spacing', 0)} reference images of other sizes: it is another image "
        "size of a scanner the reference knows, not a new scanner, and no novelty score should flag it."
        for r in odd
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
