"""Durable outcomes (serve --store) across kill -9, and the refit from the store.

The kill -9 test spawns ``cxr-monitor serve`` as a subprocess on a store file, like
production, and kills it at random points while outcomes are being reported.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from monitor.artifact import load_model
from monitor.cli import main
from monitor.client import ReliabilityClient, array_request, file_request
from monitor.fitting import fit_folder
from monitor.refit import refit_from_store
from monitor.server import build_server
from monitor.settings import Settings

REPO = Path(__file__).resolve().parents[1]
# Restarts, each killed at a random point while outcomes are being reported (more: benchmarks/kill9_durability.py).
KILL_ROUNDS = int(os.environ.get("CXR_MONITOR_TEST_KILL_ROUNDS", "4"))
PER_ROUND = 40  # = the 40 in benchmarks/kill9_durability.py


def _serve(
    store: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str, list[str]]:
    """Start ``cxr-monitor serve --store`` on a free port; returns the process, its address, its log lines."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
         "--log-format", "json", "--workers", "1", "--decode-processes", "0", "--store", str(store), *args],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    port = None
    while port is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        doc = json.loads(line)
        if doc["msg"] == "listening":
            port = int(doc["port"])
    if port is None:
        proc.kill()
        raise AssertionError(f"the server did not report its port (exit {proc.poll()}): {lines[-3:]}")
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    address = f"127.0.0.1:{port}"
    with ReliabilityClient(address) as client:
        while client.health() != "SERVING":
            assert time.monotonic() < deadline and proc.poll() is None, lines[-3:]
            time.sleep(0.1)
    return proc, address, lines


def _stored_outcomes(store: Path) -> dict[str, tuple[int, int]]:
    con = sqlite3.connect(store)
    try:
        rows = con.execute("SELECT request_id, failure, cluster FROM predictions WHERE failure IS NOT NULL")
        return {rid: (f, c) for rid, f, c in rows}
    finally:
        con.close()


def test_acknowledged_outcomes_survive_kill_9_at_random_points(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("CXR_MONITOR_TEST_KILL_SEED", "9")))
    store = tmp_path / "state" / "outcomes.sqlite"
    image = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    acked: dict[str, tuple[bool, int]] = {}  # request id -> (failure, cluster) the server acknowledged
    unreported: list[str] = []  # scored before an acknowledged outcome, never reported
    per_round = []
    for round_ in range(KILL_ROUNDS + 1):
        proc, address, _ = _serve(store)
        try:
            with ReliabilityClient(address, timeout=30) as client:
                # Everything acknowledged before the last kill is there...
                for rid, (failure, _) in acked.items():
                    with pytest.raises(grpc.RpcError) as info:
                        client.report_outcome(rid, failure=failure)
                    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS, rid
                # ...the tallies are restored (acknowledged ones, plus any committed whose reply was lost)...
                stored = _stored_outcomes(store)
                assert set(acked) <= set(stored)
                assert all(stored[rid] == (int(f), c) for rid, (f, c) in acked.items())
                info = client.model_info()
                restored = {c.cluster: (c.outcomes_reported, c.failures_reported) for c in info.clusters}
                expected = Counter(c for _, c in stored.values())
                expected_f = Counter(c for f, c in stored.values() if f)
                assert restored == {c: (expected[c], expected_f[c]) for c in restored}
                if round_ == KILL_ROUNDS:
                    break
                # ...and requests scored before the kill can still get their outcome.
                for rid in unreported[:3]:
                    r = client.report_outcome(rid, failure=False)
                    acked[rid] = (False, r.cluster)
                del unreported[:3]
                ids = [f"r{round_}-{i}" for i in range(PER_ROUND)]
                for rid in ids:
                    client.score(array_request(image, request_id=rid))
                done: list[str] = []

                def report(ids: list[str] = ids, done: list[str] = done) -> None:
                    for i, rid in enumerate(ids):
                        try:
                            r = client.report_outcome(rid, failure=i % 3 == 0)
                        except grpc.RpcError:
                            return  # killed mid-call: not acknowledged
                        acked[rid] = (i % 3 == 0, r.cluster)
                        done.append(rid)

                reporter = threading.Thread(target=report)
                reporter.start()
                time.sleep(rng.uniform(0.0, 0.12))
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                reporter.join(timeout=60)
                per_round.append(len(done))
                if done:  # the predictions were queued before the first acknowledged outcome
                    unreported.extend(ids[len(done) + 1 :])
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # One JSON line for benchmarks/kill9_durability.py (run with -s); every check above passed.
    print(
        json.dumps({"kill9_rounds": per_round, "acknowledged": len(acked), "found_after_restart": len(acked)})
    )
    assert sum(per_round) > 0  # the kills did not all come before the first outcome


@pytest.fixture(scope="module")
def nih_fit(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    """A model fitted by `fit` on 60 NIH images with their real CheXNet outcomes (label + score)."""
    rows = list(csv.DictReader((data_dir / "nih" / "labels.csv").open()))[:60]
    tmp = tmp_path_factory.mktemp("refit")
    table = tmp / "outcomes.csv"
    findings = [c for c in rows[0] if c.startswith("chexnet_")]
    with table.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "score"])
        for r in rows:
            w.writerow(
                [r["image"], int(r["findings"] != "No Finding"), f"{max(float(r[c]) for c in findings):.6f}"]
            )
    fit_folder(data_dir / "nih" / "images", table, tmp / "model", n_clusters=3, seed=0)
    with table.open() as fh:
        outcomes = list(csv.DictReader(fh))
    return tmp / "model", data_dir / "nih" / "images", outcomes


def test_refit_from_a_replayed_store_gives_the_rates_of_fit(nih_fit, tmp_path: Path, capsys) -> None:
    model_dir, images, outcomes = nih_fit
    fitted = load_model(model_dir)
    store = tmp_path / "outcomes.sqlite"
    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, workers=1, decode_processes=0,
                        log_format="text", model=model_dir, store=str(store))  # fmt: skip
    from monitor.engine import Engine

    server, port = build_server(settings, Engine.from_directory(model_dir), registry=CollectorRegistry())
    server.start()
    try:
        with ReliabilityClient(f"127.0.0.1:{port}", timeout=60) as client:
            for i, row in enumerate(outcomes):  # in table order, one at a time: the fit's row order
                rid = f"{i:04d}"
                client.score(file_request(images / row["image"], request_id=rid))
                # The label and classifier score, as a hospital would report them; the server
                # derives the failure with the model's threshold, as `fit` did.
                client.report_outcome(rid, label=int(row["label"]), score=float(row["score"]))
    finally:
        server.stop(1)

    report = refit_from_store(fitted, store)
    assert report.n_rows == len(outcomes) and report.model_ids == {fitted.model_id: len(outcomes)}
    np.testing.assert_array_equal(report.model.rates.counts_, fitted.rates.counts_)
    np.testing.assert_array_equal(report.model.rates.failures_, fitted.rates.failures_)
    np.testing.assert_array_equal(report.model.rates.rate_, fitted.rates.rate_)
    np.testing.assert_array_equal(report.model.rates.blind_spot_, fitted.rates.blind_spot_)
    assert report.model.model_id == fitted.model_id  # same clusters, same rates: same fingerprint

    # Clusters refit too (same hyperparameters and seed, same rows in the same order): the same model.
    both = refit_from_store(fitted, store, refit_clusters=True)
    assert both.model.n_clusters == fitted.n_clusters
    np.testing.assert_allclose(both.model.rates.rate_, fitted.rates.rate_)
    np.testing.assert_array_equal(both.model.rates.counts_, fitted.rates.counts_)

    # The command writes a loadable model and reports the same rates.
    out = tmp_path / "refit"
    assert (
        main(["refit", "--from-store", str(store), "--model", str(model_dir), "--out", str(out), "--json"])
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["n_rows"] == len(outcomes) and doc["refit_clusters"] is False
    np.testing.assert_allclose(doc["rates"], fitted.rates.rate_)
    assert load_model(out).card["refit"]["n_rows"] == len(outcomes)


def test_refit_with_no_usable_rows_is_a_clear_error(tmp_path: Path) -> None:
    from monitor.defaults import default_model_dir
    from monitor.store import OutcomeStore

    OutcomeStore(tmp_path / "empty.sqlite").close()
    code = main(["refit", "--from-store", str(tmp_path / "empty.sqlite"), "--model", str(default_model_dir()),
                 "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 3 and not (tmp_path / "out").exists()
