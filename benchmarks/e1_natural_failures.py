"""E1: do spectral clusters find where a real classifier fails? NIH ChestX-ray14 + CheXNet outputs.

Three tasks on the 621 NIH images (a failure is a wrong thresholded decision):

(a) abnormal vs ``No Finding``, score = max of the 14 CheXNet probabilities;
(b) Effusion, score = chexnet_effusion;  (c) Infiltration, score = chexnet_infiltration.

The decision threshold is Youden's J (the rule of models/build_default.py) computed on the
training folds only, so held-out failures are judged with a threshold that never saw them.
Out-of-fold: 5-fold stratified by failure (failure under the full-data threshold, used only to
balance the folds), repeated with 5 seeds. On each training fold we fit a ReliabilityModel
(spectral clusters + failure rates + cluster calibration) and score the held-out images with:

- ``cluster``: the cluster failure rate (label-free: needs no classifier score);
- ``confidence``: P(fail | score) from one global calibration (ClusterCalibrator with a single
  all-ones membership column);
- ``combined``: the cluster-calibrated confidence (ReliabilityModel.score with classifier_scores).

Baselines on the same folds: random partitions of the same cluster sizes, metadata slices
(view, sex, age band, pixel spacing as scanner proxy) and clusters of intensity statistics
(same SpectralClusterer, only the features differ). Run from the repository root:

    .venv/bin/python benchmarks/e1_natural_failures.py [--repeats 5] [--jobs 2]

Writes benchmarks/results/e1_natural_failures.{md,json} and e1_*.png.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from joblib import Parallel, delayed

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import evaluation as ev  # noqa: E402
from monitor.batch import profile_files  # noqa: E402
from monitor.clustering import SpectralClusterer  # noqa: E402
from monitor.imaging import load_bytes  # noqa: E402
from monitor.model import ReliabilityModel  # noqa: E402
from monitor.reliability import ClusterCalibrator, ClusterFailureRates  # noqa: E402
from monitor.spectrum import SpectralProfiler  # noqa: E402

__all__ = ["Task", "load_tasks", "main", "run_task"]

DATA = ROOT.parent / "shared" / "data" / "nih"
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("CXR_MONITOR_BENCH_CACHE", Path.home() / ".cache" / "cxr-monitor"))
SLICES = ("view", "sex", "age_band", "pixel_spacing")
PREDICTORS = ("cluster", "confidence", "combined", "intensity_cluster", "random_partition") + tuple(
    f"slice_{s}" for s in SLICES
)


class Task:
    """One binary task: true labels and the classifier's score for the positive class."""

    def __init__(self, key: str, title: str, labels: np.ndarray, scores: np.ndarray) -> None:
        self.key, self.title, self.labels, self.scores = key, title, labels, scores

    def failures(self, threshold: float, idx: np.ndarray | None = None) -> np.ndarray:
        sel = slice(None) if idx is None else idx
        return ((self.scores[sel] >= threshold).astype(int) != self.labels[sel]).astype(int)


def load_tasks(rows: list[dict[str, str]]) -> list[Task]:
    finding_cols = [c for c in rows[0] if c.startswith("chexnet_")]
    findings = [set(r["findings"].split("|")) for r in rows]
    abnormal = np.array([r["findings"] != "No Finding" for r in rows], dtype=int)
    max_score = np.array([max(float(r[c]) for c in finding_cols) for r in rows])
    tasks = [Task("abnormal", "(a) abnormal vs No Finding, score = max of 14", abnormal, max_score)]
    for name in ("Effusion", "Infiltration"):
        col = f"chexnet_{name.lower()}"
        y = np.array([name in f for f in findings], dtype=int)
        s = np.array([float(r[col]) for r in rows])
        tasks.append(
            Task(name.lower(), f"({'b' if name == 'Effusion' else 'c'}) {name}, score = {col}", y, s)
        )
    return tasks


# --------------------------------------------------------------------------- features


def _intensity_one(path: Path, cache_root: Path) -> np.ndarray:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    f = cache_root / digest[:2] / f"{digest}.npy"
    if f.exists():
        return np.load(f, allow_pickle=False)
    feats = ev.intensity_features(load_bytes(data, name=str(path)).pixels)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, feats)
    tmp.replace(f)
    return feats


def intensity_matrix(paths: list[Path], jobs: int) -> np.ndarray:
    """Intensity statistics of each image, cached by content under the benchmark cache."""
    root = CACHE / "intensity-v1"
    rows = Parallel(n_jobs=jobs, batch_size=8)(delayed(_intensity_one)(p, root) for p in paths)
    return np.vstack(rows)


# --------------------------------------------------------------------------- one task


def _frozen(clusterer: SpectralClusterer) -> SpectralClusterer:
    """A fitted clusterer whose ``fit`` is a no-op.

    ``ReliabilityModel.fit`` always calls ``clusterer.fit(X)``; the clusters do not depend on
    the task, and a refit on the same X with the same seed gives the same clusters, so each
    fold fits once and the three tasks reuse the result (3x less clustering, same numbers).
    """
    c = copy.copy(clusterer)
    c.fit = lambda X, y=None: c  # type: ignore[method-assign]
    return c


def _fit_predict_fold(
    tasks: list[Task],
    X: np.ndarray,
    Xint: np.ndarray,
    slices: dict[str, np.ndarray],
    tr: np.ndarray,
    te: np.ndarray,
    seed: int,
) -> list[dict[str, Any]]:
    """Fit everything on ``tr`` for every task; return held-out predictions per task."""
    spec = SpectralClusterer(random_state=0).fit(X[tr])
    cl_int = SpectralClusterer(random_state=0).fit(Xint[tr])
    lab_int_tr, lab_int_te = cl_int.labels_, cl_int.predict(Xint[te])
    memb_int_te = cl_int.predict_proba(Xint[te])
    return [
        _fit_predict_task(t, X, slices, tr, te, seed, spec, cl_int, lab_int_tr, lab_int_te, memb_int_te)
        for t in tasks
    ]


def _fit_predict_task(
    task: Task,
    X: np.ndarray,
    slices: dict[str, np.ndarray],
    tr: np.ndarray,
    te: np.ndarray,
    seed: int,
    spec: SpectralClusterer,
    cl_int: SpectralClusterer,
    lab_int_tr: np.ndarray,
    lab_int_te: np.ndarray,
    memb_int_te: np.ndarray,
) -> dict[str, Any]:
    y, s = task.labels, task.scores
    thr = ev.youden_threshold(y[tr], s[tr])
    f_tr, f_te = task.failures(thr, tr), task.failures(thr, te)
    model = ReliabilityModel.fit(
        X[tr],
        f_tr,
        profiler=SpectralProfiler(),
        clusterer=_frozen(spec),
        labels=y[tr],
        scores=s[tr],
        threshold=thr,
    )
    res_cluster = model.score(X[te])
    res_comb = model.score(X[te], classifier_scores=s[te])
    held_cluster = np.array([r.cluster for r in res_cluster])
    p_cluster = np.array([r.failure_probability for r in res_cluster])
    p_comb = np.array([r.failure_probability for r in res_comb])
    glob = ClusterCalibrator(threshold=thr).fit(s[tr], y[tr], np.ones((tr.size, 1)))
    p_conf = glob.predict_failure(s[te], np.ones((te.size, 1)))

    rates_int = ClusterFailureRates(n_clusters=cl_int.n_clusters_).fit(lab_int_tr, f_tr)
    p_int = rates_int.predict_failure(memb_int_te)[0]

    # Random partitions with the spectral training clusters' sizes: train and test get labels
    # in the same proportions, so only the information content differs from the real clusters.
    rng = np.random.default_rng(seed)
    k = model.n_clusters
    props = model.rates.counts_ / model.rates.counts_.sum()
    p_rand = np.zeros(te.size)
    n_rand = 20
    for _ in range(n_rand):
        g_tr = rng.choice(k, size=tr.size, p=props)
        g_te = rng.choice(k, size=te.size, p=props)
        p_rand += ev.group_rate_predictor(g_tr, f_tr, g_te) / n_rand

    out: dict[str, Any] = {
        "failure": f_te,
        "threshold": np.full(te.size, thr),
        "cluster": p_cluster,
        "confidence": p_conf,
        "combined": p_comb,
        "intensity_cluster": p_int,
        "random_partition": p_rand,
        "held_cluster": held_cluster,
        "train_rate_of_cluster": model.rates.rate_[held_cluster],
        "train_raw_rate_of_cluster": (model.rates.failures_ / np.maximum(model.rates.counts_, 1))[
            held_cluster
        ],
        "flagged": model.rates.blind_spot_[held_cluster].astype(float),
        "intensity_held_cluster": lab_int_te,
    }
    for name, g in slices.items():
        out[f"slice_{name}"] = ev.group_rate_predictor(g[tr], f_tr, g[te])
    out["_k"] = k
    out["_k_int"] = cl_int.n_clusters_
    return out


def run_task(
    task: Task,
    X: np.ndarray,
    slices: dict[str, np.ndarray],
    folds: list[tuple[int, int, np.ndarray, np.ndarray]],
    fold_out: list[dict[str, Any]],
    full_spec: SpectralClusterer,
    full_int: SpectralClusterer,
    n_perm: int,
) -> dict[str, Any]:
    """Aggregate one task's held-out predictions, and its in-sample fit on all images."""
    n = task.labels.size
    thr_full = ev.youden_threshold(task.labels, task.scores)
    f_full = task.failures(thr_full)
    R = max(f[0] for f in folds) + 1
    arr: dict[str, np.ndarray] = {}
    ks, ks_int = [], []
    for (rep, _fold, _tr, te), o in zip(folds, fold_out, strict=True):
        ks.append(o.pop("_k"))
        ks_int.append(o.pop("_k_int"))
        for key, val in o.items():
            arr.setdefault(key, np.full((R, n), np.nan))[rep, te] = val
    fold_id = np.zeros((R, n), dtype=int)
    for rep, fold, _tr, te in folds:
        fold_id[rep, te] = fold
    fail = arr["failure"].astype(int)

    # ---- AUROC / AUPRC of each held-out predictor, per repeat
    metrics: dict[str, Any] = {}
    for name in PREDICTORS:
        aucs = [ev.auroc(fail[r], arr[name][r]) for r in range(R)]
        aps = [ev.auprc(fail[r], arr[name][r]) for r in range(R)]
        metrics[name] = {
            "auroc_mean": float(np.mean(aucs)),
            "auroc_sd": float(np.std(aucs, ddof=1)) if R > 1 else 0.0,
            "auprc_mean": float(np.mean(aps)),
            "auprc_sd": float(np.std(aps, ddof=1)) if R > 1 else 0.0,
            "auroc_per_repeat": aucs,
        }
    base_rate = float(fail.mean())

    # ---- paired comparisons on the same held-out images
    # The held-out failure of an image depends on its fold's threshold, so it can differ between
    # repeats; the tests use repeat 0 (one prediction per image, a clean paired design), and the
    # share of repeats in which the ordering holds is reported alongside.
    def paired(a: str, b: str) -> dict[str, Any]:
        wins = float(
            np.mean(np.array(metrics[a]["auroc_per_repeat"]) > np.array(metrics[b]["auroc_per_repeat"]))
        )
        dl = ev.delong_paired(fail[0], arr[a][0], arr[b][0])
        bs = ev.bootstrap_auc_difference(fail[0], arr[a][0], arr[b][0], n_boot=1000, seed=0)
        return {"share_of_repeats_a_better": wins, "delong_repeat0": dl, "bootstrap_repeat0": bs}

    comparisons = {
        "combined_vs_confidence": paired("combined", "confidence"),
        "cluster_vs_random_partition": paired("cluster", "random_partition"),
        "cluster_vs_intensity_cluster": paired("cluster", "intensity_cluster"),
    }
    for s_ in SLICES:
        comparisons[f"cluster_vs_slice_{s_}"] = paired("cluster", f"slice_{s_}")

    # ---- held-out concentration: partition = (fold, training-fold cluster), per repeat
    held: list[dict[str, Any]] = []
    held_int: list[dict[str, Any]] = []
    for r in range(R):
        g = fold_id[r] * 100 + arr["held_cluster"][r].astype(int)
        c = ev.concentration(g, fail[r], per_group=False)
        c["random_partition"] = ev.random_partition_null(g, fail[r], n_perm=n_perm, seed=r)
        held.append(c)
        gi = fold_id[r] * 100 + arr["intensity_held_cluster"][r].astype(int)
        ci = ev.concentration(gi, fail[r], per_group=False)
        ci["random_partition"] = ev.random_partition_null(gi, fail[r], n_perm=n_perm, seed=r)
        held_int.append(ci)

    def summarise(cs: list[dict[str, Any]]) -> dict[str, Any]:
        lifts = [c["max_significant_lift"] for c in cs]
        return {
            "chi2_p_median": float(np.median([c["chi2_p"] for c in cs])),
            "g_p_median": float(np.median([c["g_p"] for c in cs])),
            "cramers_v_mean": float(np.mean([c["cramers_v"] for c in cs])),
            "cramers_v_sd": float(np.std([c["cramers_v"] for c in cs], ddof=1)) if len(cs) > 1 else 0.0,
            "random_v_mean": float(np.mean([c["random_partition"]["null_v_mean"] for c in cs])),
            "empirical_p_median": float(np.median([c["random_partition"]["empirical_p"] for c in cs])),
            "n_groups_mean": float(np.mean([c["n_groups"] for c in cs])),
            "repeats_with_significant_lift": int(sum(x is not None for x in lifts)),
            "max_significant_lift_max": max((x for x in lifts if x is not None), default=None),
            "per_repeat": cs,
        }

    # ---- do the clusters flagged in training (interval above the global rate) fail more held-out?
    flagged = arr["flagged"].astype(bool)
    flag_rows = []
    for r in range(R):
        for val, lab in ((True, "flagged"), (False, "not flagged")):
            m = flagged[r] == val
            if m.sum():
                flag_rows.append((r, lab, int(m.sum()), int(fail[r][m].sum())))
    flag_pooled = {}
    for lab in ("flagged", "not flagged"):
        rows_ = [x for x in flag_rows if x[1] == lab]
        nn, ff = sum(x[2] for x in rows_), sum(x[3] for x in rows_)
        flag_pooled[lab] = {"n_image_repeats": nn, "failures": ff, "rate": ff / nn if nn else None}

    # ---- in-sample on the full fit (what models/default reports for task (a))
    full = ReliabilityModel.fit(
        X,
        f_full,
        profiler=SpectralProfiler(),
        clusterer=_frozen(full_spec),
        labels=task.labels,
        scores=task.scores,
        threshold=thr_full,
    )
    lab_full = full.clusterer.labels_
    insample = ev.concentration(lab_full, f_full)
    insample["random_partition"] = ev.random_partition_null(lab_full, f_full, n_perm=n_perm, seed=0)
    insample["core_rates"] = {
        k: full.rates.to_json()[k] for k in ("global_rate", "chi2_p", "g_test_p", "cramers_v")
    }
    insample["blind_spots"] = [int(c) for c in np.flatnonzero(full.rates.blind_spot_)]
    cl_int_full = full_int
    insample_int = ev.concentration(cl_int_full.labels_, f_full)
    insample_int["random_partition"] = ev.random_partition_null(cl_int_full.labels_, f_full, n_perm, seed=0)
    insample_slices = {}
    for name, g in slices.items():
        c = ev.concentration(g, f_full)
        c["random_partition"] = ev.random_partition_null(g, f_full, n_perm=n_perm, seed=0)
        insample_slices[name] = c

    # Calibration-style view of the held-out cluster rates: one point per (repeat, fold, cluster).
    cal_points = []
    for r in range(R):
        g = fold_id[r] * 100 + arr["held_cluster"][r].astype(int)
        for gid in np.unique(g):
            m = g == gid
            cal_points.append(
                {
                    "repeat": r,
                    "fold": int(gid // 100),
                    "cluster": int(gid % 100),
                    "train_rate": float(arr["train_raw_rate_of_cluster"][r][m][0]),
                    "n": int(m.sum()),
                    "failures": int(fail[r][m].sum()),
                }
            )

    return {
        "task": task.key,
        "title": task.title,
        "n": n,
        "n_positive": int(task.labels.sum()),
        "threshold_full": thr_full,
        "threshold_train_folds": {
            "mean": float(np.nanmean(arr["threshold"])),
            "min": float(np.nanmin(arr["threshold"])),
            "max": float(np.nanmax(arr["threshold"])),
        },
        "failure_rate_full": float(f_full.mean()),
        "failure_rate_held_out": base_rate,
        "k_spectral_train_folds": {"min": int(min(ks)), "max": int(max(ks)), "values": ks},
        "k_intensity_train_folds": {"min": int(min(ks_int)), "max": int(max(ks_int)), "values": ks_int},
        "metrics": metrics,
        "comparisons": comparisons,
        "held_out_concentration": {"spectral": summarise(held), "intensity": summarise(held_int)},
        "flagged_clusters_held_out": flag_pooled,
        "in_sample": {
            "spectral": insample,
            "k": full.n_clusters,
            "intensity": insample_int,
            "k_intensity": cl_int_full.n_clusters_,
            "slices": insample_slices,
        },
        "calibration_points": cal_points,
        "_full_labels": lab_full,
        "_int_labels": cl_int_full.labels_,
    }


# --------------------------------------------------------------------------- report


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _fmt_lift(x: float | None) -> str:
    return "none" if x is None else f"{x:.2f}"


def write_markdown(out: dict[str, Any], path: Path) -> None:
    L: list[str] = []
    a = L.append
    a("# E1 — natural failures of a real classifier (NIH ChestX-ray14 + CheXNet)\n")
    a(
        f"Generated by `{out['command']}` in {out['seconds']:.0f} s; load average at start "
        f"{out['loadavg_start']}, at end {out['loadavg_end']}. {out['n_images']} images, "
        f"{out['n_repeats']} x 5-fold stratified CV (stratified by failure), {out['n_perm']} random "
        "partitions per null distribution. Youden threshold fitted on the training folds only.\n"
    )
    a("Predictors of a held-out failure (all fitted on training folds only):\n")
    a("- **cluster** — the spectral cluster's failure rate (label-free: no classifier score needed);")
    a("- **confidence** — P(fail | classifier score), one global calibration;")
    a("- **combined** — cluster-calibrated confidence (`ReliabilityModel.score(..., classifier_scores=)`);")
    a(
        "- **intensity_cluster** — the same clusterer on 10 intensity statistics (mean, std, percentiles, "
        "entropy);"
    )
    a("- **random_partition** — random groups with the spectral clusters' sizes (20 per fold, averaged);")
    a("- **slice_*** — the training failure rate of the image's metadata slice.\n")

    a("## Held-out AUROC / AUPRC of the predicted failure probability (mean ± sd over repeats)\n")
    head = "| predictor | " + " | ".join(t["title"] for t in out["tasks"]) + " |"
    a(head)
    a("|---|" + "---|" * len(out["tasks"]))
    for name in PREDICTORS:
        cells = []
        for t in out["tasks"]:
            m = t["metrics"][name]
            cells.append(f"{m['auroc_mean']:.3f} ± {m['auroc_sd']:.3f} / {m['auprc_mean']:.3f}")
        a(f"| {name} | " + " | ".join(cells) + " |")
    a(
        "| (failure base rate = AUPRC of a useless predictor) | "
        + " | ".join(f"{t['failure_rate_held_out']:.3f}" for t in out["tasks"])
        + " |\n"
    )
    a("Cells: AUROC mean ± sd / AUPRC mean.\n")

    a("## Paired comparisons (same held-out images)\n")
    a(
        "`share` = fraction of repeats where the first AUROC is higher; DeLong and a 1000-sample "
        "stratified bootstrap of the AUROC difference on repeat 0.\n"
    )
    a("| task | comparison | share | ΔAUROC (DeLong 95% CI, p) | bootstrap 95% CI |")
    a("|---|---|---|---|---|")
    for t in out["tasks"]:
        for cname, c in t["comparisons"].items():
            d, b = c["delong_repeat0"], c["bootstrap_repeat0"]
            a(
                f"| {t['task']} | {cname} | {c['share_of_repeats_a_better']:.2f} | "
                f"{d['diff']:+.3f} ({d['ci_low']:+.3f}, {d['ci_high']:+.3f}; p={_fmt_p(d['p'])}) | "
                f"({b['ci_low']:+.3f}, {b['ci_high']:+.3f}) |"
            )
    a("")

    a("## Failure concentration over clusters\n")
    a(
        "In-sample: one fit on all 621 images (what `models/default` reports for task (a)). Held-out: each "
        "repeat's partition of the 621 images into (fold, training-fold cluster) groups, failures judged "
        "with the training-fold threshold; medians / means over repeats. `emp. p` = share of random "
        "partitions of the same group sizes with a Cramér's V at least as large.\n"
    )
    a(
        "| task | partition | groups | χ² p | G p | Cramér's V | random-partition V | emp. p | "
        "max significant lift (BH) |"
    )
    a("|---|---|---|---|---|---|---|---|---|")
    for t in out["tasks"]:
        ins = t["in_sample"]
        for lab, c, k in (
            ("spectral, in-sample", ins["spectral"], ins["k"]),
            ("intensity, in-sample", ins["intensity"], ins["k_intensity"]),
        ):
            a(
                f"| {t['task']} | {lab} | {k} | {_fmt_p(c['chi2_p'])} | {_fmt_p(c['g_p'])} | "
                f"{c['cramers_v']:.3f} | {c['random_partition']['null_v_mean']:.3f} | "
                f"{_fmt_p(c['random_partition']['empirical_p'])} | {_fmt_lift(c['max_significant_lift'])} |"
            )
        for lab, c in (
            ("spectral, held-out", t["held_out_concentration"]["spectral"]),
            ("intensity, held-out", t["held_out_concentration"]["intensity"]),
        ):
            a(
                f"| {t['task']} | {lab} | {c['n_groups_mean']:.1f} | {_fmt_p(c['chi2_p_median'])} | "
                f"{_fmt_p(c['g_p_median'])} | {c['cramers_v_mean']:.3f} ± {c['cramers_v_sd']:.3f} | "
                f"{c['random_v_mean']:.3f} | {_fmt_p(c['empirical_p_median'])} | "
                f"{c['repeats_with_significant_lift']}/{out['n_repeats']} repeats"
                + (f", up to {c['max_significant_lift_max']:.2f}" if c["max_significant_lift_max"] else "")
                + " |"
            )
        for name, c in ins["slices"].items():
            a(
                f"| {t['task']} | slice: {name} | {c['n_groups']} | {_fmt_p(c['chi2_p'])} | {_fmt_p(c['g_p'])} | "
                f"{c['cramers_v']:.3f} | {c['random_partition']['null_v_mean']:.3f} | "
                f"{_fmt_p(c['random_partition']['empirical_p'])} | {_fmt_lift(c['max_significant_lift'])} |"
            )
    a("")

    a("## In-sample per-cluster failure rates (full fit; Jeffreys 95% intervals, Fisher vs rest, BH q)\n")
    for t in out["tasks"]:
        ins = t["in_sample"]["spectral"]
        a(
            f"**{t['title']}** — threshold {t['threshold_full']:.4g}, global failure rate "
            f"{ins['global_rate']:.3f}, core blind spots: {ins['blind_spots'] or 'none'}\n"
        )
        a("| cluster | n | failures | rate [95% CI] | lift | Fisher p | q |")
        a("|---|---|---|---|---|---|---|")
        for g in ins["groups"]:
            a(
                f"| {g['group']} | {g['n']} | {g['failures']} | {g['rate']:.3f} [{g['lower']:.3f}, {g['upper']:.3f}] "
                f"| {g['lift']:.2f} | {_fmt_p(g['fisher_p'])} | {_fmt_p(g['q'])} |"
            )
        a("")

    a("## Do clusters flagged in training (Beta interval above the global rate) fail more held-out?\n")
    a("Pooled over repeats and folds (image-repeats).\n")
    a("| task | flagged: n, rate | not flagged: n, rate |")
    a("|---|---|---|")
    for t in out["tasks"]:
        fp = t["flagged_clusters_held_out"]

        def cell(d: dict[str, Any]) -> str:
            return "0, –" if not d["n_image_repeats"] else f"{d['n_image_repeats']}, {d['rate']:.3f}"

        a(f"| {t['task']} | {cell(fp['flagged'])} | {cell(fp['not flagged'])} |")
    a("")

    a("## How much of the scanner proxy and the view do the clusters recover (AMI, full fit)\n")
    a("The clusters are fitted on the images alone, so they are the same for the three tasks.\n")
    a("| partition | k | AMI with pixel spacing | AMI with view | AMI with sex | AMI with age band |")
    a("|---|---|---|---|---|---|")
    for key in ("spectral", "intensity"):
        m = out["tasks"][0]["ami"][key]
        a(
            f"| {key} clusters | {m['k']} | {m['pixel_spacing']:.3f} | {m['view']:.3f} | "
            f"{m['sex']:.3f} | {m['age_band']:.3f} |"
        )
    a("")
    a(
        "Cluster counts chosen by BIC on the training folds: "
        + "; ".join(
            f"{t['task']}: spectral {t['k_spectral_train_folds']['min']}–{t['k_spectral_train_folds']['max']}, "
            f"intensity {t['k_intensity_train_folds']['min']}–{t['k_intensity_train_folds']['max']}"
            for t in out["tasks"]
        )
        + ".\n"
    )
    a(
        "Training-fold thresholds: "
        + "; ".join(
            f"{t['task']}: full-data {t['threshold_full']:.4g}, folds {t['threshold_train_folds']['min']:.4g}–"
            f"{t['threshold_train_folds']['max']:.4g}"
            for t in out["tasks"]
        )
        + ".\n"
    )
    a(
        "Figures: `e1_cluster_rates.png` (in-sample per-cluster rates; held-out rate against the "
        "training-fold rate of the same cluster), `e1_auroc.png` (held-out AUROC by predictor).\n"
    )
    if out.get("findings"):
        a("## What this shows\n")
        for line in out["findings"]:
            a(f"- {line}")
        a("")
    path.write_text("\n".join(L))


def make_figures(out: dict[str, Any], results: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    tasks = out["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.6 * len(tasks)), constrained_layout=True)
    for row, t in enumerate(tasks):
        ax = axes[row, 0]
        groups = t["in_sample"]["spectral"]["groups"]
        x = np.arange(len(groups))
        rate = np.array([g["rate"] for g in groups])
        lo = np.array([g["lower"] for g in groups])
        hi = np.array([g["upper"] for g in groups])
        ax.bar(x, rate, color="#4c72b0", alpha=0.8)
        ax.errorbar(x, rate, yerr=[rate - lo, hi - rate], fmt="none", ecolor="k", capsize=4)
        ax.axhline(t["in_sample"]["spectral"]["global_rate"], color="r", ls="--", label="global rate")
        ax.set_xticks(x, [f"c{g['group']}\nn={g['n']}" for g in groups])
        ax.set_ylabel("failure rate")
        ins = t["in_sample"]["spectral"]
        ax.set_title(
            f"{t['title']}\nin-sample clusters: χ² p={_fmt_p(ins['chi2_p'])}, V={ins['cramers_v']:.3f}",
            fontsize=10,
        )
        ax.legend(fontsize=8)
        ax.set_ylim(0, min(1.0, float(hi.max()) * 1.25))

        ax = axes[row, 1]
        pts = t["calibration_points"]
        tr = np.array([p["train_rate"] for p in pts])
        n = np.array([p["n"] for p in pts])
        f = np.array([p["failures"] for p in pts])
        r_ = f / n
        lo = stats.beta.ppf(0.025, f + 0.5, n - f + 0.5)
        hi = stats.beta.ppf(0.975, f + 0.5, n - f + 0.5)
        jitter = np.random.default_rng(0).uniform(-0.004, 0.004, size=tr.size)
        ax.errorbar(tr + jitter, r_, yerr=[r_ - lo, hi - r_], fmt="o", ms=3, alpha=0.45, elinewidth=0.7)
        lim = [0, max(0.05, float(max(tr.max(), hi.max())) * 1.05)]
        ax.plot(lim, lim, "k:", lw=1, label="held-out = training")
        ax.axhline(t["failure_rate_held_out"], color="r", ls="--", lw=1, label="held-out global rate")
        ax.set_xlim(lim)
        ax.set_ylim(lim)
        ax.set_xlabel("cluster failure rate on the training folds")
        ax.set_ylabel("held-out failure rate (95% CI)")
        ho = t["held_out_concentration"]["spectral"]
        ax.set_title(
            f"held-out, one point per (repeat, fold, cluster)\nmedian χ² p={_fmt_p(ho['chi2_p_median'])}, "
            f"mean V={ho['cramers_v_mean']:.3f} (random {ho['random_v_mean']:.3f})",
            fontsize=10,
        )
        ax.legend(fontsize=8, loc="upper left")
    p1 = results / "e1_cluster_rates.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(12, 4.5), constrained_layout=True)
    names = list(PREDICTORS)
    width = 0.8 / len(tasks)
    x = np.arange(len(names))
    for i, t in enumerate(tasks):
        m = [t["metrics"][nm]["auroc_mean"] for nm in names]
        sd = [t["metrics"][nm]["auroc_sd"] for nm in names]
        ax.bar(x + (i - (len(tasks) - 1) / 2) * width, m, width, yerr=sd, capsize=2, label=t["title"])
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_xticks(x, [nm.replace("_", "\n") for nm in names], fontsize=9)
    ax.set_ylabel("held-out AUROC for the classifier's failures")
    ax.set_ylim(0.3, 1.0)
    ax.set_title(
        f"E1: predicting CheXNet's failures on held-out NIH images (mean ± sd, {out['n_repeats']}x5-fold)"
    )
    ax.legend(fontsize=8, loc="upper right")
    p2 = results / "e1_auroc.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def _findings(out: dict[str, Any]) -> list[str]:
    """Plain statements derived from the numbers (no hand-written figures)."""
    lines = []
    for t in out["tasks"]:
        m = t["metrics"]
        ins = t["in_sample"]["spectral"]
        ho = t["held_out_concentration"]["spectral"]
        cmp_ = t["comparisons"]["combined_vs_confidence"]
        lines.append(
            f"{t['task']}: in-sample spectral clusters χ² p={_fmt_p(ins['chi2_p'])}, V={ins['cramers_v']:.3f} "
            f"(random-partition emp. p={_fmt_p(ins['random_partition']['empirical_p'])}); held-out median "
            f"χ² p={_fmt_p(ho['chi2_p_median'])}, V={ho['cramers_v_mean']:.3f} vs {ho['random_v_mean']:.3f} for "
            f"random partitions. Label-free cluster AUROC {m['cluster']['auroc_mean']:.3f} ± "
            f"{m['cluster']['auroc_sd']:.3f} (random partition {m['random_partition']['auroc_mean']:.3f}, "
            f"intensity clusters {m['intensity_cluster']['auroc_mean']:.3f}). Confidence alone "
            f"{m['confidence']['auroc_mean']:.3f}, combined {m['combined']['auroc_mean']:.3f} "
            f"(combined better in {cmp_['share_of_repeats_a_better']:.0%} of repeats; DeLong ΔAUROC "
            f"{cmp_['delong_repeat0']['diff']:+.3f}, p={_fmt_p(cmp_['delong_repeat0']['p'])})."
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--perm", type=int, default=200, help="random partitions per null distribution")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--from-json", action="store_true", help="only redraw the tables and figures from the JSON"
    )
    args = ap.parse_args(argv)
    if args.from_json:
        out = json.loads((Path(args.out) / "e1_natural_failures.json").read_text())
        write_markdown(out, Path(args.out) / "e1_natural_failures.md")
        make_figures(out, Path(args.out))
        return 0
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    data = Path(args.data)
    results = Path(args.out)
    results.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader((data / "labels.csv").open()))
    paths = [data / "images" / r["image"] for r in rows]
    batch = profile_files(paths, SpectralProfiler(), jobs=args.jobs, cache_dir=CACHE)
    if batch.errors:
        raise SystemExit(f"{len(batch.errors)} images failed to profile: {batch.errors[:3]}")
    X = batch.profiles
    Xint = intensity_matrix(paths, args.jobs)
    slices = {
        "view": np.array([r["view"] for r in rows], dtype=object),
        "sex": np.array([r["sex"] for r in rows], dtype=object),
        "age_band": ev.age_bands([float(r["age"]) for r in rows]),
        "pixel_spacing": ev.spacing_groups([float(r["pixel_spacing_mm"]) for r in rows]),
    }
    tasks = load_tasks(rows)
    # One set of folds for the three tasks, stratified by the joint pattern of their failures
    # (under the full-data thresholds; used only to balance the folds), so that the clusters of
    # a training fold are fitted once and shared by the tasks.
    strata = np.zeros(len(rows), dtype=int)
    for i, t in enumerate(tasks):
        strata += (2**i) * t.failures(ev.youden_threshold(t.labels, t.scores))
    folds = ev.repeated_stratified_folds(strata, n_splits=5, n_repeats=args.repeats, seed=0)
    print(f"[e1] {len(folds)} folds x {len(tasks)} tasks ...", file=sys.stderr, flush=True)
    per_fold = Parallel(n_jobs=args.jobs)(
        delayed(_fit_predict_fold)(tasks, X, Xint, slices, tr, te, 1000 * rep + fold)
        for rep, fold, tr, te in folds
    )
    full_spec = SpectralClusterer(random_state=0).fit(X)
    full_int = SpectralClusterer(random_state=0).fit(Xint)
    tasks_out = []
    for i, task in enumerate(tasks):
        print(f"[e1] task {task.key} ...", file=sys.stderr, flush=True)
        res = run_task(task, X, slices, folds, [fo[i] for fo in per_fold], full_spec, full_int, args.perm)
        lab_full, lab_int = res.pop("_full_labels"), res.pop("_int_labels")
        res["ami"] = {
            key: {"k": int(len(np.unique(lab))), **{s: ev.ami(lab, slices[s]) for s in SLICES}}
            for key, lab in (("spectral", lab_full), ("intensity", lab_int))
        }
        tasks_out.append(res)
    out = {
        "experiment": "E1 natural failures",
        "command": "python benchmarks/e1_natural_failures.py " + " ".join(argv or sys.argv[1:]),
        "n_images": len(rows),
        "n_repeats": args.repeats,
        "n_perm": args.perm,
        "profile_cache_hits": batch.cache_hits,
        "loadavg_start": load_start,
        "tasks": tasks_out,
    }
    out["findings"] = _findings(out)
    out["seconds"] = time.perf_counter() - t0
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    (results / "e1_natural_failures.json").write_text(json.dumps(out, indent=1, default=_json_default))
    write_markdown(out, results / "e1_natural_failures.md")
    for p in make_figures(out, results):
        print(f"[e1] wrote {p}", file=sys.stderr)
    print(json.dumps({"seconds": round(out["seconds"], 1), "findings": out["findings"]}, indent=1))
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


if __name__ == "__main__":
    sys.exit(main())
