"""Scaling out (issue 10): every local core, a Dask cluster, fits of 1e4-1e6 profiles.

1. ``cli``: ``cxr-monitor score`` on 300 NIH images, the whole process including start-up, with
   ``--jobs auto`` (the CPUs this process may use) and ``--jobs 1``, against one process that only
   decodes the same files and runs one bare FFT of each (pyFFTW, cached FFTW_MEASURE plan of
   the native image, as in bench_profile.py). Target: auto / floor <= 0.65. Each repeat runs
   the three commands in turn (interleaved), so load from other users hits all alike.
2. ``throughput``: profiles/s for 1 and 2 local processes (:func:`monitor.parallel.profile_stream`)
   and a 2-worker Dask LocalCluster (:class:`monitor.distributed.DaskRunner`), pool / cluster
   start-up reported apart from the steady-state rate.
3. ``fit``: fit time and peak RSS of :meth:`ReliabilityModel.fit` at 1e4, 1e5, 1e6 profiles, each
   in a fresh process. The profiles are SYNTHETIC: a smoothed bootstrap of the 621 NIH reference
   profiles of models/default (resampled rows plus Gaussian noise of 0.2 of each cluster's
   per-feature spread), so they follow the fitted distribution. The quality cost of the sampled
   fit is measured at 1e5: adjusted Rand index between the clusters of a full fit and of a fit on
   a 2e4 sample, and the mean log-likelihood each gives all 1e5 profiles.

    .venv/bin/python benchmarks/bench_scale.py [--parts cli,throughput,fit] [--repeats 3]

Writes benchmarks/results/scale.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent

FLOOR = """
import sys, time
t0 = time.perf_counter()
from pathlib import Path
import numpy as np, pyfftw
from monitor.imaging import iter_image_files, load_image
plans = {}
for path in iter_image_files(sys.argv[1]):
    pix = load_image(path).pixels
    plan = plans.get(pix.shape)
    if plan is None:
        src = pyfftw.empty_aligned(pix.shape, dtype=np.float32)
        dst = pyfftw.empty_aligned((pix.shape[0], pix.shape[1] // 2 + 1), dtype=np.complex64)
        plan = plans[pix.shape] = pyfftw.FFTW(src, dst, axes=(0, 1), flags=("FFTW_MEASURE",))
    plan.input_array[...] = pix
    plan()
"""

__all__ = ["main"]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of a command and the descendants it waited for.

    A forkserver's workers are reaped by the forkserver, which the command need not wait for:
    for ``--jobs`` > 1 the CPU figure misses them.
    """
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def bench_cli(n_images: int, repeats: int) -> dict[str, Any]:
    from monitor.settings import available_cpus

    names = sorted(p.name for p in (DATA / "nih" / "images").iterdir())[:n_images]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for name in names:
            (folder / name).symlink_to(DATA / "nih" / "images" / name)
        score = [str(BIN / "cxr-monitor"), "score", "--model", str(ROOT / "models" / "default"), str(folder)]
        cmds = {
            "floor_decode_fft": [sys.executable, "-c", FLOOR, str(folder)],
            "score_jobs_auto": [*score, "--json"],
            "score_jobs_1": [*score, "--json", "--jobs", "1"],
        }
        _timed(cmds["floor_decode_fft"])  # warm the page cache and FFTW's first plan alike for all
        runs: list[dict[str, Any]] = []
        for _ in range(repeats):
            row: dict[str, Any] = {"loadavg_before": loadavg()}
            for key, cmd in cmds.items():
                row[key], row[f"{key}_cpu"] = _timed(cmd)
            runs.append(row)
    ratio_auto = [r["score_jobs_auto"] / r["floor_decode_fft"] for r in runs]
    ratio_one = [r["score_jobs_1"] / r["floor_decode_fft"] for r in runs]
    return {
        "n_images": n_images,
        "available_cpus": available_cpus(),
        "runs": runs,
        "median_seconds": {k: float(np.median([r[k] for r in runs])) for k in cmds},
        "median_cpu_seconds": {
            k: float(np.median([r[f"{k}_cpu"] for r in runs])) for k in ("floor_decode_fft", "score_jobs_1")
        },
        "autogroup": _autogroup(),
        "ratio_auto_to_floor": {"median": float(np.median(ratio_auto)), "all": ratio_auto},
        "ratio_one_to_floor": {"median": float(np.median(ratio_one)), "all": ratio_one},
        "target": 0.65,
    }


def _autogroup() -> dict[str, Any]:
    """Whether the kernel shares CPU between sessions (autogroups) rather than between processes."""
    try:
        enabled = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return {"enabled": None}
    return {"enabled": enabled}


def bench_throughput(n_images: int, repeats: int) -> dict[str, Any]:
    import logging

    from distributed import Client, LocalCluster

    from monitor.distributed import DaskRunner
    from monitor.parallel import profile_stream
    from monitor.spectrum import SpectralProfiler

    spec = SpectralProfiler().spec()
    files = [str(p) for p in sorted((DATA / "nih" / "images").iterdir())[:n_images]]
    out: dict[str, list[dict[str, float]]] = {"local_1": [], "local_2": [], "dask_2_workers": []}
    for _ in range(repeats):
        for jobs in (1, 2):
            t0 = time.perf_counter()
            stream = profile_stream(files, spec, jobs=jobs)
            next(stream)
            t1 = time.perf_counter()
            n = 1 + sum(1 for _ in stream)
            t2 = time.perf_counter()
            out[f"local_{jobs}"].append(
                {"startup_s": t1 - t0, "profiles_per_s": (n - 1) / (t2 - t1), "loadavg": loadavg()[0]}
            )
        t0 = time.perf_counter()
        cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
        )
        runner = DaskRunner(Client(cluster), cluster)
        stream = runner.profile_stream(files, spec)
        next(stream)
        t1 = time.perf_counter()
        n = 1 + sum(1 for _ in stream)
        t2 = time.perf_counter()
        runner.close()
        out["dask_2_workers"].append(
            {"startup_s": t1 - t0, "profiles_per_s": (n - 1) / (t2 - t1), "loadavg": loadavg()[0]}
        )
    return {
        "n_images": n_images,
        "runs": out,
        "median": {
            k: {m: float(np.median([r[m] for r in v])) for m in ("startup_s", "profiles_per_s")}
            for k, v in out.items()
        },
    }


FIT_CHILD = """
import json, resource, sys, time
import numpy as np
from threadpoolctl import threadpool_limits
threadpool_limits(1)
from monitor.artifact import load_model
from monitor.clustering import SpectralClusterer
from monitor.model import ReliabilityModel
n, cap, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ref = load_model(sys.argv[4])
X0, rng = ref.fit_profiles, np.random.default_rng(seed)
hard = np.array([r["cluster"] for r in ref.fit_records])
spread = np.vstack([X0[hard == c].std(axis=0) for c in hard])
rows = rng.integers(0, X0.shape[0], n)
X = X0[rows] + 0.2 * spread[rows] * rng.standard_normal((n, X0.shape[1]))
del spread
fail = np.array([r["failure"] for r in ref.fit_records])[rows]
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
m = ReliabilityModel.fit(X, fail, profiler=ref.profiler, clusterer=SpectralClusterer(random_state=0),
                         max_fit_profiles=cap or None)
sec = time.perf_counter() - t0
out = {"n": n, "cap": cap, "seconds": sec, "k": m.n_clusters,
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
       "rss_before_fit_mb": rss0 / 1024, "data_mb": X.nbytes / 2**20}
if len(sys.argv) > 5:
    labels = np.concatenate([m.clusterer.predict(X[i:i + 65536]) for i in range(0, n, 65536)])
    ll = float(np.mean(np.concatenate([m.clusterer.score_samples(X[i:i + 65536]) for i in range(0, n, 65536)])))
    np.save(sys.argv[5], labels)
    out["mean_log_likelihood"] = ll
print(json.dumps(out))
"""


def _fit_child(n: int, cap: int, labels_out: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-c", FIT_CHILD, str(n), str(cap), "0", str(ROOT / "models" / "default")]
    if labels_out:
        cmd.append(labels_out)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_seconds"] = time.perf_counter() - t0
    res["loadavg"] = loadavg()
    return res


def bench_fit(sizes: list[int], cap: int, quality_n: int, quality_cap: int) -> dict[str, Any]:
    from sklearn.metrics import adjusted_rand_score

    with tempfile.TemporaryDirectory() as tmp:
        # The row at quality_n (a full fit when quality_n <= cap) doubles as the quality reference.
        rows = [_fit_child(n, cap, f"{tmp}/full.npy" if n == quality_n else None) for n in sizes]
        full = next(r for r in rows if r["n"] == quality_n)
        sampled = _fit_child(quality_n, quality_cap, f"{tmp}/sampled.npy")
        ari = float(adjusted_rand_score(np.load(f"{tmp}/full.npy"), np.load(f"{tmp}/sampled.npy")))
    return {
        "cap": cap,
        "rows": rows,
        "quality": {
            "n": quality_n,
            "cap": quality_cap,
            "full": full,
            "sampled": sampled,
            "adjusted_rand_index": ari,
        },
    }


def write_md(res: dict[str, Any]) -> str:
    lines = ["# Scaling out: every core, Dask, large fits (benchmarks/bench_scale.py)\n"]
    lines.append(
        f"Machine: {res['machine']}; shared with other engineers while measured (load averages "
        "recorded per run). Ratios are per interleaved repeat, medians reported.\n"
    )
    if "cli" in res:
        c = res["cli"]
        m = c["median_seconds"]
        lines += [
            f"## `cxr-monitor score` on {c['n_images']} NIH images, whole process (target <= 0.65)\n",
            f"`--jobs auto` = {c['available_cpus']} processes here.\n",
            "| command | median s |",
            "|---|---|",
            *[f"| {k} | {v:.2f} |" for k, v in m.items()],
            "",
            f"- ratio score (--jobs auto) / floor: median **{c['ratio_auto_to_floor']['median']:.2f}** "
            f"(runs: {', '.join(f'{x:.2f}' for x in c['ratio_auto_to_floor']['all'])})",
            f"- ratio score (--jobs 1) / floor: median {c['ratio_one_to_floor']['median']:.2f} "
            f"(runs: {', '.join(f'{x:.2f}' for x in c['ratio_one_to_floor']['all'])})",
            f"- load averages before each repeat: {[r['loadavg_before'] for r in c['runs']]}",
        ]
        if "median_cpu_seconds" in c:
            cpu = c["median_cpu_seconds"]
            lines += [
                f"- CPU seconds (user + system): floor {cpu['floor_decode_fft']:.1f}, score --jobs 1 "
                f"{cpu['score_jobs_1']:.1f} (work ratio {cpu['score_jobs_1'] / cpu['floor_decode_fft']:.2f}); "
                f"kernel autogroup scheduling: {c['autogroup']['enabled']}\n",
            ]
        else:
            lines.append("")
    if "throughput" in res:
        t = res["throughput"]
        lines += [
            f"## Profiles per second, {t['n_images']} NIH images (1024 x 1024 WebP)\n",
            "| runner | start-up s (to first result) | steady profiles/s |",
            "|---|---|---|",
            *[f"| {k} | {v['startup_s']:.2f} | {v['profiles_per_s']:.1f} |" for k, v in t["median"].items()],
            "",
        ]
    if "fit" in res:
        f = res["fit"]
        q = f["quality"]
        lines += [
            f"## Fit of N synthetic profiles (smoothed bootstrap of the NIH reference), cap {f['cap']}\n",
            "| N | clustered | k | fit s | process s | peak RSS MB | profiles MB |",
            "|---|---|---|---|---|---|---|",
            *[
                f"| {r['n']:.0e} | {min(r['n'], r['cap']) if r['cap'] else r['n']} | {r['k']} | "
                f"{r['seconds']:.1f} | {r['process_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['data_mb']:.0f} |"
                for r in f["rows"]
            ],
            "",
            f"Quality cost of the sample at N = {q['n']:.0e}: full fit k = {q['full']['k']} in "
            f"{q['full']['seconds']:.1f} s (peak {q['full']['peak_rss_mb']:.0f} MB), fit on a sample of {q['cap']}: k = "
            f"{q['sampled']['k']} in {q['sampled']['seconds']:.1f} s; adjusted Rand index of their "
            f"clusterings {q['adjusted_rand_index']:.3f}; mean log-likelihood of all profiles "
            f"{q['full']['mean_log_likelihood']:.3f} (full) vs {q['sampled']['mean_log_likelihood']:.3f} (sampled).\n",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="cli,throughput,fit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--throughput-images", type=int, default=120)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--cap", type=int, default=100_000)
    ap.add_argument("--quality-n", type=int, default=100_000)
    ap.add_argument("--quality-cap", type=int, default=20_000)
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    path = RESULTS / "scale.json"
    res: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    res["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    if "cli" in parts:
        res["cli"] = bench_cli(args.images, args.repeats)
    if "throughput" in parts:
        res["throughput"] = bench_throughput(args.throughput_images, args.repeats)
    if "fit" in parts:
        sizes = [int(s) for s in args.sizes.split(",")]
        res["fit"] = bench_fit(sizes, args.cap, args.quality_n, args.quality_cap)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    (RESULTS / "scale.md").write_text(write_md(res))
    print((RESULTS / "scale.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
