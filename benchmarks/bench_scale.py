"""Scaling out (issue 10): every local core, a Dask cluster, fits of 1e4-1e6 profiles.

1. ``cli``: ``cxr-monitor score`` on 300 NIH images, the whole process including start-up, with
   ``--jobs auto`` (the CPUs this process may use) and ``--jobs 1``, against one process that only
   decodes the same files and runs one bare FFT of each (pyFFTW, cached FFTW_MEASURE plan of
   the native image, as in bench_profile.py). Target: auto / floor <= 0.65. Each repeat runs
   the three commands in turn (interleaved), so load from other users hits all alike.
2. ``throughput``: profiles/s for 1 and 2 local processes (:func:`monitor.parallel.profile_stream`)
   and a 2-worker Dask LocalCluster (:class:`monitor.distributed.DaskRunner`), pool / cluster
   start-up reported apart from the steady-state rate.
3. ``lookup``: time of one profile-cache lookup (8 digests, a worker's batch) against stores of
   N rows, in the layout before this change (one flat folder of 8-row files, every part file
   filtered) and after (hive partitions by digest prefix, 8192-row writes, compaction).
4. ``fit``: time and peak RSS of :meth:`ReliabilityModel.fit_streamed` at 1e4, 1e5, 1e6 profiles,
   each in a fresh process reading a Parquet fit set written by another process; at 1e6 also with
   the partitions assigned on a 2-worker LocalCluster. The profiles are SYNTHETIC: a smoothed
   bootstrap of the 621 NIH reference profiles of models/default (resampled rows plus Gaussian
   noise of 0.2 of each cluster's per-feature spread), so they follow the fitted distribution.
   The clusters are fitted on a seeded sample of ``--cap`` (20 000) rows above it, so every
   run is bounded. The quality cost of sampling is measured at ``--quality-n`` (3e4; a full fit
   of 1e5 took 1019 s here): adjusted Rand index between the clusters of a full fit and of a fit
   on a sample of ``--quality-cap`` (1e4), and the mean log-likelihood each gives all profiles.

    .venv/bin/python benchmarks/bench_scale.py [--parts cli,throughput,lookup,fit] [--repeats 3]

Writes benchmarks/results/scale.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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
        runner = DaskRunner.connect("local", n_workers=2)
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


GENERATE = """
import sys
import numpy as np
from monitor.artifact import load_model
from monitor.profilestore import ParquetFitSet
n, seed, model, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
ref = load_model(model)
X0, rng = ref.fit_profiles, np.random.default_rng(seed)
hard = np.array([r["cluster"] for r in ref.fit_records])
fail0 = np.array([r["failure"] for r in ref.fit_records])
spread = np.vstack([X0[hard == c].std(axis=0) for c in range(hard.max() + 1)])
writer = ParquetFitSet.writer(root, X0.shape[1])
for start in range(0, n, 65536):  # chunk by chunk: the generator's memory stays flat too
    m = min(65536, n - start)
    rows = rng.integers(0, X0.shape[0], m)
    X = X0[rows] + 0.2 * spread[hard[rows]] * rng.standard_normal((m, X0.shape[1]))
    for i in range(m):
        writer.append(X[i], int(fail0[rows[i]]), {"image": f"synthetic_{start + i:07d}.png"})
writer.close()
"""

FIT_CHILD = """
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_limits
threadpool_limits(1)
from monitor.artifact import load_model
from monitor.clustering import SpectralClusterer
from monitor.model import ReliabilityModel
from monitor.profilestore import ParquetFitSet
def peak_mb():  # VmHWM: this process's own peak (ru_maxrss keeps the forking parent's across exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
cap, model, root, scheduler = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
labels_out = sys.argv[5] if len(sys.argv) > 5 else None
profiler = load_model(model).profiler
runner = None
if scheduler != "none":
    from monitor.distributed import DaskRunner
    runner = DaskRunner.connect(scheduler, n_workers=2)
fit_set = ParquetFitSet(root)
rss0 = peak_mb()
t0 = time.perf_counter()
m = ReliabilityModel.fit_streamed(fit_set, profiler=profiler, clusterer=SpectralClusterer(random_state=0),
                                  max_fit_profiles=cap or None, map_partitions=runner.map if runner else None)
sec = time.perf_counter() - t0
out = {"n": fit_set.n_rows, "cap": cap, "scheduler": scheduler, "seconds": sec, "k": m.n_clusters,
       "peak_rss_mb": peak_mb(), "rss_before_fit_mb": rss0, "profiles_mb": fit_set.n_rows * len(profiler.feature_names) * 8 / 2**20,
       "rows_read_by_client": fit_set.rows_read}
if runner is not None:
    runner.close()
if labels_out:  # quality: every profile's cluster and mean log-likelihood, partition by partition
    labels, ll = [], 0.0
    for key in fit_set.partitions():
        X = fit_set.read(key).profiles
        labels.append(m.clusterer.predict(X))
        ll += float(np.sum(m.clusterer.score_samples(X)))
    np.save(labels_out, np.concatenate(labels))
    out["mean_log_likelihood"] = ll / fit_set.n_rows
print(json.dumps(out))
"""


def _generate(n: int, root: str) -> None:
    subprocess.run(
        [sys.executable, "-c", GENERATE, str(n), "0", str(ROOT / "models" / "default"), root],
        check=True,
        cwd=ROOT,
    )


def _fit_child(root: str, cap: int, scheduler: str = "none", labels_out: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-c", FIT_CHILD, str(cap), str(ROOT / "models" / "default"), root, scheduler]
    if labels_out:
        cmd.append(labels_out)
    load = loadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_seconds"] = time.perf_counter() - t0
    res["loadavg_before"] = load
    return res


def bench_fit(sizes: list[int], cap: int, quality_n: int, quality_cap: int, dask_n: int) -> dict[str, Any]:
    from sklearn.metrics import adjusted_rand_score

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            root = f"{tmp}/fit-{n}"
            _generate(n, root)
            rows.append(_fit_child(root, cap))
            if n == dask_n:
                rows.append(_fit_child(root, cap, "local"))
            shutil.rmtree(root)
        if quality_n == 0:
            return {"cap": cap, "rows": rows}
        root = f"{tmp}/quality"
        _generate(quality_n, root)
        full = _fit_child(root, 0, labels_out=f"{tmp}/full.npy")
        sampled = _fit_child(root, quality_cap, labels_out=f"{tmp}/sampled.npy")
        ari = float(adjusted_rand_score(np.load(f"{tmp}/full.npy"), np.load(f"{tmp}/sampled.npy")))
    quality = {
        "n": quality_n,
        "cap": quality_cap,
        "full": full,
        "sampled": sampled,
        "adjusted_rand_index": ari,
    }
    return {"cap": cap, "rows": rows, "quality": quality}


def _old_lookup(path: str, wanted: list[str]) -> int:
    """The lookup before partitioning (commit c524d1e), reproduced for the comparison: one flat
    folder of part files, every file filtered on each lookup."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    return ds.dataset(path, format="parquet").to_table(filter=pc.field("sha256").isin(wanted)).num_rows


def bench_lookup(sizes: list[int], repeats: int) -> dict[str, Any]:
    """Lookup time of one worker batch (8 digests) against stores of N rows, each written as its code writes.

    Before: every Dask task wrote its batch of 8 new rows as one file in one flat folder (N / 8
    files). After: the client adds new rows to the store in writes of ``buffer_rows`` (8192),
    one file per prefix partition, and a partition reaching ``compact_at`` (8) files is merged.
    """
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from monitor.profilestore import ParquetProfileStore

    rng = np.random.default_rng(0)
    out = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            digests = [hashlib.sha256(f"{n}-{i}".encode()).hexdigest() for i in range(n)]
            feats = rng.normal(size=(n, 40))
            rows = [(d, f, {"format": "png"}) for d, f in zip(digests, feats, strict=True)]
            flat = Path(tmp) / "flat"
            flat.mkdir()
            for j in range(0, n, 8):
                batch = rows[j : j + 8]
                table = pa.table(
                    {
                        "sha256": [r[0] for r in batch],
                        "features": pa.array([r[1].tolist() for r in batch], pa.list_(pa.float64())),
                        "meta": [json.dumps(r[2]) for r in batch],
                    }
                )
                pq.write_table(table, flat / f"part-{j:08d}.parquet")
            store = ParquetProfileStore(Path(tmp) / "after", {"bench": "lookup"})
            t0 = time.perf_counter()
            for j in range(0, n, store.buffer_rows):
                store.write(rows[j : j + store.buffer_rows])
            write_s = time.perf_counter() - t0
            asks = [list(rng.choice(digests, 8, replace=False)) for _ in range(repeats)]
            times = {"before": [], "after": []}
            store.files_read = 0
            for ask in asks:  # interleaved, so load from other users hits both alike
                t0 = time.perf_counter()
                assert _old_lookup(str(flat), ask) == 8
                times["before"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                assert len(store.lookup(ask)) == 8
                times["after"].append(time.perf_counter() - t0)
            out.append(
                {
                    "rows": n,
                    "files_before": n // 8,
                    "files_after": len(store.part_files()),
                    "before_ms": float(np.median(times["before"]) * 1e3),
                    "after_ms": float(np.median(times["after"]) * 1e3),
                    "after_files_read": store.files_read / repeats,
                    "after_write_s": write_s,
                    "loadavg": loadavg(),
                }
            )
    return {"digests_per_lookup": 8, "repeats": repeats, "rows": out}


def _measured(part: dict[str, Any]) -> str:
    m = part.get("measured")
    return f" (measured {m['utc']} UTC at {m['commit']})" if m else ""


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
            f"## `cxr-monitor score` on {c['n_images']} NIH images, whole process (target <= 0.65)"
            f"{_measured(c) or ' (measured before part 3, at 17051e5)'}\n",
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
        loads = [r["loadavg"] for runs in t["runs"].values() for r in runs]
        lines += [
            f"## Profiles per second, {t['n_images']} NIH images (1024 x 1024 WebP){_measured(t)}\n",
            "Each repeat runs the three side by side, in turn; the 1-minute load average during the "
            f"runs was {min(loads):.1f}-{max(loads):.1f} on these 2 cores.\n",
            "| runner | start-up s (to first result) | steady profiles/s |",
            "|---|---|---|",
            *[f"| {k} | {v['startup_s']:.2f} | {v['profiles_per_s']:.1f} |" for k, v in t["median"].items()],
            "",
        ]
    if "lookup" in res:
        lk = res["lookup"]
        lines += [
            f"## Profile cache lookups: one batch of {lk['digests_per_lookup']} digests{_measured(lk)}\n",
            "A store of N rows, written as each version's code writes it. Before: each Dask task "
            "wrote its 8 new rows as one file in one flat folder, and a lookup filtered every file "
            "(that code reproduced in the benchmark). After: the client adds new rows in writes of "
            "8192, one file per partition by the first 2 hex digits of the sha256 (256 partitions), "
            "a partition reaching 8 files is compacted, and a lookup scans only the partitions of "
            f"the asked digests. Median of {lk['repeats']} lookups, before and after interleaved.\n",
            "| N rows | files before | files after | ms before | ms after | files read per lookup after "
            "| load |",
            "|---|---|---|---|---|---|---|",
            *[
                f"| {r['rows']} | {r['files_before']} | {r['files_after']} | {r['before_ms']:.1f} | "
                f"{r['after_ms']:.1f} | {r['after_files_read']:.1f} | {r['loadavg'][0]:.1f} |"
                for r in lk["rows"]
            ],
            "",
        ]
    if "fit" in res:
        f = res["fit"]
        q = f["quality"]
        lines += [
            f"## Streamed fit of N synthetic profiles, sample cap {f['cap']}{_measured(f)}\n",
            "Synthetic profiles: a smoothed bootstrap of the 621 NIH reference profiles of models/default "
            "(resampled rows plus Gaussian noise of 0.2 of each cluster's per-feature spread), written "
            "to a Parquet fit set (65 536 rows per partition) by another process. Each fit runs "
            "`ReliabilityModel.fit_streamed` in a fresh process (k by BIC over 2..10, 3 starts each); "
            "peak RSS is that process's (with `local`, the client's: the two LocalCluster workers "
            "assign the partitions).\n",
            "| N | scheduler | clustered | k | fit s | process s | client peak RSS MB | RSS before fit MB "
            "| rows the client read | profiles MB |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *[
                f"| {r['n']:.0e} | {r['scheduler']} | {min(r['n'], r['cap']) if r['cap'] else r['n']} | "
                f"{r['k']} | {r['seconds']:.1f} | {r['process_seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                f"{r['rss_before_fit_mb']:.0f} | {r['rows_read_by_client']} | {r['profiles_mb']:.0f} |"
                for r in f["rows"]
            ],
            "",
            f"Quality cost of the sample at N = {q['n']:.0e}"
            f"{_measured({'measured': f['quality_measured']}) if 'quality_measured' in f else ''}: "
            f"full fit k = {q['full']['k']} in "
            f"{q['full']['seconds']:.1f} s, fit on a sample of "
            f"{q['cap']}: k = {q['sampled']['k']} in {q['sampled']['seconds']:.1f} s; adjusted Rand index "
            f"of their clusterings of all N profiles {q['adjusted_rand_index']:.3f}; mean log-likelihood "
            f"of all profiles {q['full']['mean_log_likelihood']:.3f} (full) vs "
            f"{q['sampled']['mean_log_likelihood']:.3f} (sampled).\n",
        ]
    return "\n".join(lines)


def _stamp() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {"utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "commit": commit.stdout.strip()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="cli,throughput,lookup,fit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--throughput-images", type=int, default=80)
    ap.add_argument("--lookup-rows", default="2048,16384,65536")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--cap", type=int, default=20_000, help="max_fit_profiles of the scaling rows")
    ap.add_argument(
        "--dask-n", type=int, default=1_000_000, help="also fit this size with a 2-worker LocalCluster"
    )
    ap.add_argument("--quality-n", type=int, default=30_000, help="0: keep the last quality result")
    ap.add_argument("--quality-cap", type=int, default=10_000)
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    path = RESULTS / "scale.json"
    res: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    res["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    if "cli" in parts:
        res["cli"] = {**bench_cli(args.images, args.repeats), "measured": _stamp()}
    if "throughput" in parts:
        res["throughput"] = {**bench_throughput(args.throughput_images, args.repeats), "measured": _stamp()}
    if "lookup" in parts:
        sizes = [int(n) for n in args.lookup_rows.split(",")]
        res["lookup"] = {**bench_lookup(sizes, 20), "measured": _stamp()}
    if "fit" in parts:
        sizes = [int(s) for s in args.sizes.split(",")]
        fit = bench_fit(sizes, args.cap, args.quality_n, args.quality_cap, args.dask_n)
        if "quality" not in fit:  # --quality-n 0: keep the previous quality measurement
            fit["quality"] = res["fit"]["quality"]
            fit["quality_measured"] = res["fit"].get("quality_measured", res["fit"]["measured"])
        res["fit"] = {**fit, "measured": _stamp()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    (RESULTS / "scale.md").write_text(write_md(res))
    print((RESULTS / "scale.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
