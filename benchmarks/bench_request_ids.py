"""Memory a sidecar keeps after requests with huge request ids (issue 9, defect 4).

Starts a sidecar in this process (bundled model, 1 worker, in-thread decoding), scores 5
small arrays with short ids, then sends two rounds of 40 Score calls whose ``request_id``
is 4 MiB, and prints the process's resident memory (VmRSS) after each round. Before ids
were bounded, every id was remembered for ReportOutcome (up to ``outcome_cache_size``),
so memory grew with each round; now they are refused with INVALID_ARGUMENT.

    .venv/bin/python benchmarks/bench_request_ids.py [--note TEXT]

Results: benchmarks/results/request_ids.md (run by hand, Linux only: reads /proc).
"""

from __future__ import annotations

import argparse
import gc

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from monitor.client import ReliabilityClient
from monitor.defaults import default_model_dir
from monitor.engine import Engine
from monitor.server import build_server
from monitor.settings import Settings

ID_BYTES = 4 << 20
ROUND = 40


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--note", default="", help="printed with the result")
    args = parser.parse_args()
    engine = Engine.from_directory(default_model_dir())
    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, workers=1, decode_processes=0,
                        log_level="ERROR")  # fmt: skip
    server, port = build_server(settings, engine, registry=CollectorRegistry())
    server.start()
    image = np.random.default_rng(0).random((256, 256)).astype(np.float32)
    rows = []
    try:
        with ReliabilityClient(f"127.0.0.1:{port}", timeout=60) as client:
            for i in range(5):
                client.score_array(image, request_id=f"warm-{i}")
            gc.collect()
            rows.append(("after 5 short ids", rss_mb(), {}))
            for r in range(2):
                codes: dict[str, int] = {}
                for i in range(ROUND):
                    try:
                        client.score_array(image, request_id=f"{r}-{i}".rjust(ID_BYTES, "x"))
                        code = "OK"
                    except grpc.RpcError as exc:
                        code = exc.code().name
                    codes[code] = codes.get(code, 0) + 1
                gc.collect()
                rows.append((f"after {ROUND * (r + 1)} ids of 4 MiB", rss_mb(), codes))
    finally:
        server.stop(0.5)
    print(f"| point | RSS (MB) | codes |  {args.note}")
    print("|---|---|---|")
    for name, mb, codes in rows:
        print(f"| {name} | {mb:.0f} | {codes or ''} |")


if __name__ == "__main__":
    main()
