"""E2: do spectral clusters find failures caused by known acquisition shifts?

A simple classifier (HOG + 32x32 pixels, logistic regression) is trained on Kermany
train (1000 NORMAL + 1000 PNEUMONIA) and applied to Kermany test (234 + 390), where a
seeded 30% subset is shifted (one shift kind and level at a time, or a mixture). Failure =
wrong decision at p >= 0.5. The spectral ReliabilityModel is fitted out-of-fold (5 folds)
on the test set's profiles and failures, and we measure whether its clusters and scores
single out the failures and the shifted images, against baselines (random partitions,
intensity-statistics clusters, the classifier's confidence, and the combined calibrated
score).

Run from the repository root (defaults: all 7 shifts x 3 levels + mixed + clean, 1 seed,
2 jobs; about 10 minutes on 2 cores with a cold feature cache)::

    .venv/bin/python benchmarks/e2_acquisition_shifts.py [--seeds 3] [--jobs 2]
        [--shifts blur,jpeg] [--levels strong] [--fraction 0.3] [--folds 5]

Writes benchmarks/results/e2_acquisition_shifts.{md,json} and e2_*.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from PIL import Image
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.drift_baselines import intensity_statistics, thumbnail  # noqa: E402
from benchmarks.shifts import LEVEL_NAMES, LEVELS, OUTPUT_BITS, SHIFTS, apply_shift  # noqa: E402
from monitor.clustering import SpectralClusterer  # noqa: E402
from monitor.imaging import load_image  # noqa: E402
from monitor.model import ReliabilityModel  # noqa: E402
from monitor.reliability import ClusterCalibrator, ClusterFailureRates, cramers_v  # noqa: E402
from monitor.spectrum import SpectralProfiler  # noqa: E402

__all__ = [
    "CLEAN",
    "classifier_features",
    "conditions",
    "featurize_files",
    "fit_classifier",
    "kermany_files",
]

CLEAN = ("clean", "none")
FEATURE_VERSION = "e23-v1"  # bump when shifts, statistics or classifier features change
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxr-monitor" / "bench-e23"
RESULTS = ROOT / "benchmarks" / "results"


def conditions(kinds: list[str] | None = None, levels: list[str] | None = None) -> list[tuple[str, str]]:
    """(kind, level) pairs, clean first."""
    kinds = list(SHIFTS) if kinds is None else kinds
    levels = list(LEVEL_NAMES) if levels is None else levels
    return [CLEAN] + [(k, lv) for k in kinds for lv in levels]


def kermany_files(data: Path, split: str) -> tuple[list[Path], np.ndarray]:
    """Sorted file list of a Kermany split and labels (1 = PNEUMONIA)."""
    files, labels = [], []
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        folder = data / "kermany" / split / cls
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: Kermany {split}/{cls} folder not found")
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        files += found
        labels += [label] * len(found)
    return files, np.array(labels)


# ----------------------------------------------------------------------------- classifier


def _hog(x: np.ndarray, cell: int = 16, n_bins: int = 9) -> np.ndarray:
    """Per-cell histograms of unsigned gradient orientation, weighted by magnitude, L2-normalised."""
    gy, gx = np.gradient(x)
    mag = np.hypot(gx, gy)
    ang = np.mod(np.arctan2(gy, gx), np.pi)
    b = np.minimum((ang / np.pi * n_bins).astype(np.intp), n_bins - 1)
    h, w = x.shape
    ch, cw = h // cell, w // cell
    rows = np.minimum(np.arange(h) // cell, ch - 1)[:, None]
    cols = np.minimum(np.arange(w) // cell, cw - 1)[None, :]
    idx = ((rows * cw + cols) * n_bins + b).ravel()
    H = np.bincount(idx, weights=mag.ravel(), minlength=ch * cw * n_bins).reshape(ch * cw, n_bins)
    H /= np.linalg.norm(H, axis=1, keepdims=True) + 1e-6
    return H.ravel()


def classifier_features(pixels: np.ndarray) -> np.ndarray:
    """HOG (16-pixel cells on the 224x224 image) plus 32x32 area-averaged pixels; float32."""
    x = np.asarray(pixels, dtype=np.float32)
    if x.shape != (224, 224):
        x = np.asarray(Image.fromarray(x, mode="F").resize((224, 224), Image.Resampling.BILINEAR))
    small = np.asarray(Image.fromarray(x, mode="F").resize((32, 32), Image.Resampling.BOX)).ravel() / 255.0
    return np.concatenate([_hog(x), small]).astype(np.float32)


def fit_classifier(X: np.ndarray, y: np.ndarray) -> Any:
    """Standardise + L2 logistic regression (C=0.01): honest, simple, 2-core friendly."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000)).fit(X, y)


# ----------------------------------------------------------------------------- features


def _image_seed(seed: int, index: int, kind: str) -> int:
    return int(np.random.SeedSequence([seed, index, list(SHIFTS).index(kind)]).generate_state(1)[0])


def _featurize_one(
    path: Path, index: int, conds: list[tuple[str, str]], seed: int, with_classifier: bool, with_thumb: bool
) -> dict[str, np.ndarray]:
    profiler = SpectralProfiler()
    image = load_image(path)
    pixels, bits = image.pixels, image.meta.bits_stored
    out: dict[str, list] = {"profile": [], "stats": [], "thumb": [], "clf": []}
    for kind, level in conds:
        x = (
            pixels
            if (kind, level) == CLEAN
            else apply_shift(pixels, kind, level, seed=_image_seed(seed, index, kind))
        )
        out_bits = OUTPUT_BITS.get(kind, bits)
        if out_bits != bits:
            # Stored at another depth (a VOI window baked into 16-bit data): profile those values.
            full = 2.0**out_bits - 1
            out["profile"].append(profiler.profile(np.rint(x / (2.0**bits - 1) * full), out_bits))
        else:
            out["profile"].append(profiler.profile(x, bits))
        out["stats"].append(intensity_statistics(x))
        if with_thumb:
            out["thumb"].append(thumbnail(x, 32))
        if with_classifier:
            out["clf"].append(classifier_features(x))
    return {k: np.stack(v) for k, v in out.items() if v}


def featurize_files(
    files: list[Path],
    conds: list[tuple[str, str]],
    *,
    tag: str,
    seed: int = 0,
    jobs: int = 2,
    cache_dir: Path | None = DEFAULT_CACHE,
    with_classifier: bool = False,
    with_thumb: bool = True,
) -> dict[str, np.ndarray]:
    """Profiles, intensity statistics, thumbnails (and classifier features) under each condition.

    Returns
    -------
    dict with ``profile`` (n_images, n_conds, 31), ``stats`` (n_images, n_conds, 10),
    ``thumb`` (n_images, n_conds, 1024) and optionally ``clf`` (n_images, n_conds, d).
    Cached as one ``.npz`` per condition, keyed by the file list, the seed and
    :data:`FEATURE_VERSION`; only missing conditions are computed (each image decoded once).
    """
    key = hashlib.sha256(
        json.dumps(
            [
                FEATURE_VERSION,
                SpectralProfiler().spec(),
                [str(f) for f in files],
                seed,
                with_classifier,
                with_thumb,
            ]
        ).encode()
    ).hexdigest()[:16]

    def cache_path(cond: tuple[str, str]) -> Path | None:
        return None if cache_dir is None else Path(cache_dir) / f"{tag}-{key}-{cond[0]}-{cond[1]}.npz"

    cached: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for c in conds:
        path = cache_path(c)
        if path is not None and path.exists():
            with np.load(path, allow_pickle=False) as z:
                cached[c] = {k: z[k] for k in z.files}
    missing = [c for c in conds if c not in cached]
    if missing:
        t0 = time.perf_counter()
        rows = Parallel(n_jobs=jobs, batch_size=2)(
            delayed(_featurize_one)(f, i, missing, seed, with_classifier, with_thumb)
            for i, f in enumerate(files)
        )
        for j, c in enumerate(missing):
            cached[c] = {k: np.stack([r[k][j] for r in rows]) for k in rows[0]}
            path = cache_path(c)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(path, **cached[c])
        print(f"  featurized {tag}: {len(files)} images x {len(missing)} conditions in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)  # fmt: skip
    return {k: np.stack([cached[c][k] for c in conds], axis=1) for k in cached[conds[0]]}


# ----------------------------------------------------------------------------- evaluation


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < y.size else float("nan")


def _cluster_rates(Xtr, ftr, Xte, seed):  # noqa: ANN001, ANN202 - private, arrays
    """Same clusterer + Beta-shrunk rates on any feature matrix; out-of-fold failure score."""
    cl = SpectralClusterer(random_state=seed).fit(Xtr)
    rates = ClusterFailureRates(cl.n_clusters_).fit(cl.predict(Xtr), ftr)
    m = cl.predict_proba(Xte)
    return rates.predict_failure(m)[0], rates.blind_spot_[m.argmax(axis=1)], cl.n_clusters_


def _blind_spot_pr(flag: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    n_flag = int(flag.sum())
    return {
        "n_flagged": n_flag,
        "precision": float(truth[flag].mean()) if n_flag else float("nan"),
        "recall": float(flag[truth].mean()) if truth.any() else float("nan"),
    }


def evaluate_condition(
    P: np.ndarray, S: np.ndarray, p: np.ndarray, y: np.ndarray, shifted: np.ndarray, folds: int, seed: int
) -> dict[str, Any]:
    """Out-of-fold failure scores and blind-spot flags for one test set with a known shifted subset.

    P profiles (n, 31), S intensity statistics (n, 10), p classifier probabilities, y labels,
    shifted 0/1 mask.
    """
    from sklearn.model_selection import StratifiedKFold

    profiler = SpectralProfiler()
    failure = ((p >= 0.5).astype(int) != y).astype(int)
    n = len(y)
    scores = {name: np.zeros(n) for name in ("spectral", "combined", "novelty", "intensity", "random",
                                              "confidence_cal")}  # fmt: skip
    flags = {name: np.zeros(n, dtype=bool) for name in ("spectral", "intensity")}
    ks = []
    rng = np.random.default_rng(seed)
    strata = failure * 2 + shifted
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(P, strata):
        model = ReliabilityModel.fit(
            P[tr], failure[tr], profiler=profiler, clusterer=SpectralClusterer(random_state=seed),
            labels=y[tr], scores=p[tr], threshold=0.5,
        )  # fmt: skip
        res = model.score(P[te])
        scores["spectral"][te] = [r.failure_probability for r in res]
        flags["spectral"][te] = [r.in_blind_spot for r in res]
        scores["novelty"][te] = [r.novelty for r in res]
        scores["combined"][te] = [r.failure_probability for r in model.score(P[te], p[te])]
        k = model.n_clusters
        ks.append(k)
        s_int, f_int, _ = _cluster_rates(S[tr], failure[tr], S[te], seed)
        scores["intensity"][te] = s_int
        flags["intensity"][te] = f_int
        # Random partition with the spectral model's k: what any k-way split gives by chance.
        lab_tr, lab_te = rng.integers(0, k, tr.size), rng.integers(0, k, te.size)
        rates = ClusterFailureRates(k).fit(lab_tr, failure[tr])
        scores["random"][te] = rates.rate_[lab_te]
        one = np.ones((tr.size, 1))
        cal = ClusterCalibrator(threshold=0.5).fit(p[tr], y[tr], one)
        scores["confidence_cal"][te] = cal.predict_failure(p[te], np.ones((te.size, 1)))
    scores["confidence"] = 1.0 - 2.0 * np.abs(p - 0.5)
    out: dict[str, Any] = {
        "n": n,
        "n_shifted": int(shifted.sum()),
        "failure_rate": float(failure.mean()),
        "failure_rate_shifted": float(failure[shifted == 1].mean()) if shifted.any() else float("nan"),
        "failure_rate_clean_part": float(failure[shifted == 0].mean()),
        "k_per_fold": ks,
        "auroc_failure": {name: auroc(failure, s) for name, s in scores.items()},
        "auroc_shifted": {name: auroc(shifted, s) for name, s in scores.items()},
    }
    sh = shifted.astype(bool)
    out["blind_spot_vs_shifted_oof"] = {name: _blind_spot_pr(f, sh) for name, f in flags.items()}
    out["blind_spot_vs_failure_oof"] = {
        name: _blind_spot_pr(f, failure.astype(bool)) for name, f in flags.items()
    }
    # In-sample fit on all images: what the tool's fit report would show.
    full = ReliabilityModel.fit(P, failure, profiler=profiler, clusterer=SpectralClusterer(random_state=seed))
    hard = full.clusterer.labels_
    cl_int = SpectralClusterer(random_state=seed).fit(S)
    hard_int = cl_int.labels_
    insample = {}
    for name, lab, rates in (
        ("spectral", hard, full.rates),
        ("intensity", hard_int, ClusterFailureRates(cl_int.n_clusters_).fit(hard_int, failure)),
    ):
        kk = int(lab.max()) + 1
        t_fail = np.stack([np.bincount(lab, weights=1 - failure, minlength=kk),
                           np.bincount(lab, weights=failure, minlength=kk)], axis=1)  # fmt: skip
        t_shift = np.stack([np.bincount(lab, weights=1 - shifted, minlength=kk),
                            np.bincount(lab, weights=shifted, minlength=kk)], axis=1)  # fmt: skip
        flag = rates.blind_spot_[lab]
        insample[name] = {
            "k": kk,
            "cramers_v_failure": cramers_v(t_fail),
            "chi2_p_failure": float(rates.chi2_p_),
            "cramers_v_shifted": cramers_v(t_shift) if shifted.any() else float("nan"),
            "n_blind_spot_clusters": int(rates.blind_spot_.sum()),
            "blind_spot_vs_shifted": _blind_spot_pr(flag, sh),
        }
    out["in_sample"] = insample
    return out


def _run_one(cond, seed, feats_idx, F, y, p_all, fraction, folds, mixed_plan):  # noqa: ANN001, ANN202
    n = len(y)
    rng = np.random.default_rng(seed)
    shifted = np.zeros(n, dtype=int)
    if cond != CLEAN:
        shifted[rng.choice(n, int(round(fraction * n)), replace=False)] = 1
    col = np.zeros(n, dtype=int)  # condition column of each image
    if cond == ("mixed", "mixed"):
        choices = [c for c in feats_idx if c != CLEAN]
        pick = rng.integers(0, len(choices), n)
        col = np.array([feats_idx[choices[j]] for j in pick])
    elif cond != CLEAN:
        col[:] = feats_idx[cond]
    col = np.where(shifted == 1, col, 0)
    rows = np.arange(n)
    P = F["profile"][rows, col]
    S = F["stats"][rows, col]
    p = p_all[rows, col]
    res = evaluate_condition(P, S, p, y, shifted, folds, seed)
    res.update({"kind": cond[0], "level": cond[1], "seed": seed})
    if cond == ("mixed", "mixed"):
        res["mixed_conditions"] = mixed_plan
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=1, help="subset/fold/cluster seeds 0..N-1 (default 1)")
    ap.add_argument("--fraction", type=float, default=0.3, help="share of kermany/test shifted (default 0.3)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--shifts", default=",".join(SHIFTS), help="comma-separated shift kinds (default all)")
    ap.add_argument("--levels", default=",".join(LEVEL_NAMES), help="comma-separated levels (default all)")
    ap.add_argument("--replot", action="store_true", help="rewrite md and png from the saved json only")
    args = ap.parse_args(argv)
    if args.replot:
        saved = json.loads((args.out / "e2_acquisition_shifts.json").read_text())
        summary = summarise(saved["runs"])
        write_markdown(args.out / "e2_acquisition_shifts.md", saved["meta"], saved["classifier"], summary)
        plot(args.out, summary)
        return 0
    # One BLAS thread here; joblib's workers get one each too: the parallelism is over images/conditions.
    threadpool_limits(1)
    t0 = time.perf_counter()
    kinds = [k for k in args.shifts.split(",") if k]
    levels = [lv for lv in args.levels.split(",") if lv]
    conds = conditions(kinds, levels)
    train_files, y_train = kermany_files(args.data, "train")
    test_files, y_test = kermany_files(args.data, "test")
    print(
        f"E2: {len(train_files)} train, {len(test_files)} test images; {len(conds)} conditions",
        file=sys.stderr,
    )
    Ftr = featurize_files(train_files, [CLEAN], tag="kermany-train", jobs=args.jobs, cache_dir=args.cache_dir,
                          with_classifier=True)  # fmt: skip
    Fte = featurize_files(test_files, conds, tag="kermany-test", jobs=args.jobs, cache_dir=args.cache_dir,
                          with_classifier=True)  # fmt: skip
    clf = fit_classifier(Ftr["clf"][:, 0], y_train)
    n_te, n_c, d = Fte["clf"].shape
    p_all = clf.predict_proba(Fte["clf"].reshape(-1, d))[:, 1].reshape(n_te, n_c)
    feats_idx = {c: i for i, c in enumerate(conds)}

    # How much each shift hurts the classifier when it hits every test image.
    classifier = []
    for c, j in feats_idx.items():
        pj = p_all[:, j]
        wrong = (pj >= 0.5).astype(int) != y_test
        wrong0 = (p_all[:, 0] >= 0.5).astype(int) != y_test
        classifier.append({
            "kind": c[0], "level": c[1], "accuracy": float(1 - wrong.mean()), "auroc": auroc(y_test, pj),
            "failure_rate": float(wrong.mean()), "newly_wrong": float((wrong & ~wrong0).mean()),
            "newly_right": float((~wrong & wrong0).mean()),
            "predicted_positive": float((pj >= 0.5).mean()),
        })  # fmt: skip
    print(f"  classifier clean accuracy {classifier[0]['accuracy']:.3f}, AUROC {classifier[0]['auroc']:.3f}",
          file=sys.stderr)  # fmt: skip
    mixed_plan = [f"{k}/{lv}" for k, lv in conds if (k, lv) != CLEAN]
    runs = conds + [("mixed", "mixed")] if len(conds) > 2 else conds
    tasks = [(c, s) for c in runs for s in range(args.seeds)]
    results = Parallel(n_jobs=args.jobs)(
        delayed(_run_one)(c, s, feats_idx, Fte, y_test, p_all, args.fraction, args.folds, mixed_plan)
        for c, s in tasks
    )
    summary = summarise(results)
    meta = {
        "experiment": "E2 acquisition shifts with known ground truth",
        "classifier": "HOG (16 px cells, 9 bins, per-cell L2) + 32x32 pixels -> StandardScaler -> "
        "LogisticRegression(C=0.01); trained on kermany/train (1000+1000)",
        "failure": "wrong decision at p >= 0.5",
        "fraction_shifted": args.fraction,
        "folds": args.folds,
        "seeds": args.seeds,
        "levels": {k: LEVELS[k] for k in kinds},
        "n_test": int(len(y_test)),
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python benchmarks/e2_acquisition_shifts.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2_acquisition_shifts.json").write_text(
        json.dumps({"meta": meta, "classifier": classifier, "summary": summary, "runs": results}, indent=1)
    )
    write_markdown(args.out / "e2_acquisition_shifts.md", meta, classifier, summary)
    plot(args.out, summary)
    print(f"E2 done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


METHODS = ("spectral", "combined", "novelty", "intensity", "random", "confidence", "confidence_cal")


def _ms(values: list[float]) -> dict[str, float]:
    v = np.array(values, dtype=float)
    if np.all(np.isnan(v)):
        return {"mean": float("nan"), "sd": float("nan")}
    return {"mean": float(np.nanmean(v)), "sd": float(np.nanstd(v)) if v.size > 1 else float("nan")}


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sd over seeds for each condition."""
    out = []
    keys = []
    for r in results:
        if (r["kind"], r["level"]) not in keys:
            keys.append((r["kind"], r["level"]))
    for kind, level in keys:
        rs = [r for r in results if (r["kind"], r["level"]) == (kind, level)]
        row: dict[str, Any] = {"kind": kind, "level": level, "n_seeds": len(rs)}
        for f in ("failure_rate", "failure_rate_shifted", "failure_rate_clean_part"):
            row[f] = _ms([r[f] for r in rs])
        row["auroc_failure"] = {m: _ms([r["auroc_failure"][m] for r in rs]) for m in METHODS}
        row["auroc_shifted"] = {m: _ms([r["auroc_shifted"][m] for r in rs]) for m in METHODS}
        for src in ("spectral", "intensity"):
            row[f"{src}_blind_spot_shifted_oof"] = {
                q: _ms([r["blind_spot_vs_shifted_oof"][src][q] for r in rs]) for q in ("precision", "recall")
            }
            row[f"{src}_in_sample"] = {
                q: _ms([r["in_sample"][src][q] for r in rs])
                for q in (
                    "k",
                    "cramers_v_failure",
                    "chi2_p_failure",
                    "cramers_v_shifted",
                    "n_blind_spot_clusters",
                )
            }
            row[f"{src}_in_sample"]["blind_spot_precision"] = _ms(
                [r["in_sample"][src]["blind_spot_vs_shifted"]["precision"] for r in rs]
            )
            row[f"{src}_in_sample"]["blind_spot_recall"] = _ms(
                [r["in_sample"][src]["blind_spot_vs_shifted"]["recall"] for r in rs]
            )
        out.append(row)
    return out


def _f(x: dict[str, float], digits: int = 2) -> str:
    if not np.isfinite(x["mean"]):
        return "–"
    if not np.isfinite(x["sd"]):  # a single seed: no spread to show
        return f"{x['mean']:.{digits}f}"
    return f"{x['mean']:.{digits}f}±{x['sd']:.{digits}f}"


def write_markdown(path: Path, meta: dict, classifier: list[dict], summary: list[dict]) -> None:
    L = [
        "# E2: acquisition shifts with known ground truth (Kermany)",
        "",
        f"Classifier: {meta['classifier']}. Failure: {meta['failure']}. "
        f"Test set: kermany/test ({meta['n_test']} images); in each condition a seeded "
        f"{meta['fraction_shifted']:.0%} subset is shifted. Spectral model and baselines fitted "
        f"{meta['folds']}-fold out-of-fold on the test set; mean±sd over {meta['seeds']} seeds "
        "(subset, folds, clustering). Regenerate: `" + meta["command"].strip() + "` "
        f"({meta['seconds']:.0f} s).",
        "",
        "## Does each shift hurt the classifier? (all 624 test images shifted)",
        "",
        "| shift | level | accuracy | AUROC | failure rate | newly wrong | newly right | predicted positive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in classifier:
        L.append(
            f"| {c['kind']} | {c['level']} | {c['accuracy']:.3f} | {c['auroc']:.3f} | {c['failure_rate']:.3f} | "
            f"{c['newly_wrong']:.3f} | {c['newly_right']:.3f} | {c['predicted_positive']:.3f} |"
        )
    L += [
        "",
        "## Failure prediction, out of fold (AUROC for the classifier's failures)",
        "",
        "spectral = cluster failure rate of the ReliabilityModel (label-free at scoring time); "
        "combined = the model's per-cluster calibrated score (uses the classifier's probability); "
        "novelty = the model's novelty (share of the fit set closer to the reference centre); "
        "intensity = same clusterer on 10 intensity statistics; random = random partition with the "
        "spectral k; confidence = 1 - 2|p - 0.5|; confidence_cal = global logistic calibration of p "
        "(the combined score without clusters).",
        "",
        "| shift | level | failure rate (shifted / rest) | spectral | combined | novelty | intensity | random | confidence "
        "| confidence_cal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        a = r["auroc_failure"]
        L.append(
            f"| {r['kind']} | {r['level']} | {_f(r['failure_rate_shifted'])} / {_f(r['failure_rate_clean_part'])} | "
            + " | ".join(_f(a[m]) for m in METHODS)
            + " |"
        )
    L += [
        "",
        "## Do the clusters isolate the shifted images?",
        "",
        "AUROC of each out-of-fold failure score for *being shifted*; blind-spot clusters (whole "
        "95% interval above the global failure rate) against the shifted subset, out of fold "
        "(precision = share of flagged images that are shifted; base rate 0.30) and in sample "
        "(fit on all 624); Cramér's V of cluster × failure and cluster × shifted (in-sample fit).",
        "",
        "| shift | level | AUROC shifted: spectral / novelty / intensity | blind spot OOF spectral: prec / rec | "
        "intensity: prec / rec | V(cluster×failure) spectral / intensity | V(cluster×shifted) spectral / "
        "intensity | k spectral |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        s, i = r["spectral_in_sample"], r["intensity_in_sample"]
        bs, bi = r["spectral_blind_spot_shifted_oof"], r["intensity_blind_spot_shifted_oof"]
        L.append(
            f"| {r['kind']} | {r['level']} | {_f(r['auroc_shifted']['spectral'])} / "
            f"{_f(r['auroc_shifted']['novelty'])} / "
            f"{_f(r['auroc_shifted']['intensity'])} | {_f(bs['precision'])} / {_f(bs['recall'])} | "
            f"{_f(bi['precision'])} / {_f(bi['recall'])} | {_f(s['cramers_v_failure'])} / "
            f"{_f(i['cramers_v_failure'])} | {_f(s['cramers_v_shifted'])} / {_f(i['cramers_v_shifted'])} | "
            f"{_f(s['k'], 1)} |"
        )
    L += [
        "",
        "Blind-spot precision is '–' when no image was flagged in any seed. The clean row has no shifted "
        "images (its shifted columns are undefined).",
        "",
    ]
    path.write_text("\n".join(L))


def plot(out: Path, summary: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary
    labels = [
        f"{r['kind']}\n{r['level']}" if r["kind"] not in ("mixed", "clean") else r["kind"] for r in rows
    ]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(2, 1, figsize=(15, 8.5), sharex=True)
    colours = {"spectral": "C0", "combined": "C1", "novelty": "C5", "intensity": "C2", "random": "0.6", "confidence": "C3",
               "confidence_cal": "C4"}  # fmt: skip
    width = 0.12
    for j, m in enumerate(METHODS):
        vals = [r["auroc_failure"][m]["mean"] for r in rows]
        errs = np.nan_to_num([r["auroc_failure"][m]["sd"] for r in rows])
        axes[0].bar(x + (j - 3) * width, vals, width, yerr=errs, color=colours[m], label=m, capsize=1)
    axes[0].axhline(0.5, color="k", lw=0.8, ls=":")
    axes[0].set_ylim(0.3, 1.0)
    axes[0].set_ylabel("AUROC for failures (OOF)")
    axes[0].legend(ncol=7, fontsize=9, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.suptitle("E2 (Kermany, 30% of test shifted): which score ranks the classifier's failures?")
    for j, m in enumerate(("spectral", "intensity")):
        vals = np.nan_to_num([r[f"{m}_in_sample"]["cramers_v_shifted"]["mean"] for r in rows])
        axes[1].bar(x + (j - 0.5) * 0.35, vals, 0.35, color=colours[m], label=f"{m} clusters")
    fr = [r["failure_rate_shifted"]["mean"] - r["failure_rate_clean_part"]["mean"] for r in rows]
    ax2 = axes[1].twinx()
    ax2.plot(x, fr, "ko-", ms=4, label="classifier failure rate: shifted − rest")
    ax2.axhline(0, color="k", lw=0.6)
    ax2.set_ylabel("failure-rate gap (shifted − rest)")
    axes[1].set_ylim(0, 1.35)  # headroom for the legends
    axes[1].set_yticks(np.linspace(0, 1, 6))
    axes[1].set_ylabel(
        "Cramér's V, cluster × shifted\n(in-sample fit; 1 = a cluster is exactly the shifted set)"
    )
    axes[1].legend(loc="upper left", fontsize=9, ncol=2)
    ax2.legend(loc="upper right", fontsize=9)
    lo, hi = float(np.nanmin(fr)), float(np.nanmax(fr))  # clean has no shifted part (nan)
    ax2.set_ylim(lo - 0.02, hi + 0.35 * (hi - lo) + 0.02)
    axes[1].set_xticks(x, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "e2_auroc.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
