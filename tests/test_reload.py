"""Hot reload: MonitorServer.reload (what SIGHUP calls) swaps models while serving."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from sklearn.base import clone

from monitor.artifact import load_model, save_model
from monitor.client import ReliabilityClient, array_request, bytes_request
from monitor.defaults import default_model_dir
from monitor.engine import Engine
from monitor.server import build_server
from monitor.settings import Settings

REPO = Path(__file__).resolve().parents[1]
IMAGE = np.random.default_rng(1).integers(0, 256, (256, 256), dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model with other failure rates: another model id, same clusters."""
    model = load_model(default_model_dir())
    hard = np.array([r["cluster"] for r in model.fit_records])
    failures = np.random.default_rng(0).integers(0, 2, hard.size)
    rates = clone(model.rates).fit(hard, failures)
    b = dataclasses.replace(model, rates=rates, card=dict(model.card))
    b.card["model_id"] = b.fingerprint()
    out = tmp_path_factory.mktemp("model-b")
    save_model(b, out)
    return out


@pytest.fixture()
def sidecar(tmp_path: Path) -> Iterator[tuple]:
    registry = CollectorRegistry()
    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, workers=2, decode_processes=0,
                        log_format="text", window_images=20, store=str(tmp_path / "o.sqlite"))  # fmt: skip
    server, port = build_server(settings, Engine.from_directory(default_model_dir()), registry=registry)
    server.start()
    with ReliabilityClient(f"127.0.0.1:{port}", timeout=60) as client:
        yield server, client, registry
    server.stop(1)


def _info_model_id(registry: CollectorRegistry, model_id: str) -> float | None:
    return registry.get_sample_value("cxr_monitor_info", {"model_id": model_id, "spec_version": "1.0",
                                                          "version": "0.1.0"})  # fmt: skip


def test_reload_swaps_the_model_metrics_and_windows(sidecar: tuple, model_b: Path) -> None:
    server, client, registry = sidecar
    old_id = client.model_info().model_id
    new_id = load_model(model_b).model_id
    assert new_id != old_id
    before = client.score(array_request(IMAGE, request_id="before"))
    assert before.model_id == old_id
    assert registry.get_sample_value("cxr_monitor_drift_window_images", {"window": "count"}) == 1

    assert server.reload(model_b) is True
    assert client.model_info().model_id == new_id
    assert client.score(array_request(IMAGE, request_id="after")).model_id == new_id
    labels = registry.get_sample_value  # the Info metric's labels name the served model
    samples = [s for m in registry.collect() if m.name == "cxr_monitor" for s in m.samples]
    assert [s.labels["model_id"] for s in samples] == [new_id]
    assert labels("cxr_monitor_model_reloads_total", {"result": "loaded"}) == 1
    # Drift windows are per model: they restart with the new one (only "after" is in them).
    assert registry.get_sample_value("cxr_monitor_drift_window_images", {"window": "count"}) == 1
    # A request scored by the old model can still get its outcome, tallied for the old model.
    r = client.report_outcome("before", failure=True)
    assert r.cluster == before.cluster and r.cluster_outcomes == 1
    assert sum(c.outcomes_reported for c in client.model_info().clusters) == 0


@pytest.mark.parametrize("damage", ["tampered", "missing", "empty"])
def test_a_bad_model_is_refused_and_the_old_one_keeps_serving(
    sidecar: tuple, model_b: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    server, client, registry = sidecar
    old_id = client.model_info().model_id
    bad = tmp_path / "bad"
    shutil.copytree(model_b, bad)
    if damage == "tampered":
        doc = json.loads((bad / "model.json").read_text())
        doc["failure_rates"]["global_rate"] = 0.99
        (bad / "model.json").write_text(json.dumps(doc))
        expected = "sha256"
    elif damage == "missing":
        shutil.rmtree(bad)
        expected = "bad"
    else:  # an empty folder, e.g. a model not yet copied in
        shutil.rmtree(bad)
        bad.mkdir()
        expected = "manifest.json is missing"
    with caplog.at_level(logging.ERROR, logger="cxr_monitor.server"):
        assert server.reload(bad) is False
    refused = [r for r in caplog.records if r.getMessage().startswith("model reload refused")]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR and expected in refused[0].getMessage()
    assert registry.get_sample_value("cxr_monitor_model_reloads_total", {"result": "refused"}) == 1
    assert client.model_info().model_id == old_id
    assert client.score(array_request(IMAGE)).model_id == old_id


def test_calls_in_flight_finish_on_the_old_model(sidecar: tuple, model_b: Path) -> None:
    server, client, _ = sidecar
    old_engine = server.handler.engine
    old_id = client.model_info().model_id
    entered, release = threading.Event(), threading.Event()
    real = old_engine.score

    def held(*args, **kwargs):  # hold the call mid-scoring until the swap is done
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    old_engine.score = held
    result: dict = {}
    call = threading.Thread(
        target=lambda: result.update(r=client.score(array_request(IMAGE, request_id="slow")))
    )
    call.start()
    assert entered.wait(30)
    assert server.reload(model_b) is True
    new_id = client.score(array_request(IMAGE)).model_id  # new calls: the new model, while "slow" waits
    release.set()
    call.join(30)
    assert result["r"].model_id == old_id and new_id != old_id
    assert client.report_outcome("slow", failure=False).request_id == "slow"


def test_sighup_reloads_the_model_directory_and_refuses_a_broken_one(tmp_path: Path, model_b: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
         "--log-format", "json", "--workers", "1", "--decode-processes", "1", "--model", str(model)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO, env=dict(os.environ),
    )  # fmt: skip
    lines: list[dict] = []
    port: list[int] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            doc = json.loads(line)
            lines.append(doc)
            if doc["msg"] == "listening":
                port.append(int(doc["port"]))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 120

    def wait_for(condition) -> None:
        while not condition():
            assert time.monotonic() < deadline and proc.poll() is None, lines[-3:]
            time.sleep(0.1)

    try:
        wait_for(lambda: port)
        with ReliabilityClient(f"127.0.0.1:{port[0]}", timeout=30) as client:
            wait_for(lambda: client.health() == "SERVING")
            old_id = client.model_info().model_id
            for name in ("model.json", "arrays.npz", "manifest.json"):
                shutil.copy(model_b / name, model / name)
            proc.send_signal(signal.SIGHUP)
            new_id = load_model(model_b).model_id
            wait_for(lambda: client.model_info().model_id == new_id)
            # Logged just after the swap, and read from stderr by another thread: wait for it.
            wait_for(
                lambda: any(d["msg"] == "model reloaded" and d["previous_model_id"] == old_id for d in lines)
            )
            # Encoded images go to the new engine's decoder process; the old one's is closed.
            assert client.score(bytes_request(_png(IMAGE))).model_id == new_id
            wait_for(lambda: any(d["msg"] == "previous model closed" for d in lines))

            (model / "arrays.npz").write_bytes(b"truncated")
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: any(d["msg"].startswith("model reload refused") for d in lines))
            refused = next(d for d in lines if d["msg"].startswith("model reload refused"))
            assert refused["level"] == "ERROR" and "arrays.npz" in refused["msg"]
            assert client.model_info().model_id == new_id
            assert client.score(array_request(IMAGE)).model_id == new_id
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
