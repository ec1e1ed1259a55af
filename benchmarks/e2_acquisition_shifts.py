"""E2: do spectral clusters find failures caused by known acquisition shifts?

A simple classifier (HOG + 32x32 pixels, logistic regression) is trained on Kermany
train (1000 NORMAL + 1000 PNEUMONIA) and applied to Kermany test (234 + 390), where a
seeded 30% subset is shifted (one shift kind and level at a time, or a mixture). Failure =
wrong decision at p >= 0.5. The spectral ReliabilityModel is fitted out-of-fold (5 folds)
on the test set's profiles and failures, and we measure whether its clusters and scores
single out the failures and the shifted images, against baselines (random partitions,
intensity-statistics clusters, the classifier's confidence, and the combined calibrated
score). A second part asks whether the monitor flags each shift at all: a model fitted on
clean kermany/train watches 100-image windows of kermany/test, every image shifted
(per-image novelty and drift verdicts per component; the clean condition gives false alarms).
The key rows are compared with an earlier run (default: the v1 results, profile spec 1.x).

Run from the repository root (defaults: all 15 shifts of benchmarks/shifts.py x 3 levels +
clean + two mixtures, 1 seed, 2 jobs)::

    .venv/bin/python benchmarks/e2_acquisition_shifts.py [--seeds 3] [--jobs 2]
        [--shifts blur,jpeg] [--levels strong] [--fraction 0.3] [--folds 5] [--windows 50]

Each image is decoded once and profiled once per condition (cached on disk); each
(condition, seed) evaluation is cached under a hash of its inputs and the code, so a rerun
with more seeds computes only the new seeds.

Writes benchmarks/results/e2_acquisition_shifts.{md,json} and e2_auroc.png.
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
from benchmarks.shifts import LEVEL_NAMES, LEVELS, OUTPUT_BITS, PHOTOMETRIC, SHIFTS, apply_shift  # noqa: E402
from monitor.clustering import SpectralClusterer  # noqa: E402
from monitor.imaging import load_image  # noqa: E402
from monitor.model import ReliabilityModel  # noqa: E402
from monitor.reliability import ClusterCalibrator, ClusterFailureRates, cramers_v  # noqa: E402
from monitor.spectrum import SPEC_VERSION, SpectralProfiler  # noqa: E402

__all__ = [
    "CLEAN",
    "MIXES",
    "V1_KINDS",
    "classifier_features",
    "conditions",
    "featurize_files",
    "fit_classifier",
    "kermany_files",
    "monitor_flags",
    "v1_comparison",
]

CLEAN = ("clean", "none")
FEATURE_VERSION = "e23-v1"  # bump when shifts, statistics or classifier features change
EVAL_VERSION = "e2-eval-2"  # bump when evaluate_condition or _run_one change what they compute
V1_KINDS = ("blur", "sharpen", "noise", "jpeg", "resample", "gamma", "grid")
"""The shift kinds of the v1 run (profile spec 1.x); ``mixed`` draws from these, as it did then."""
MIXES: dict[str, tuple[str, ...]] = {"mixed": V1_KINDS, "mixed_photometric": PHOTOMETRIC}
"""Mixed conditions: each shifted image gets a random (kind, level) among these kinds."""
V1_COMPARED = ("clean", "blur", "sharpen", "noise", "jpeg", "resample", "grid", "mixed")
"""Rows compared with the v1 results (gamma's levels changed from 0.8/0.6/0.4 to 0.9/0.8/0.7)."""
WINDOW = 100
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


def _mix_choices(name: str, feats_idx: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The shifted conditions a mixed condition draws from (those of its kinds that were featurized)."""
    return [c for c in feats_idx if c != CLEAN and c[0] in MIXES[name]]


def _run_one(cond, seed, feats_idx, F, y, p_all, fraction, folds, cache_dir, code):  # noqa: ANN001, ANN202
    n = len(y)
    rng = np.random.default_rng(seed)
    shifted = np.zeros(n, dtype=int)
    if cond != CLEAN:
        shifted[rng.choice(n, int(round(fraction * n)), replace=False)] = 1
    col = np.zeros(n, dtype=int)  # condition column of each image
    plan = None
    if cond[0] in MIXES:
        choices = _mix_choices(cond[0], feats_idx)
        plan = [f"{k}/{lv}" for k, lv in choices]
        pick = rng.integers(0, len(choices), n)
        col = np.array([feats_idx[choices[j]] for j in pick])
    elif cond != CLEAN:
        col[:] = feats_idx[cond]
    col = np.where(shifted == 1, col, 0)
    rows = np.arange(n)
    P = F["profile"][rows, col]
    S = F["stats"][rows, col]
    p = p_all[rows, col]
    # The result is a function of these inputs, the folds, the seed and the code: cache it under
    # their hash, so more seeds or a rerun after an interruption only compute what is missing.
    h = hashlib.sha256(json.dumps([EVAL_VERSION, code, folds, seed]).encode())
    for a in (P, S, p, y, shifted):
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    path = None if cache_dir is None else Path(cache_dir) / "e2-runs" / f"{h.hexdigest()[:20]}.json"
    cached = path is not None and path.exists()
    if cached:
        res = json.loads(path.read_text())
    else:
        res = evaluate_condition(P, S, p, y, shifted, folds, seed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(res))
            tmp.replace(path)  # atomic: an interrupted run never leaves half a result behind
    res.update({"kind": cond[0], "level": cond[1], "seed": seed, "from_cache": bool(cached)})
    if plan is not None:
        res["mixed_conditions"] = plan
    return res


def _code_version() -> str:
    """Hash of the code a cached evaluation depends on (its functions here and the monitor's estimators).

    Called in the main process: joblib's workers receive this script's functions pickled by value,
    without their source.
    """
    import inspect

    import monitor

    h = hashlib.sha256()
    for fn in (evaluate_condition, _cluster_rates, _blind_spot_pr, auroc):
        h.update(inspect.getsource(fn).encode())
    for name in ("clustering.py", "reliability.py", "model.py", "spectrum.py"):
        h.update((Path(monitor.__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- monitor flags


def monitor_flags(
    P: np.ndarray,
    failures: np.ndarray,
    y: np.ndarray,
    conds: list[tuple[str, str]],
    *,
    n_windows: int = 50,
    window: int = WINDOW,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Does the monitor flag each condition? Per-image novelty and window drift verdicts.

    The test set is split in two halves, stratified by label (seeded): a model is fitted on
    the clean profiles and the classifier's failures of one half (the reference), and the
    other half is held out. For each condition every held-out image is scored as shifted,
    and ``n_windows`` seeded windows of ``window`` distinct held-out images, all under that
    condition, get a drift report. The clean condition gives the false-alarm rates.

    Parameters
    ----------
    P : ndarray of shape (n_test, n_conditions, n_features)
        Profiles of the test images under each condition of ``conds`` (column 0 clean).
    failures : ndarray of shape (n_test,), 0/1
        The classifier's failures on the clean images.
    y : ndarray of shape (n_test,)
        Labels, for the stratified split.

    Returns
    -------
    list of dict, one per condition: ``novel_rate`` (share of held-out images flagged
    ``is_novel``), ``window_flagged`` (share of windows with a drift verdict) and
    ``component_flagged`` (share per component).
    """
    from sklearn.model_selection import train_test_split

    ref, held = train_test_split(np.arange(len(y)), test_size=0.5, stratify=y, random_state=seed)
    model = ReliabilityModel.fit(
        P[ref, 0], failures[ref], profiler=SpectralProfiler(), clusterer=SpectralClusterer(random_state=seed)
    )
    out = []
    for j, (kind, level) in enumerate(conds):
        X = P[held, j]
        res = model.score(X)
        z = model.standardise(X)
        rng = np.random.default_rng([seed, j])
        verdicts, components = [], {}
        for _ in range(n_windows):
            w = model.new_window()
            for i in rng.choice(len(held), min(window, len(held)), replace=False):
                r = res[i]
                w.add(r.cluster, r.is_novel, r.cluster_failure_probability, z[i])
            rep = model.drift(w)
            verdicts.append(rep.drift)
            for name, fired in rep.components.items():
                components.setdefault(name, []).append(bool(fired))
        out.append({
            "kind": kind, "level": level, "n_reference": len(ref), "n_held_out": len(held),
            "n_windows": n_windows, "window": window, "reference_k": model.n_clusters,
            "novel_rate": float(np.mean([r.is_novel for r in res])),
            "window_flagged": float(np.mean(verdicts)),
            "component_flagged": {k: float(np.mean(v)) for k, v in components.items()},
        })  # fmt: skip
    return out


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
    ap.add_argument(
        "--windows",
        type=int,
        default=50,
        help=f"drift windows of {WINDOW} test images per condition for the monitor's flags (default 50)",
    )
    ap.add_argument(
        "--compare",
        type=Path,
        default=RESULTS / "e2_acquisition_shifts_v1.json",
        help="earlier results to compare key rows with (default: the v1 results)",
    )
    ap.add_argument("--replot", action="store_true", help="rewrite md and png from the saved json only")
    ap.add_argument(
        "--reflag",
        action="store_true",
        help="recompute only the monitor-flag section with the current code (drift changes), keeping the saved "
        "out-of-fold runs; the conditions are those of the saved json",
    )
    args = ap.parse_args(argv)
    previous = json.loads(args.compare.read_text()) if args.compare and args.compare.exists() else None
    if args.replot:
        saved = json.loads((args.out / "e2_acquisition_shifts.json").read_text())
        summary = summarise(saved["runs"])
        write_markdown(args.out / "e2_acquisition_shifts.md", saved["meta"], saved["classifier"], summary,
                       saved.get("flags", []), previous, saved["runs"])  # fmt: skip
        plot(args.out, summary)
        return 0
    # One BLAS thread here; joblib's workers get one each too: the parallelism is over images/conditions.
    threadpool_limits(1)
    t0 = time.perf_counter()
    kinds = [k for k in args.shifts.split(",") if k]
    levels = [lv for lv in args.levels.split(",") if lv]
    if args.reflag:
        saved_levels = json.loads((args.out / "e2_acquisition_shifts.json").read_text())["meta"]["levels"]
        kinds, levels = (
            list(saved_levels),
            sorted({lv for v in saved_levels.values() for lv in v}, key=LEVEL_NAMES.index),
        )
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
    t_feat = time.perf_counter() - t0
    clf = fit_classifier(Ftr["clf"][:, 0], y_train)
    n_te, n_c, d = Fte["clf"].shape
    p_all = clf.predict_proba(Fte["clf"].reshape(-1, d))[:, 1].reshape(n_te, n_c)
    feats_idx = {c: i for i, c in enumerate(conds)}
    if args.reflag:
        saved = json.loads((args.out / "e2_acquisition_shifts.json").read_text())
        f_clean = ((p_all[:, 0] >= 0.5).astype(int) != y_test).astype(int)
        t1 = time.perf_counter()
        saved["flags"] = monitor_flags(
            Fte["profile"], f_clean, y_test, conds, n_windows=saved["meta"]["windows"]
        )
        saved["meta"]["seconds_flags"] = round(time.perf_counter() - t1, 1)
        saved["meta"]["flags_recomputed"] = "python benchmarks/e2_acquisition_shifts.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        (args.out / "e2_acquisition_shifts.json").write_text(json.dumps(saved, indent=1))
        summary = summarise(saved["runs"])
        write_markdown(args.out / "e2_acquisition_shifts.md", saved["meta"], saved["classifier"], summary,
                       saved["flags"], previous, saved["runs"])  # fmt: skip
        return 0

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
    mixes = [(m, "mixed") for m in MIXES if len(_mix_choices(m, feats_idx)) > 1]
    runs = conds + mixes
    # Seed-major: seed 0 finishes first (each task is cached, so an interrupted run resumes).
    tasks = [(c, s) for s in range(args.seeds) for c in runs]
    t1 = time.perf_counter()
    code = _code_version()
    results = Parallel(n_jobs=args.jobs)(
        delayed(_run_one)(
            c, s, feats_idx, Fte, y_test, p_all, args.fraction, args.folds, args.cache_dir, code
        )
        for c, s in tasks
    )
    t_eval = time.perf_counter() - t1
    summary = summarise(results)
    # Does the monitor flag each condition? A model fitted on one clean half of kermany/test
    # watches windows of the other half. (kermany/train is no fair reference: its classes are
    # balanced, the test set's are 234/390, which alone moves the cluster mix.)
    t1 = time.perf_counter()
    f_clean = ((p_all[:, 0] >= 0.5).astype(int) != y_test).astype(int)
    flags = monitor_flags(Fte["profile"], f_clean, y_test, conds, n_windows=args.windows)
    t_flags = time.perf_counter() - t1
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
        "profile_spec": SPEC_VERSION,
        "mixes": {m: list(MIXES[m]) for m, _ in mixes},
        "windows": args.windows,
        "window": WINDOW,
        "seconds": round(time.perf_counter() - t0, 1),
        "seconds_features": round(t_feat, 1),
        "seconds_evaluation": round(t_eval, 1),
        "seconds_flags": round(t_flags, 1),
        "evaluations_computed": sum(not r["from_cache"] for r in results),
        "evaluations_total": len(results),
        "command": "python benchmarks/e2_acquisition_shifts.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2_acquisition_shifts.json").write_text(
        json.dumps(
            {"meta": meta, "classifier": classifier, "summary": summary, "flags": flags, "runs": results},
            indent=1,
        )
    )
    write_markdown(args.out / "e2_acquisition_shifts.md", meta, classifier, summary, flags, previous, results)
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


def write_markdown(
    path: Path,
    meta: dict,
    classifier: list[dict],
    summary: list[dict],
    flags: list[dict] | None = None,
    previous: dict | None = None,
    runs: list[dict] | None = None,
) -> None:
    L = [
        "# E2: acquisition shifts with known ground truth (Kermany)",
        "",
        f"Classifier: {meta['classifier']}. Failure: {meta['failure']}. "
        f"Test set: kermany/test ({meta['n_test']} images); in each condition a seeded "
        f"{meta['fraction_shifted']:.0%} subset is shifted. Spectral model and baselines fitted "
        f"{meta['folds']}-fold out-of-fold on the test set; mean±sd over {meta['seeds']} seeds "
        "(subset, folds, clustering). Profile spec "
        f"{meta.get('profile_spec', '1.x')}: clusters on the spectral component, novelty on every feature. "
        "Regenerate: `" + meta["command"].strip() + "` "
        f"({_timing(meta)}).",
        "",
        "Shifts (benchmarks/shifts.py; strength per level mild / moderate / strong): "
        + "; ".join(f"{k} {'/'.join(f'{v:g}' for v in lv.values())}" for k, lv in meta["levels"].items())
        + ". Photometric: bright/dark = gain x, contrast_up/down = factor around the image mean (both clipped "
        "to 8 bits), gamma = exponent < 1 (brighter mid-tones), gamma_dark = exponent > 1, voi = a narrower "
        "window (relative width) centred on mid-range, stored as 16-bit data, equalize = blend with the "
        "globally equalised image, clahe = clip limit with 8x8 tiles. "
        + "; ".join(
            f"{m} = one random (kind, level) per shifted image among {', '.join(k)}"
            for m, k in meta.get("mixes", {"mixed": list(V1_KINDS)}).items()
        )
        + ".",
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
        "intensity = baseline: the same clusterer on 10 generic intensity statistics (not the model's "
        "intensity component); random = random partition with the "
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
    if flags:
        L += _flags_markdown(flags, classifier, meta)
    if previous:
        rows = v1_comparison(previous, summary, classifier, runs)
        L += _comparison_markdown(rows, previous["meta"], meta["seeds"])
    path.write_text("\n".join(L))


def _timing(meta: dict) -> str:
    if "seconds_evaluation" not in meta:
        return f"{meta['seconds']:.0f} s"
    if "evaluations_computed" in meta:
        reuse = (
            f"{meta['evaluations_computed']} of {meta['evaluations_total']} evaluations computed, "
            "the rest read from the cache"
        )
    else:
        reuse = "evaluations already in the cache were read, not recomputed"
    return (
        f"wall time of this invocation {meta['seconds']:.0f} s on 2 shared cores: features "
        f"{meta['seconds_features']:.0f} s, out-of-fold evaluation {meta['seconds_evaluation']:.0f} s ({reuse}), "
        f"monitor flags {meta['seconds_flags']:.0f} s; features and per-(condition, seed) "
        "evaluations are cached, so adding seeds computes only the new ones"
    )


def _flags_markdown(flags: list[dict], classifier: list[dict], meta: dict) -> list[str]:
    harm = {(c["kind"], c["level"]): c for c in classifier}
    comps = sorted({k for f in flags for k in f["component_flagged"]})
    f0 = flags[0]
    L = [
        "## Does the monitor flag it? (reference: one clean half of kermany/test; the other half shifted)",
        "",
        f"A model is fitted on the clean profiles and classifier failures of a seeded half of kermany/test "
        f"({f0['n_reference']} images, stratified by label; k = {f0['reference_k']}); the other "
        f"{f0['n_held_out']} images are held out and shifted, all of them, under each condition. novel = share "
        f"of held-out images flagged `is_novel`; windows flagged = share of {f0['n_windows']} seeded windows of "
        f"{f0['window']} distinct held-out images with a drift verdict, then per component. The clean row is "
        "the false-alarm rate. Drift thresholds are the model's defaults (monitor/drift.py). kermany/train is "
        "not used as the reference: its classes are balanced where the test set's are 234/390, and that alone "
        "moves the cluster mix (in a trial run all 5 clean test windows were flagged against it)."
        + (
            f" This section was recomputed with later drift code (`{meta['flags_recomputed']}`); the tables above "
            "do not depend on the drift code."
            if meta.get("flags_recomputed")
            else ""
        ),
        "",
        "| shift | level | classifier failure rate (clean 0.218) | novel | windows flagged | "
        + " | ".join(comps)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(comps),
    ]
    for f in flags:
        c = harm[(f["kind"], f["level"])]
        L.append(
            f"| {f['kind']} | {f['level']} | {c['failure_rate']:.3f} | {f['novel_rate']:.2f} | "
            f"{f['window_flagged']:.2f} | "
            + " | ".join(f"{f['component_flagged'].get(k, float('nan')):.2f}" for k in comps)
            + " |"
        )
    L.append("")
    return L


def v1_comparison(
    previous: dict, summary: list[dict], classifier: list[dict], runs: list[dict] | None = None
) -> list[dict[str, Any]]:
    """Key numbers of the rows in :data:`V1_COMPARED`, earlier results beside these ones.

    Each entry has ``kind``, ``level`` and, per quantity, ``(before, after_same_seeds,
    after_mean, after_sd)``: the earlier mean, this run's mean over the seeds the earlier run
    used (from ``runs``; the same subsets, folds and clusterings, so equal values mean nothing
    changed) and this run's mean and sd over all its seeds.
    """
    n_before = int(previous["meta"].get("seeds", 1))
    same = {(r["kind"], r["level"]): r for r in summarise([r for r in runs or [] if r["seed"] < n_before])}
    before = {(r["kind"], r["level"]): r for r in previous["summary"]}
    after = {(r["kind"], r["level"]): r for r in summary}
    acc_b = {(c["kind"], c["level"]): c["accuracy"] for c in previous.get("classifier", [])}
    acc_a = {(c["kind"], c["level"]): c["accuracy"] for c in classifier}
    quantities = {
        "accuracy": None,  # the classifier has no seed
        "failure_auroc_spectral": lambda r: r["auroc_failure"]["spectral"],
        "failure_auroc_combined": lambda r: r["auroc_failure"]["combined"],
        "shifted_auroc_spectral": lambda r: r["auroc_shifted"]["spectral"],
        "shifted_auroc_novelty": lambda r: r["auroc_shifted"]["novelty"],
        "blind_spot_precision": lambda r: r["spectral_blind_spot_shifted_oof"]["precision"],
        "blind_spot_recall": lambda r: r["spectral_blind_spot_shifted_oof"]["recall"],
        "cramers_v_shifted": lambda r: r["spectral_in_sample"]["cramers_v_shifted"],
        "cramers_v_failure": lambda r: r["spectral_in_sample"]["cramers_v_failure"],
    }
    nan = float("nan")
    out = []
    for key in after:
        if key[0] not in V1_COMPARED or key not in before:
            continue
        row: dict[str, Any] = {"kind": key[0], "level": key[1]}
        for q, get in quantities.items():
            if get is None:
                a = acc_a.get(key, nan)
                row[q] = (acc_b.get(key, nan), a, a, nan)
                continue
            s = get(same[key])["mean"] if key in same else nan
            row[q] = (float(get(before[key])["mean"]), float(s), float(get(after[key])["mean"]),
                      float(get(after[key])["sd"]))  # fmt: skip
        out.append(row)
    return out


def _comparison_markdown(rows: list[dict], previous_meta: dict, n_seeds: int) -> list[str]:
    def num(x: float) -> str:
        return "–" if not np.isfinite(x) else f"{x:.2f}"

    def cell(v: tuple[float, float, float, float]) -> str:
        b, same, mean, sd = v
        spread = f" ({num(mean)}±{num(sd)})" if np.isfinite(sd) else ""
        return f"{num(b)} → {num(same)}{spread}"

    n_before = int(previous_meta.get("seeds", 1))
    L = [
        "## v1 → v2: the rows that existed before (profile spec 1.x → 2.0)",
        "",
        f"Each cell: v1 ({previous_meta.get('source', 'earlier results')}; {n_before} seed) → this run on the "
        f"same seed{'s' if n_before > 1 else ''} (same subsets, folds and clustering seeds), then in brackets this "
        f"run's mean±sd over its {n_seeds} seeds. The clusters see the 31 spectral features, as in v1 (whose "
        "whole profile they were), so equal numbers on the same seed mean the spectral path did not change; "
        "novelty now sees all 42 features (31 spectral + 11 intensity). gamma is left out: its levels changed "
        "(v1: exponents 0.8 / 0.6 / 0.4), and the v1 mixed row drew from those gamma levels too.",
        "",
        "| shift | level | accuracy | failure AUROC spectral | combined | shifted AUROC spectral | novelty "
        "| blind spot OOF prec | rec | V(cluster×shifted) | V(cluster×failure) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        L.append(
            f"| {r['kind']} | {r['level']} | "
            + " | ".join(
                cell(r[q])
                for q in (
                    "accuracy",
                    "failure_auroc_spectral",
                    "failure_auroc_combined",
                    "shifted_auroc_spectral",
                    "shifted_auroc_novelty",
                    "blind_spot_precision",
                    "blind_spot_recall",
                    "cramers_v_shifted",
                    "cramers_v_failure",
                )
            )
            + " |"
        )
    L.append("")
    return L


def plot(out: Path, summary: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary
    labels = [f"{r['kind']} {r['level']}" if r["kind"] not in (*MIXES, "clean") else r["kind"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(15, 0.45 * len(rows)), 8.5), sharex=True)
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
    axes[1].set_xticks(x, labels, fontsize=8, rotation=90)
    fig.tight_layout()
    fig.savefig(out / "e2_auroc.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
