"""What the outcome store (``serve --store``) costs.

1. The store on its own (public API of :class:`monitor.store.OutcomeStore`, 31 features):
   time a scoring thread spends in ``add_prediction`` (building the row and a queue put),
   the writer's sustained rate (rows committed per second, batched), and the latency of
   ``record_outcome`` (one fsynced commit, ``synchronous=FULL``), reported one at a time
   and from 8 threads at once (they share commits).
2. Side by side: two ``cxr-monitor serve`` subprocesses (``--workers 2 --decode-processes 0``),
   one with ``--store``, one without, both up at once; 4 client threads send NIH PNGs
   (1024x1024) to each in alternating bursts, so drift in the shared machine hits both alike.
   Throughput ratio store / no store.

Writes ``benchmarks/results/store_cost.json`` and ``store_cost.md``.

    .venv/bin/python benchmarks/bench_store.py [--rows 20000] [--images 60] [--rounds 4]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from monitor.client import ReliabilityClient, bytes_request
from monitor.store import OutcomeStore, StoredPrediction

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def store_alone(rows: int, outcomes: int, folder: Path) -> dict:
    store = OutcomeStore(folder / "alone.sqlite")
    store.register_model("bench", [f"f{i}" for i in range(31)], 5)
    rng = np.random.default_rng(0)
    profiles = rng.normal(size=(rows, 31))
    t0 = time.perf_counter()
    put = []
    for i in range(rows):
        a = time.perf_counter()
        store.add_prediction(
            StoredPrediction(f"r{i}", time.time(), "bench", i % 5, 0.2, 0.2, 0.5, None, profiles[i])
        )
        put.append(time.perf_counter() - a)
    store.flush(timeout=600)
    write_seconds = time.perf_counter() - t0
    single = []
    for i in range(outcomes):
        a = time.perf_counter()
        store.record_outcome(f"r{i}", i % 4 == 0)
        single.append(time.perf_counter() - a)
    parallel: list[float] = []
    lock = threading.Lock()

    def report(ids: range) -> None:
        for i in ids:
            a = time.perf_counter()
            store.record_outcome(f"r{i}", False)
            with lock:
                parallel.append(time.perf_counter() - a)

    threads = [
        threading.Thread(target=report, args=(range(outcomes + k, 9 * outcomes, 8),)) for k in range(8)
    ]
    t1 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parallel_seconds = time.perf_counter() - t1
    store.close()
    size = sum(p.stat().st_size for p in folder.glob("alone.sqlite*"))
    return {
        "rows": rows,
        "add_prediction_us_median": float(np.median(put) * 1e6),
        "add_prediction_us_p99": float(np.percentile(put, 99) * 1e6),
        "writer_rows_per_second": rows / write_seconds,
        "record_outcome_ms_median_sequential": float(np.median(single) * 1e3),
        "record_outcome_ms_p99_sequential": float(np.percentile(single, 99) * 1e3),
        "record_outcome_ms_median_8_threads": float(np.median(parallel) * 1e3),
        "outcomes_per_second_8_threads": len(parallel) / parallel_seconds,
        "bytes_per_row": size / rows,
    }


def _serve(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
         "--log-format", "json", "--workers", "2", "--decode-processes", "0", *args],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        doc = json.loads(line)
        if doc["msg"] == "listening":
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            address = f"127.0.0.1:{doc['port']}"
            with ReliabilityClient(address) as c:
                while c.health() != "SERVING":
                    time.sleep(0.2)
            return proc, address
    raise RuntimeError(f"server exited {proc.wait()}")


def _burst(address: str, images: list[bytes], clients: int = 4) -> float:
    todo = list(enumerate(images))
    lock = threading.Lock()

    def work() -> None:
        with ReliabilityClient(address, timeout=120) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    i, data = todo.pop()
                c.score(bytes_request(data))

    threads = [threading.Thread(target=work) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(images) / (time.perf_counter() - t0)


def side_by_side(n_images: int, rounds: int, folder: Path) -> dict:
    names = sorted((DATA / "nih" / "images").glob("*.webp"))[:n_images]
    images = []
    for p in names:
        buf = io.BytesIO()
        Image.open(p).save(buf, format="PNG")
        images.append(buf.getvalue())
    with_store, address_s = _serve(["--store", str(folder / "served.sqlite")])
    without, address_n = _serve([])
    try:
        _burst(address_s, images[:8])  # warm both
        _burst(address_n, images[:8])
        rates: dict[str, list[float]] = {"store": [], "no_store": []}
        for r in range(rounds):
            order = [("store", address_s), ("no_store", address_n)]
            for name, address in order if r % 2 == 0 else order[::-1]:
                rates[name].append(_burst(address, images))
    finally:
        for p in (with_store, without):
            p.terminate()
            p.wait(30)
    s, n = np.median(rates["store"]), np.median(rates["no_store"])
    return {"images": n_images, "rounds": rounds, "per_round": rates, "median_images_per_second": {"store": s,
            "no_store": n}, "ratio_store_over_no_store": s / n}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--outcomes", type=int, default=200)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=REPO / ".cache" if (REPO / ".cache").is_dir() else None) as tmp:
        alone = store_alone(args.rows, args.outcomes, Path(tmp))
        server = side_by_side(args.images, args.rounds, Path(tmp))
    result = {
        "store_alone": alone,
        "server": server,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_1min_before": load_before,
                    "load_1min_after": os.getloadavg()[0], "filesystem_of_tmp": tempfile.gettempdir()},
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "store_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    a, s = alone, server
    md = f"""# Cost of the outcome store (`serve --store`)

Measured with `benchmarks/bench_store.py` on {os.cpu_count()} CPUs shared with other work (1-minute load
{load_before:.1f} before, {result["machine"]["load_1min_after"]:.1f} after); SQLite in WAL mode, `synchronous=FULL`.

| store on its own ({a["rows"]} rows of 31 features) | |
|---|---|
| `add_prediction` on the scoring thread, median / p99 | {a["add_prediction_us_median"]:.1f} / {a["add_prediction_us_p99"]:.1f} µs |
| writer, batched commits | {a["writer_rows_per_second"]:.0f} rows/s |
| `record_outcome` (fsynced commit), one at a time, median / p99 | {a["record_outcome_ms_median_sequential"]:.2f} / {a["record_outcome_ms_p99_sequential"]:.2f} ms |
| `record_outcome` from 8 threads (shared commits), median; throughput | {a["record_outcome_ms_median_8_threads"]:.2f} ms; {a["outcomes_per_second_8_threads"]:.0f}/s |
| file size per row (with indexes) | {a["bytes_per_row"]:.0f} bytes |

| served (2 workers, in-thread decoding, 4 clients, {s["images"]} NIH PNGs x {s["rounds"]} alternating rounds) | images/s |
|---|---|
| without store | {s["median_images_per_second"]["no_store"]:.2f} |
| with store | {s["median_images_per_second"]["store"]:.2f} |
| ratio with / without | {s["ratio_store_over_no_store"]:.3f} |
"""
    (RESULTS / "store_cost.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
