"""DICOM storage node throughput and C-STORE acknowledgement latency, with dcmtk storescu as the sender.

Starts ``cxr-monitor serve --dicom-port ...`` (the bundled model, shipped settings otherwise) as
a user would, makes two sets of instances from the shared Philips CR (1955 x 1841, 15 bits):

- ``j2k``: the file as stored, JPEG 2000 (each copy with its own SOP Instance UID);
- ``uncompressed``: the same pixels, explicit VR little endian (7.2 MB per instance);

and for each set measures

1. **sustained rate**: storescu sends ``--instances`` in one association into a queue large
   enough to hold them; the rate is instances / (time from the first send until the last is
   scored, read from ``cxr_monitor_source_images_scored_total`` on /metrics);
2. **acknowledgement latency while saturated**: storescu floods ``--flood`` instances (more than
   the node scores, so the queue stays full and most replies are 0xA700) while a probe sends one
   instance every 100 ms on its own association and times each C-STORE round trip (request
   sent -> response received, transfer included). The server's own ``store_ack_seconds``
   (header check and queueing) is reported beside it.

Both for the shipped server (``--decode-processes auto``: one decoder process per CPU) and for
decoding in the node's scoring threads (``--decode-processes 0``), side by side per set.

Writes ``benchmarks/results/dicom_node.json`` and ``dicom_node.md``. The load generator runs on
the same cores as the server.

Usage::

    .venv/bin/python benchmarks/bench_dicom_node.py [--instances 40] [--flood 200] [--append]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pynetdicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from monitor.settings import DEFAULT_DICOM_QUEUE_SIZE

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SOURCE = DATA / "dicom" / "cxr_pa_cr_philips_j2k.dcm"
RESULTS = REPO / "benchmarks" / "results"
QUEUE = DEFAULT_DICOM_QUEUE_SIZE  # saturation runs use the shipped queue (runs 1-2 used 64)
PROPOSE = {"j2k": "-xw", "uncompressed": "-xe"}
#: Server configurations compared: the shipped one (one decoder process per CPU, 2 here) and decoding
#: in the scoring threads.
CONFIGS = {"decode-processes auto": "auto", "decode-processes 0": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _instances(kind: str, n: int, folder: Path) -> list[Path]:
    ds = pydicom.dcmread(SOURCE)
    if kind == "uncompressed":
        ds.PixelData = np.ascontiguousarray(ds.pixel_array, dtype=np.uint16).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        uid = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        path = folder / f"{kind}_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class Server:
    """``cxr-monitor serve`` with the DICOM node, in its own process."""

    def __init__(self, queue_size: int, decode_processes: str) -> None:
        self.port, self.metrics_port, self.dicom_port = _free_port(), _free_port(), _free_port()
        command = [str(REPO / ".venv" / "bin" / "cxr-monitor"), "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                   "--dicom-port", str(self.dicom_port), "--dicom-queue-size", str(queue_size),
                   "--dicom-allowed-aes", "WARMUP,BENCH,FLOOD,PROBE", "--decode-processes", decode_processes,
                   "--log-level", "WARNING"]  # fmt: skip
        self.proc = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while self.metric("cxr_monitor_model_loaded") != 1:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)

    def metrics(self) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
                return r.read().decode()
        except OSError:
            return ""

    def metric(self, name: str, labels: str = "") -> float:
        prefix = f"{name}{{{labels}}} " if labels else f"{name} "
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith(prefix):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def ack_quantiles(self) -> dict[str, float]:
        """p50 / p99 upper bounds of cxr_monitor_dicom_store_ack_seconds from its buckets."""
        buckets = []
        for line in self.metrics().splitlines():
            if line.startswith("cxr_monitor_dicom_store_ack_seconds_bucket"):
                le = line.split('le="')[1].split('"')[0]
                buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
        total = buckets[-1][1] if buckets else 0
        out = {}
        for q in (0.5, 0.99):
            out[f"p{round(q * 100)}_le_s"] = next((le for le, c in buckets if c >= q * total), float("nan"))
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _storescu(server: Server, kind: str, files: list[Path], calling: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["storescu", "-R", PROPOSE[kind], "--no-halt", "-aet", calling, "-aec", "CXRMONITOR", "127.0.0.1",
         str(server.dicom_port), *map(str, files)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _scored(server: Server) -> float:
    return server.metric("cxr_monitor_images_scored_total")


def sustained(kind: str, files: list[Path], decode_processes: str) -> dict[str, Any]:
    server = Server(max(QUEUE, len(files)), decode_processes)
    try:
        warm = _storescu(server, kind, files[:2], "WARMUP")  # plans, caches, first decode
        warm.wait(timeout=300)
        while _scored(server) < 2:
            time.sleep(0.05)
        t0 = time.perf_counter()
        proc = _storescu(server, kind, files, "BENCH")
        proc.wait(timeout=600)
        sent = time.perf_counter() - t0
        while _scored(server) < 2 + len(files):
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        return {
            "instances": len(files),
            "all_acknowledged_s": round(sent, 3),
            "all_scored_s": round(elapsed, 3),
            "instances_per_s": round(len(files) / elapsed, 2),
        }
    finally:
        server.stop()


def saturated(kind: str, files: list[Path], probe_file: Path, decode_processes: str) -> dict[str, Any]:
    server = Server(QUEUE, decode_processes)
    try:
        warm = _storescu(server, kind, files[:2], "WARMUP")
        warm.wait(timeout=300)
        flood = _storescu(server, kind, files, "FLOOD")
        latencies: list[float] = []
        statuses: dict[str, int] = {}
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the file as it is, like storescu
        ae = AE(ae_title="PROBE")
        ae.add_requested_context(ComputedRadiographyImageStorage, str(pydicom.dcmread(
            probe_file, stop_before_pixels=True).file_meta.TransferSyntaxUID))  # fmt: skip
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="CXRMONITOR")
        stop = threading.Event()
        try:
            time.sleep(0.5)  # let the flood fill the queue
            while flood.poll() is None and not stop.is_set():
                t = time.perf_counter()
                status = assoc.send_c_store(probe_file)
                latencies.append(time.perf_counter() - t)
                code = f"0x{int(status.Status):04X}" if "Status" in status else "none"
                statuses[code] = statuses.get(code, 0) + 1
                time.sleep(0.1)
        finally:
            assoc.release()
        flood.wait(timeout=600)
        full = server.metric("cxr_monitor_dicom_stores_total", 'result="queue_full",source="FLOOD"')
        overloaded = server.metric("cxr_monitor_dicom_stores_total", 'result="overloaded",source="FLOOD"')
        queued = server.metric("cxr_monitor_dicom_stores_total", 'result="queued",source="FLOOD"')
        lat = np.array(latencies) * 1e3
        return {
            "flood_instances": len(files),
            "queued": queued,
            "queue_size": QUEUE,
            "queue_full_replies": full,
            "overloaded_replies": overloaded,
            "probe_sends": len(latencies),
            "probe_statuses": statuses,
            "probe_ack_ms": {
                "p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
                "p99": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
                "max": round(float(lat.max()), 1) if len(lat) else None,
            },
            "server_store_ack": server.ack_quantiles(),
        }
    finally:
        server.stop()


def _markdown(runs: list[dict[str, Any]]) -> str:
    lines = [
        "# DICOM storage node: throughput and C-STORE acknowledgement latency",
        "",
        "`benchmarks/bench_dicom_node.py`: dcmtk `storescu` sends the shared Philips CR (1955 x 1841, 15 bits)",
        "as JPEG 2000 and as uncompressed explicit VR little endian to `cxr-monitor serve --dicom-port`, on",
        "the same 2 cores as the server (shared machine). *Sustained*: instances / time until the last is",
        "scored. *Saturated*: a flood keeps the queue full while a probe times C-STORE round trips.",
        "",
    ]
    for i, run in enumerate(runs, 1):
        lines.append(f"## Run {i} ({run['date']}, load at start {run['machine']['load_at_start']})")
        if run.get("note"):
            lines.append(f"_{run['note']}_")
        lines += [
            "",
            "| server | instances | sustained inst/s | all acked (s) | all scored (s) | flood | queued | 0xA700 "
            "| probe ack p50 / p99 / max (ms) | probe statuses | server ack p50 / p99 <= (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for config, per_kind in run["results"].items():
            for kind, r in per_kind.items():
                s, f = r["sustained"], r["saturated"]
                a = f["probe_ack_ms"]
                lines.append(
                    f"| {config} | {kind} x {s['instances']} | {s['instances_per_s']} | {s['all_acknowledged_s']} | "
                    f"{s['all_scored_s']} | {f['flood_instances']} | {f['queued']:.0f} | "
                    f"{f['queue_full_replies'] + f.get('overloaded_replies', 0):.0f} | {a['p50']} / {a['p99']} / {a['max']} | "
                    f"{f['probe_statuses']} | {f['server_store_ack']['p50_le_s']} / "
                    f"{f['server_store_ack']['p99_le_s']} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=40, help="instances per sustained run (default: 40)")
    parser.add_argument(
        "--flood", type=int, default=200, help="instances per saturation flood (default: 200)"
    )
    parser.add_argument("--append", action="store_true", help="add this run to the existing results")
    parser.add_argument("--note", default=None, help="what this run measures, shown with it")
    args = parser.parse_args()
    if not SOURCE.is_file():
        print(f"error: shared data not found: {SOURCE}", file=sys.stderr)
        return 2
    if shutil.which("storescu") is None:
        print(
            "error: storescu not found (bash scripts/ensure-dicom-tools.sh installs dcmtk)", file=sys.stderr
        )
        return 2
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "pynetdicom": pynetdicom.__version__,
            "load_at_start": [round(x, 2) for x in os.getloadavg()],
            "storescu": subprocess.run(
                ["storescu", "--version"], capture_output=True, text=True
            ).stdout.splitlines()[0],
        },  # fmt: skip
        "results": {},
    }
    if args.note:
        result["note"] = args.note
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("j2k", "uncompressed"):
            files = _instances(kind, max(args.instances, args.flood), Path(tmp) / kind)
            probe = _instances(kind, 1, Path(tmp) / f"{kind}-probe")[0]
            # Configurations side by side for each kind, so that the machine's load drifts less between them.
            for config, processes in CONFIGS.items():
                r = result["results"].setdefault(config, {})
                r[kind] = {
                    "sustained": sustained(kind, files[: args.instances], processes),
                    "saturated": saturated(kind, files[: args.flood], probe, processes),
                }
                print(config, kind, json.dumps(r[kind]), flush=True)
            for f in files:
                f.unlink()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "dicom_node.json"
    runs = json.loads(path.read_text())["runs"] if args.append and path.is_file() else []
    runs.append(result)
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    (RESULTS / "dicom_node.md").write_text(_markdown(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
