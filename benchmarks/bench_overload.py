"""Overload benchmark of the sidecar (issue 9): goodput, shedding, health and memory under load.

One ``cxr-monitor serve`` subprocess with the shipped settings (4 worker threads, decoder
processes ``auto``, memory budget 384 MiB) on loopback; the load generator runs on the same
machine. Phases, run one after the other in one process so that their ratios compare:

1. ``unloaded``: 4 clients without a deadline (the server's full throughput, no queue to speak of);
2. ``deadline``: 64 clients with 1 s deadlines (each backs off on RESOURCE_EXHAUSTED as gRPC's
   retry policy would: jittered exponential, 0.1 s doubling to 1.6 s);
3. ``no_deadline``: 48 clients without a deadline.

A 1024 x 1024 NIH radiograph (PNG) is sent each time. Throughout, a prober asks the health
service every 0.2 s (1 s timeout) and a sampler reads the RSS of the server and its decoder
processes every 50 ms from /proc. Reported per phase: OK replies/s (goodput) and its ratio to
``unloaded``, codes, latency of OK replies, latency of RESOURCE_EXHAUSTED replies (shedding
must be immediate), health probes answered, decoder processes replaced, peak RSS.

    .venv/bin/python benchmarks/bench_overload.py --seconds 20 --append
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monitor.client import ReliabilityClient, bytes_request  # noqa: E402
from monitor.proto import monitor_pb2_grpc as pb_grpc  # noqa: E402

DATA = REPO.parent / "shared" / "data"
SOURCE = DATA / "nih" / "images" / "00000075_000.webp"
RESULTS = REPO / "benchmarks" / "results"


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its direct children (the decoder processes)."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += int(fields[21]) * page
    return total


class Server:
    """``cxr-monitor serve`` with the shipped defaults on a free loopback port; counts decoder restarts."""

    def __init__(self, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "monitor.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", "-1", "--log-format", "json", *extra]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        assert self.proc.stderr is not None
        self.decoder_deaths = 0
        self.settings: dict[str, Any] = {}
        for line in self.proc.stderr:
            doc = json.loads(line)
            if doc.get("msg") == "starting":
                self.settings = doc.get("settings", {})
            if doc.get("msg") == "listening":
                self.address = f"127.0.0.1:{doc['port']}"
                break
        else:
            raise RuntimeError(f"server exited with {self.proc.wait()} before listening")
        threading.Thread(target=self._drain, daemon=True).start()
        end = time.monotonic() + 180
        with ReliabilityClient(self.address) as client:
            while client_health(client) != "SERVING":
                if time.monotonic() > end or self.proc.poll() is not None:
                    raise RuntimeError("server did not become SERVING")
                time.sleep(0.2)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if "a decoder process died" in line:
                self.decoder_deaths += 1

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def client_health(client: ReliabilityClient) -> str | None:
    try:
        return client.health(timeout=2)
    except grpc.RpcError:
        return None


def phase(server: Server, payload: bytes, clients: int, deadline: float | None, seconds: float) -> dict:
    """``clients`` threads, each on its own channel, calling Score back to back for ``seconds``."""
    stop = threading.Event()
    lock = threading.Lock()
    codes: Counter = Counter()
    ok_latency: list[float] = []
    shed_latency: list[float] = []
    probes = Counter()
    peak = [0]

    def load(i: int) -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ReliabilityMonitorStub(channel)  # a plain stub: what clients nobody here wrote use
            n = 0
            backoff = 0.0
            rng = np.random.default_rng(i)
            while not stop.is_set():
                request = bytes_request(payload, request_id=f"c{i}-{n}")
                n += 1
                t0 = time.perf_counter()
                try:
                    stub.Score(request, timeout=deadline) if deadline else stub.Score(request)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                dt = time.perf_counter() - t0
                with lock:
                    codes[code] += 1
                    if code == "OK":
                        ok_latency.append(dt)
                    elif code == "RESOURCE_EXHAUSTED":
                        shed_latency.append(dt)
                if code == "RESOURCE_EXHAUSTED":
                    # What gRPC's retry policy does: jittered exponential backoff, 0.1 s doubling to 1.6 s.
                    backoff = min(1.6, max(0.1, 2 * backoff))
                    stop.wait(backoff * rng.uniform(0.5, 1.0))
                else:
                    backoff = 0.0

    def probe() -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    probes["ok" if r.status == health_pb2.HealthCheckResponse.SERVING else "not_serving"] += 1
                except grpc.RpcError as exc:
                    probes[exc.code().name] += 1
                stop.wait(0.2)

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(server.proc.pid))
            stop.wait(0.05)

    deaths_before = server.decoder_deaths
    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(clients)]
    threads += [threading.Thread(target=probe, daemon=True), threading.Thread(target=sample, daemon=True)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(120)
    elapsed = time.perf_counter() - t0

    def pct(values: list[float], q: float) -> float | None:
        return round(float(np.percentile(values, q)) * 1e3, 1) if values else None

    return {
        "clients": clients,
        "deadline_seconds": deadline,
        "seconds": round(elapsed, 2),
        "codes": dict(codes),
        "goodput_per_s": round(codes["OK"] / elapsed, 2),
        "ok_ms_p50": pct(ok_latency, 50),
        "ok_ms_p99": pct(ok_latency, 99),
        "shed_ms_p50": pct(shed_latency, 50),
        "shed_ms_p99": pct(shed_latency, 99),
        "shed_ms_max": round(max(shed_latency) * 1e3, 1) if shed_latency else None,
        "health_probes": dict(probes),
        "health_answered_ratio": round(probes["ok"] / max(1, sum(probes.values())), 4),
        "decoder_restarts": server.decoder_deaths - deaths_before,
        "peak_rss_mib": round(peak[0] / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each loaded phase")
    parser.add_argument("--append", action="store_true", help="append the run to results/overload.{json,md}")
    parser.add_argument("--note", default="", help="what this run measured (code state, machine load)")
    args = parser.parse_args()

    buf = io.BytesIO()
    Image.open(SOURCE).save(buf, format="PNG")
    payload = buf.getvalue()
    server = Server([])
    idle_rss = _tree_rss(server.proc.pid)
    try:
        phase(server, payload, 4, None, 3.0)  # warm-up: plans, caches, the service-time estimate
        run = {
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "note": args.note,
            "load_before": round(os.getloadavg()[0], 2),
            "server_settings": {
                k: server.settings.get(k)
                for k in ("workers", "decode_processes", "max_concurrent_rpcs", "memory_budget_bytes")
            },  # fmt: skip
            "idle_rss_mib": round(idle_rss / 2**20, 1),
            "unloaded": phase(server, payload, 4, None, args.seconds / 2),
            "deadline": phase(server, payload, 64, 1.0, args.seconds),
            "no_deadline": phase(server, payload, 48, None, args.seconds),
        }
    finally:
        server.stop()
    base = run["unloaded"]["goodput_per_s"]
    for name in ("deadline", "no_deadline"):
        run[name]["goodput_ratio"] = round(run[name]["goodput_per_s"] / base, 3) if base else None
    print(json.dumps(run, indent=1))
    if args.append:
        _append(run)


def _append(run: dict) -> None:
    path = RESULTS / "overload.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append(run)
    path.write_text(json.dumps(runs, indent=1) + "\n")
    lines = [
        "# Overload benchmark (`benchmarks/bench_overload.py`)\n",
        "Shipped settings, one `cxr-monitor serve` on loopback, load generator on the same 2 cores.",
        "Goodput = OK replies/s; ratio to the unloaded phase (4 clients, no deadline) of the same run.",
        "Shed latency = time to a RESOURCE_EXHAUSTED reply as the client sees it.\n",
        "| run | phase | clients | deadline | goodput/s | ratio | codes | OK p50/p99 ms | shed p99/max ms | health ok | decoder restarts | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        for name in ("unloaded", "deadline", "no_deadline"):
            p = r[name]
            codes = ", ".join(f"{k} {v}" for k, v in sorted(p["codes"].items()))
            lines.append(
                f"| {i} | {name} | {p['clients']} | {p['deadline_seconds'] or 'none'} | {p['goodput_per_s']} | "
                f"{p.get('goodput_ratio', 1.0)} | {codes} | {p['ok_ms_p50']}/{p['ok_ms_p99']} | "
                f"{p['shed_ms_p99']}/{p['shed_ms_max']} | {p['health_answered_ratio']:.1%} | "
                f"{p['decoder_restarts']} | {p['peak_rss_mib']} |"
            )
    lines.append("")
    for i, r in enumerate(runs, 1):
        lines.append(f"- run {i} ({r['when']}, load {r['load_before']}, idle RSS {r['idle_rss_mib']} MiB, "
                     f"settings {r['server_settings']}): {r['note']}")  # fmt: skip
    (RESULTS / "overload.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
