"""Speed of the gRPC sidecar on this machine: latency, throughput, server overhead, scaling.

Runs real ``cxr-monitor serve`` subprocesses on 127.0.0.1 and drives them with
blocking unary Score calls from 1 or 8 client threads (one channel each), for two
inputs: a 1024x1024 PNG (an NIH WebP re-encoded in memory) and the 1955x1841
15-bit JPEG 2000 DICOM. Writes ``benchmarks/results/server.json`` and ``server.md``
(runs 1-6, made before ``--decode-processes auto`` was the default, are kept in
``server_runs1-6.*``).

Server configurations, run side by side (all three servers up at once, 8-client bursts
interleaved round by round, so that drift in the machine's speed hits each alike):

* ``default``: the shipped settings (4 worker threads, ``--decode-processes auto``, which is
  one decoder process per CPU: 2 here);
* ``1 thread``: ``--workers 1 --decode-processes 0``, one worker thread doing everything;
* ``2 threads``: ``--workers 2 --decode-processes 0``, to show what threads alone give.

Measured:

* p50/p99 client-side latency and throughput with 1 and 8 concurrent clients (default);
* server overhead = (server total - decode - profile - score) / (decode + profile + score),
  from the per-request server timings of the single-client run (no queueing); the
  8-client figure is also given, where "overhead" includes time queued for a worker;
* throughput at 8 clients of ``default`` and of ``2 threads`` / ``1 thread`` (target >= 1.8 on 2 cores);
* p99 at 8 clients against single-client p50 x 4 (8 clients / 2 cores: the queueing bound);
* CPU seconds per request of the server (with its decoder processes) and of the load generator,
  which shares the 2 cores.

The machine may be shared: the 1-minute load average before and after each run is recorded.

    .venv/bin/python benchmarks/bench_server.py [--png-requests 160] [--dicom-requests 40] [--append]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from monitor.client import ReliabilityClient, bytes_request

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()
RESULTS = REPO / "benchmarks" / "results"
PNG_SOURCE = DATA / "nih" / "images" / "00000075_000.webp"
DICOM = DATA / "dicom" / "cxr_pa_cr_philips_j2k.dcm"


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live children (decoder processes), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        this, parent = int(stat.parent.name), int(fields[1])
        if this == pid or parent == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Server:
    """A ``cxr-monitor serve`` subprocess on a free loopback port."""

    def __init__(self, workers: int, decode_processes: int | str = 0) -> None:
        cmd = [sys.executable, "-m", "monitor.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", "-1", "--workers", str(workers), "--decode-processes", str(decode_processes),
               "--log-format", "json"]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            doc = json.loads(line)
            if doc.get("msg") == "listening":
                self.address = f"127.0.0.1:{doc['port']}"
                break
        else:
            raise RuntimeError(f"server exited with {self.proc.wait()} before listening")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        deadline = time.monotonic() + 180
        with ReliabilityClient(self.address) as client:
            while True:
                try:
                    if client.health(timeout=2) == "SERVING":
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("server did not become SERVING")
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def drive(server: Server, request: Any, clients: int, n_requests: int) -> dict[str, Any]:
    """``n_requests`` Score calls shared by ``clients`` threads, each on its own channel: raw samples."""
    remaining = [n_requests]
    lock = threading.Lock()
    samples: list[tuple[float, Any]] = []
    errors: list[str] = []

    def worker() -> None:
        with ReliabilityClient(server.address, timeout=120) as client:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                t0 = time.perf_counter()
                try:
                    r = client.score(request)
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    samples.append((dt, r.timings))

    load_before = _load()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    cpu_before = _cpu_seconds(server.proc.pid)
    client_before = os.times()
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    client_after = os.times()
    return {
        "clients": clients,
        "samples": samples,
        "errors": errors,
        "seconds": wall,
        "server_cpu_seconds": _cpu_seconds(server.proc.pid) - cpu_before,
        "client_cpu_seconds": (client_after.user - client_before.user)
        + (client_after.system - client_before.system),
        "load_before": load_before,
        "load_after": _load(),
    }


def summarise(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics over one or more :func:`drive` bursts of the same server and input."""
    samples = [s for p in parts for s in p["samples"]]
    wall = sum(p["seconds"] for p in parts)
    cpu = sum(p["server_cpu_seconds"] for p in parts)
    client_cpu = sum(p["client_cpu_seconds"] for p in parts)
    lat = [s[0] for s in samples]
    work = [t.decode_seconds + t.profile_seconds + t.score_seconds for _, t in samples]
    total = [t.total_seconds for _, t in samples]
    overhead = [(tt - w) / w for tt, w in zip(total, work, strict=True)]
    n = max(len(samples), 1)
    return {
        "clients": parts[0]["clients"],
        "bursts": len(parts),
        "requests": len(samples),
        "errors": [e for p in parts for e in p["errors"]],
        "seconds": wall,
        "throughput_per_second": len(samples) / wall,
        # Per burst: with interleaved bursts, how much the machine's speed moved during the run.
        "burst_throughputs": [len(p["samples"]) / p["seconds"] for p in parts],
        "latency_p50_seconds": _percentile(lat, 50),
        "latency_p99_seconds": _percentile(lat, 99),
        "latency_mean_seconds": statistics.fmean(lat),
        "server_total_p50_seconds": _percentile(total, 50),
        "server_work_p50_seconds": _percentile(work, 50),
        "stage_p50_seconds": {
            "decode": _percentile([t.decode_seconds for _, t in samples], 50),
            "profile": _percentile([t.profile_seconds for _, t in samples], 50),
            "score": _percentile([t.score_seconds for _, t in samples], 50),
        },
        # Aggregate ratio (sum over requests) and the median per-request ratio.
        "server_overhead_ratio": (sum(total) - sum(work)) / sum(work),
        "server_overhead_p50_ratio": _percentile(overhead, 50),
        "client_minus_server_p50_seconds": _percentile([a - b for a, b in zip(lat, total, strict=True)], 50),
        # Cores the server kept busy: ~1 when work is serialised (GIL), up to 2 on 2 free cores.
        "server_cpu_cores": cpu / wall,
        "server_cpu_seconds_per_request": cpu / n,
        "client_cpu_seconds_per_request": client_cpu / n,
        "load_before": parts[0]["load_before"],
        "load_after": parts[-1]["load_after"],
    }


def gil_share(fn: Any) -> float:
    """How much a pure-Python thread progresses while ``fn`` runs, relative to running alone.

    Near 0: ``fn`` holds the GIL (threads cannot overlap it); near 1 or above: it releases it.
    """
    fn()  # warm (imports, FFT plans)
    t0 = time.perf_counter()
    fn()
    duration = time.perf_counter() - t0

    def spin_count(during: Any) -> int:
        stop, count = threading.Event(), [0]

        def spin() -> None:
            n = 0
            while not stop.is_set():
                n += 1
            count[0] = n

        t = threading.Thread(target=spin)
        t.start()
        during()
        stop.set()
        t.join()
        return count[0]

    alone = spin_count(lambda: time.sleep(duration))
    return spin_count(fn) / max(alone, 1)


def gil_check() -> dict[str, float]:
    """GIL share of each stage, in this process (engine calls, no server)."""
    from monitor.defaults import default_model_dir
    from monitor.engine import Engine

    engine = Engine.from_directory(default_model_dir())
    png = _inputs()["png_1024"].encoded.data
    dcm = DICOM.read_bytes()
    png_pixels, dcm_pixels = engine.load(png).pixels, engine.load(dcm).pixels
    return {
        "decode png_1024": gil_share(lambda: engine.load(png)),
        "decode dicom_j2k": gil_share(lambda: engine.load(dcm)),
        "profile png_1024": gil_share(lambda: engine.profile(png_pixels)),
        "profile dicom_j2k": gil_share(lambda: engine.profile(dcm_pixels)),
    }


def _inputs() -> dict[str, Any]:
    buf = io.BytesIO()
    Image.open(PNG_SOURCE).save(buf, format="PNG")
    return {
        "png_1024": bytes_request(buf.getvalue(), name="nih.png"),
        "dicom_j2k": bytes_request(DICOM.read_bytes(), name=DICOM.name),
    }


def run(png_requests: int, dicom_requests: int, rounds: int) -> dict[str, Any]:
    inputs = _inputs()
    counts = {"png_1024": png_requests, "dicom_j2k": dicom_requests}
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_at_start": list(os.getloadavg()),
        },  # fmt: skip
        "inputs": {k: len(v.encoded.data) for k, v in inputs.items()},
        "runs": {},
    }
    configs = {"default": (4, "auto"), "1 thread": (1, 0), "2 threads": (2, 0)}
    servers: dict[str, Server] = {}
    try:
        for config, (workers, processes) in configs.items():
            servers[config] = Server(workers, processes)
        for name, request in inputs.items():
            n = counts[name]
            for server in servers.values():
                drive(server, request, 2, 4)  # warm every worker, decoder process and channel
                drive(server, request, 4, 8)
            # Interleaved bursts (A B C A B C ...): the VM's speed drifts by several percent over
            # minutes, and back-to-back runs per configuration would put that drift into the ratios.
            bursts: dict[str, list[dict[str, Any]]] = {c: [] for c in servers}
            for _ in range(rounds):
                for config, server in servers.items():
                    bursts[config].append(drive(server, request, 8, n // rounds))
            for config in servers:
                out["runs"][f"{name}/{config}/clients=8"] = summarise(bursts[config])
            one = [drive(servers["default"], request, 1, max(n // 2 // rounds, 5)) for _ in range(rounds)]
            out["runs"][f"{name}/default/clients=1"] = summarise(one)
            print(f"done {name}", file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()
    summary = {}
    for name in inputs:
        one = out["runs"][f"{name}/default/clients=1"]
        eight = out["runs"][f"{name}/default/clients=8"]
        eight_t1 = out["runs"][f"{name}/1 thread/clients=8"]
        eight_t2 = out["runs"][f"{name}/2 threads/clients=8"]
        summary[name] = {
            "p50_1_client_ms": one["latency_p50_seconds"] * 1e3,
            "p99_1_client_ms": one["latency_p99_seconds"] * 1e3,
            "throughput_1_client": one["throughput_per_second"],
            "p50_8_clients_ms": eight["latency_p50_seconds"] * 1e3,
            "p99_8_clients_ms": eight["latency_p99_seconds"] * 1e3,
            "throughput_8_clients": eight["throughput_per_second"],
            "server_overhead_1_client": one["server_overhead_ratio"],
            "server_overhead_8_clients_incl_queueing": eight["server_overhead_ratio"],
            "throughput_default_over_1_thread": eight["throughput_per_second"]
            / eight_t1["throughput_per_second"],
            "throughput_2_threads_over_1_thread": eight_t2["throughput_per_second"]
            / eight_t1["throughput_per_second"],
            "p99_8_clients_over_4x_p50_1_client": eight["latency_p99_seconds"]
            / (4 * one["latency_p50_seconds"]),
            # The same ratio per round (bursts measured next to each other).
            "throughput_default_over_1_thread_per_round": [
                a / b for a, b in zip(eight["burst_throughputs"], eight_t1["burst_throughputs"], strict=True)
            ],
        }
    out["summary"] = summary
    out["gil_share"] = gil_check()
    out["machine"]["load_at_end"] = list(os.getloadavg())
    return out


def _markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "# gRPC sidecar speed",
        "",
        "Generated by `benchmarks/bench_server.py` (real `cxr-monitor serve` subprocesses on 127.0.0.1,",
        "blocking unary Score calls, one channel per client thread; the load generator runs on the same",
        "2 cores as the server). Latency is client-side (send to reply). Server configurations:",
        "`default` = the shipped settings (4 worker threads, `--decode-processes auto` = 2 decoder",
        "processes here), `1 thread` = `--workers 1 --decode-processes 0`, `2 threads` =",
        "`--workers 2 --decode-processes 0`. Scaling = throughput at 8 clients / that of `1 thread`.",
        "From run 6 on, the configurations run side by side in interleaved bursts (default, 1 thread,",
        "2 threads, default, ...; `--rounds`, 4 by default) and the per-round ratios are listed: this",
        "virtual machine's speed drifts by several percent over minutes (CPU s/request moved 0.050-0.055",
        "between runs 1-5), which runs 1-5, one configuration after the other, put into their ratios.",
        "Server overhead = (server total - decode - profile - score) / (decode + profile + score) from the",
        "server's own timings; with 8 clients it includes time queued for a worker.",
        "Read throughput together with 'server CPU cores busy' and the load average: when something else",
        "runs on the machine the server cannot get two cores. Runs 1-6 (before `auto` was the default,",
        "with 2 worker threads as the measured configuration) are in `server_runs1-6.md`.",
        "",
    ]
    for i, res in enumerate(results, 1):
        m = res["machine"]
        lines += [
            f"## Run {i}: {res['date']} ({m['cpus']} CPUs; load average at start "
            f"{m['load_at_start'][0]:.2f}, at end {m['load_at_end'][0]:.2f})",
            "",
            *([res["note"], ""] if res.get("note") else []),
            "| input | p50 1 client | p99 1 client | thr. 1 client | p50 8 clients | p99 8 clients | thr. 8 clients "
            "| overhead 1 client | overhead 8 clients (queueing) | scaling default / 1 thread "
            "| same, per round | scaling 2 threads / 1 thread | p99(8) / 4 x p50(1) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, s in res["summary"].items():
            rounds = s.get("throughput_default_over_1_thread_per_round")
            per_round = " ".join(f"{r:.2f}" for r in rounds) if rounds else "(not interleaved)"
            lines.append(
                f"| {name} | {s['p50_1_client_ms']:.1f} ms | {s['p99_1_client_ms']:.1f} ms | "
                f"{s['throughput_1_client']:.1f}/s | {s['p50_8_clients_ms']:.1f} ms | {s['p99_8_clients_ms']:.1f} ms | "
                f"{s['throughput_8_clients']:.1f}/s | {s['server_overhead_1_client']:.1%} | "
                f"{s['server_overhead_8_clients_incl_queueing']:.0%} | {s['throughput_default_over_1_thread']:.2f}x | "
                f"{per_round} | "
                f"{s['throughput_2_threads_over_1_thread']:.2f}x | {s['p99_8_clients_over_4x_p50_1_client']:.2f} |"
            )
        lines += ["", "| run | requests | load before/after | p50 | p99 | throughput | stages p50 (decode / profile / "
                  "score) | server CPU cores busy | server CPU s/request | load generator CPU s/request |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for key, r in res["runs"].items():
            st = r["stage_p50_seconds"]
            lines.append(
                f"| {key} | {r['requests']} ({len(r['errors'])} errors) | {r['load_before']:.2f} / "
                f"{r['load_after']:.2f} | {r['latency_p50_seconds'] * 1e3:.1f} ms | "
                f"{r['latency_p99_seconds'] * 1e3:.1f} ms | {r['throughput_per_second']:.1f}/s | "
                f"{st['decode'] * 1e3:.1f} / {st['profile'] * 1e3:.1f} / {st['score'] * 1e3:.1f} ms | "
                f"{r['server_cpu_cores']:.2f} | {r['server_cpu_seconds_per_request']:.3f} | "
                f"{r['client_cpu_seconds_per_request']:.4f} |"
            )
        if "gil_share" in res:
            lines += ["", "GIL check (a pure-Python thread's progress while the stage runs, relative to alone; "
                      "near 0 = the stage holds the GIL, so worker threads cannot overlap it): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in res["gil_share"].items())]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png-requests", type=int, default=160, help="requests per PNG run (default: 160)")
    parser.add_argument("--dicom-requests", type=int, default=40, help="requests per DICOM run (default: 40)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="interleaved bursts per configuration (default: 4)")  # fmt: skip
    parser.add_argument("--append", action="store_true", help="add this run to the existing results")
    parser.add_argument(
        "--note", default=None, help="what this run measures (e.g. the code state), shown with it"
    )
    args = parser.parse_args()
    if not DICOM.is_file() or not PNG_SOURCE.is_file():
        print(f"error: shared data not found under {DATA}", file=sys.stderr)
        return 2
    result = run(args.png_requests, args.dicom_requests, args.rounds)
    if args.note:
        result["note"] = args.note
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "server.json"
    runs = json.loads(path.read_text())["runs"] if args.append and path.is_file() else []
    runs.append(result)
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    (RESULTS / "server.md").write_text(_markdown(runs))
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
