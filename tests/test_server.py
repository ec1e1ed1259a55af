"""Tests for monitor.server: a real sidecar on 127.0.0.1 (port 0) with the bundled model."""

from __future__ import annotations

import io
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from prometheus_client import CollectorRegistry

from monitor.artifact import load_model
from monitor.client import ReliabilityClient, array_request, bytes_request
from monitor.defaults import default_model_dir
from monitor.engine import Engine
from monitor.errors import DeadlineExceededError, InvalidInputError
from monitor.model import ReliabilityModel
from monitor.proto import monitor_pb2 as pb
from monitor.proto import monitor_pb2_grpc as pb_grpc
from monitor.server import build_server
from monitor.server.servicer import SERVICE_NAME, _remaining
from monitor.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DICOMS = ("cxr_pa_monochrome2_jpeg.dcm", "cxr_pa_monochrome1_jpeg.dcm", "cxr_pa_cr_philips_j2k.dcm")
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_PIXELS = 4_000_000  # above the J2K DICOM (1955 x 1841 = 3.6 M), below a 2100 x 2000 array
GARBAGE = b"this is not an image, just text " * 8


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model() -> ReliabilityModel:
    return load_model(default_model_dir())


@pytest.fixture(scope="module")
def engine(model: ReliabilityModel) -> Engine:
    return Engine(model, max_pixels=MAX_PIXELS)


@pytest.fixture
def decoding_engine(model: ReliabilityModel) -> Iterator[Callable[..., Engine]]:
    """``decoding_engine(processes, **kw)``: an engine with decoder processes, closed after the test."""
    engines: list[Engine] = []

    def make(processes: int, **kw: object) -> Engine:
        engines.append(Engine(model, max_pixels=MAX_PIXELS, decode_processes=processes, **kw))  # type: ignore[arg-type]
        return engines[-1]

    yield make
    for e in engines:
        e.close()


def _settings(**kw: object) -> Settings:
    # In-thread decoding unless a test asks for processes: "auto" would depend on the machine.
    base = dict(host="127.0.0.1", port=0, metrics_port=0, workers=2, max_message_bytes=MAX_MESSAGE_BYTES,
                max_pixels=MAX_PIXELS, window_images=50, log_format="text", decode_processes=0)  # fmt: skip
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module", params=[0, 2], ids=["in-thread", "decode-processes"])
def sidecar(model: ReliabilityModel, request: pytest.FixtureRequest) -> Iterator[tuple]:
    """The end-to-end server, once decoding in the scoring threads and once in 2 processes
    (what ``--decode-processes auto`` gives on 2 CPUs)."""
    registry = CollectorRegistry()
    served = Engine(model, max_pixels=MAX_PIXELS, decode_processes=request.param)
    server, port = build_server(_settings(), served, registry=registry)
    server.start()
    yield server, f"127.0.0.1:{port}", registry, served
    server.stop(1)
    served.close()


@pytest.fixture(scope="module")
def client(sidecar: tuple) -> Iterator[ReliabilityClient]:
    with ReliabilityClient(sidecar[1], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def png_bytes(data_dir: Path) -> bytes:
    """One NIH radiograph re-encoded as PNG in memory."""
    image = Image.open(data_dir / "nih" / "images" / "00000075_000.webp")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    v = registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def _rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


# --------------------------------------------------------------------------- health, reflection


def test_health_serving_for_server_and_service(sidecar: tuple) -> None:
    with grpc.insecure_channel(sidecar[1]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        err = _rpc_error(stub.Check, health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert err.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_service(sidecar: tuple) -> None:
    with grpc.insecure_channel(sidecar[1]) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"cxrmonitor.v1.ReliabilityMonitor", "grpc.health.v1.Health"} <= names
    assert SERVICE_NAME == "cxrmonitor.v1.ReliabilityMonitor"


# --------------------------------------------------------------------------- Score, each input form


@pytest.mark.parametrize("name", DICOMS)
def test_score_dicom_matches_the_engine(
    client: ReliabilityClient, engine: Engine, data_dir: Path, name: str
) -> None:
    path = data_dir / "dicom" / name
    r = client.score_file(path, request_id=f"dicom-{name}")
    local = engine.score(path)
    assert r.request_id == f"dicom-{name}"
    assert not r.HasField("error")
    assert r.cluster == local.result.cluster
    assert r.failure_probability == pytest.approx(local.result.failure_probability, abs=1e-9)
    assert sum(r.memberships) == pytest.approx(1.0)
    assert r.reliability == pytest.approx(1 - r.failure_probability)
    assert r.failure_interval.lower <= r.cluster_failure_probability <= r.failure_interval.upper
    assert r.image.format == "dicom" and r.image.modality == "CR"
    assert (r.image.rows, r.image.columns) == (local.meta.rows, local.meta.columns)
    assert r.model_id == engine.model.model_id and r.spec_version == "2.0"
    assert len(r.top_features) == 3 and r.top_features[0].name in engine.model.feature_names
    t = r.timings
    assert min(t.decode_seconds, t.profile_seconds, t.score_seconds) > 0
    assert t.total_seconds >= t.decode_seconds + t.profile_seconds + t.score_seconds
    assert r.method == "cluster"


def test_score_png_sniffed_and_declared(client: ReliabilityClient, engine: Engine, png_bytes: bytes) -> None:
    sniffed = client.score_bytes(png_bytes)
    declared = client.score_bytes(png_bytes, format="png", name="chest.png")
    local = engine.score(png_bytes)
    for r in (sniffed, declared):
        assert r.image.format == "png" and (r.image.rows, r.image.columns) == (1024, 1024)
        assert r.cluster == local.result.cluster
        assert r.novelty == pytest.approx(local.result.novelty)
    assert len(sniffed.request_id) == 32  # made up by the server when none is sent
    assert declared.image.source.endswith("(chest.png)")


def test_declared_kind_that_does_not_match_is_invalid(client: ReliabilityClient, png_bytes: bytes) -> None:
    err = _rpc_error(client.score_bytes, png_bytes, format="dicom", request_id="wrong-kind")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("request wrong-kind")


def test_score_raw_uint16_array(client: ReliabilityClient, engine: Engine, data_dir: Path) -> None:
    pixels = engine.load(data_dir / "dicom" / "cxr_pa_monochrome2_jpeg.dcm").pixels
    arr = np.round((pixels - pixels.min()) / np.ptp(pixels) * 4095).astype(np.uint16)
    r = client.score_array(arr, request_id="raw-1", classifier_score=0.4)
    local = engine.score(arr, classifier_score=0.4)
    assert r.image.format == "array" and (r.image.rows, r.image.columns) == arr.shape
    assert r.cluster == local.result.cluster
    assert r.failure_probability == pytest.approx(local.result.failure_probability, abs=1e-9)
    assert r.method == local.result.method == "calibrated_score"


def test_big_endian_and_float_arrays_are_converted_by_the_client(client: ReliabilityClient) -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(256, 256)).cumsum(axis=0).cumsum(axis=1)
    r1 = client.score_array(base.astype(">f8"))
    r2 = client.score_array(base.astype("<f8"))
    assert r1.cluster == r2.cluster and r1.novelty == pytest.approx(r2.novelty)


# --------------------------------------------------------------------------- bad requests


def test_invalid_image_is_invalid_argument_and_the_server_goes_on(
    client: ReliabilityClient, sidecar: tuple, data_dir: Path
) -> None:
    registry = sidecar[2]
    before = _value(registry, "cxr_monitor_requests_total", method="Score", code="INVALID_ARGUMENT")
    err = _rpc_error(client.score_bytes, GARBAGE, request_id="junk-1")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        "request junk-1: not a readable image (no DICOM, PNG, JPEG, WebP or TIFF signature in the first bytes)"
    )
    ok = client.score_file(data_dir / "dicom" / DICOMS[0])
    assert ok.image.format == "dicom"
    after = _value(registry, "cxr_monitor_requests_total", method="Score", code="INVALID_ARGUMENT")
    assert after == before + 1


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.ScoreRequest(request_id="empty"), "request empty: no image (set either `encoded` or `array`)"),
        (
            pb.ScoreRequest(
                request_id="short",
                array=pb.PixelArray(shape=[100, 100], dtype=pb.DTYPE_UINT16, data=b"\0" * 100),
            ),  # fmt: skip
            "request short: array.data holds 100 bytes but shape [100, 100] of DTYPE_UINT16 needs 20000",
        ),
        (
            pb.ScoreRequest(request_id="nodtype", array=pb.PixelArray(shape=[100, 100], data=b"\0" * 100)),
            "request nodtype: array.dtype DTYPE_UNSPECIFIED is not supported",
        ),
        (
            pb.ScoreRequest(
                request_id="flat", array=pb.PixelArray(shape=[100], dtype=pb.DTYPE_UINT8, data=b"0" * 100)
            ),
            "request flat: array.shape [100] must be (rows, columns) or (rows, columns, channels)",
        ),
        (
            pb.ScoreRequest(request_id="score", classifier_score=1.5, encoded=pb.EncodedImage(data=GARBAGE)),
            "request score: classifier_score must be a probability in [0, 1]",
        ),
        (
            pb.ScoreRequest(request_id="empty-bytes", encoded=pb.EncodedImage(data=b"")),
            "request empty-bytes: empty input (0 bytes)",
        ),
    ],
)
def test_malformed_requests_name_the_problem(
    client: ReliabilityClient, request_: pb.ScoreRequest, message: str
) -> None:
    err = _rpc_error(client.score, request_)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(message)


def test_too_many_pixels_is_resource_exhausted(client: ReliabilityClient) -> None:
    err = _rpc_error(client.score_array, np.zeros((2100, 2000), dtype=np.uint8), request_id="huge")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4200000" in err.details().replace(",", "").replace("_", "") and "request huge" in err.details()


def test_message_above_max_message_bytes_is_resource_exhausted(
    client: ReliabilityClient, data_dir: Path
) -> None:
    err = _rpc_error(client.score_bytes, b"\0" * (MAX_MESSAGE_BYTES + 1024))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.score_file(data_dir / "dicom" / DICOMS[0]).image.format == "dicom"


def test_deadline_exceeded(client: ReliabilityClient, data_dir: Path) -> None:
    err = _rpc_error(client.score_file, data_dir / "dicom" / DICOMS[2], timeout=0.001)
    # The client's own timer (DEADLINE_EXCEEDED) or the server's admission, which refuses a call it
    # cannot serve in time (DEADLINE_EXCEEDED when even an idle server could not, else RESOURCE_EXHAUSTED).
    assert err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "deadline" in err.details().lower()
    assert client.score_file(data_dir / "dicom" / DICOMS[0]).image.format == "dicom"


@pytest.fixture(scope="module", params=[0, 1], ids=["in-thread", "one-decoder"])
def queued_sidecar(model: ReliabilityModel, request: pytest.FixtureRequest) -> Iterator[str]:
    """4 scoring threads in front of at most one decoder process: images wait for the decoder."""
    served = Engine(model, max_pixels=MAX_PIXELS, decode_processes=request.param)
    server, port = build_server(_settings(workers=4), served, registry=CollectorRegistry())
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(1)
    served.close()


@pytest.mark.parametrize("n_clients", [1, 4, 16])
def test_calls_without_a_deadline_succeed_at_every_concurrency(
    queued_sidecar: str, data_dir: Path, n_clients: int
) -> None:
    """gRPC's default is no deadline (grpc then reports ~9.2e18 s left): plain clients must be
    served, also when their image waits for a busy decoder (it overflowed ``Event.wait``)."""
    payload = (data_dir / "dicom" / DICOMS[2]).read_bytes()  # the slowest decode: callers queue
    per_client = 3
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        with grpc.insecure_channel(queued_sidecar) as channel:
            stub = pb_grpc.ReliabilityMonitorStub(channel)
            for j in range(per_client):
                try:
                    stub.Score(bytes_request(payload, request_id=f"nodeadline-{n_clients}-{i}-{j}"))
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                with lock:
                    codes.append(code)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert codes == [grpc.StatusCode.OK] * (n_clients * per_client)


def test_servicer_maps_grpc_no_deadline_to_none() -> None:
    class NoDeadline:
        def is_active(self) -> bool:
            return True

        def time_remaining(self) -> float:
            return 9.22337203505877e18  # what grpc 1.85 returns for a call without a deadline

    class Deadline:
        def is_active(self) -> bool:
            return True

        def time_remaining(self) -> float:
            return 2.5

    assert _remaining(NoDeadline())() is None
    assert _remaining(Deadline())() == 2.5


def test_handler_checks_the_deadline_before_decoding(sidecar: tuple, png_bytes: bytes) -> None:
    server = sidecar[0]
    with pytest.raises(DeadlineExceededError, match="request late: deadline exceeded before decoding"):
        server.handler.score(bytes_request(png_bytes, request_id="late"), lambda: 0.0, time.perf_counter())


def test_unexpected_exception_is_internal_and_logged(
    client: ReliabilityClient, sidecar: tuple, data_dir: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(sidecar[3], "score_profile", broken)  # both the in-thread and decode-process paths
    err = _rpc_error(client.score_file, data_dir / "dicom" / DICOMS[0])
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details().startswith("internal error in Score (server log reference ")
    ref = err.details().rsplit(" ", 1)[1].rstrip(")")
    logged = [r for r in caplog.records if getattr(r, "error_ref", None) == ref]
    assert logged and logged[0].exc_info[1].args == ("simulated bug",)
    monkeypatch.undo()
    assert client.score_file(data_dir / "dicom" / DICOMS[0]).image.format == "dicom"


# --------------------------------------------------------------------------- ScoreStream


def test_stream_keeps_order_and_survives_a_bad_item(
    client: ReliabilityClient, sidecar: tuple, data_dir: Path, png_bytes: bytes
) -> None:
    registry = sidecar[2]
    item_errors = _value(
        registry, "cxr_monitor_requests_total", method="ScoreStream/item", code="INVALID_ARGUMENT"
    )
    requests = [
        bytes_request((data_dir / "dicom" / DICOMS[0]).read_bytes(), request_id="s0"),
        bytes_request(GARBAGE, request_id="s1"),
        bytes_request((data_dir / "dicom" / DICOMS[2]).read_bytes(), request_id="s2"),
        array_request(np.full((128, 128), 7, dtype=np.uint8), request_id="s3"),  # constant: no spectrum
        bytes_request(png_bytes, request_id="s4"),
        bytes_request((data_dir / "dicom" / DICOMS[1]).read_bytes(), request_id="s5"),
    ]
    responses = list(client.score_stream(requests))
    assert [r.request_id for r in responses] == ["s0", "s1", "s2", "s3", "s4", "s5"]
    bad = {r.request_id: r.error for r in responses if r.HasField("error")}
    assert set(bad) == {"s1", "s3"}
    assert (
        bad["s1"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        and bad["s1"].code_name == "INVALID_ARGUMENT"
    )
    assert bad["s1"].message.startswith("request s1: not a readable image")
    assert bad["s3"].message == "request s3: image is constant (all pixels = 7)"
    assert [r.image.format for r in responses if not r.HasField("error")] == [
        "dicom",
        "dicom",
        "png",
        "dicom",
    ]
    after = _value(registry, "cxr_monitor_requests_total", method="ScoreStream/item", code="INVALID_ARGUMENT")
    assert after == item_errors + 2


def test_stream_ping_pong(client: ReliabilityClient, data_dir: Path) -> None:
    """A client that waits for each answer before sending the next must not deadlock."""
    outbox: queue.Queue = queue.Queue()

    def requests() -> Iterator[pb.ScoreRequest]:
        while (item := outbox.get()) is not None:
            yield item

    data = (data_dir / "dicom" / DICOMS[0]).read_bytes()
    outbox.put(bytes_request(data, request_id="p0"))
    seen = []
    for r in client.score_stream(requests(), timeout=60):
        seen.append(r.request_id)
        outbox.put(bytes_request(data, request_id=f"p{len(seen)}") if len(seen) < 3 else None)
    assert seen == ["p0", "p1", "p2"]


# --------------------------------------------------------------------------- outcomes, model info, metrics


def test_report_outcome_known_unknown_and_twice(
    client: ReliabilityClient, sidecar: tuple, data_dir: Path
) -> None:
    registry = sidecar[2]
    r = client.score_file(data_dir / "dicom" / DICOMS[1], request_id="outcome-1", classifier_score=0.9)
    c = str(r.cluster)
    before = _value(registry, "cxr_monitor_outcomes_total", cluster=c, outcome="failure")
    pred_before = _value(registry, "cxr_monitor_predicted_failures_with_outcome_total")
    o = client.report_outcome("outcome-1", failure=True)
    assert (o.cluster, o.failure) == (r.cluster, True)
    assert o.cluster_failure_probability == pytest.approx(r.cluster_failure_probability)
    assert o.cluster_failures >= 1 and o.cluster_outcomes >= o.cluster_failures
    assert _value(registry, "cxr_monitor_outcomes_total", cluster=c, outcome="failure") == before + 1
    assert _value(registry, "cxr_monitor_predicted_failures_with_outcome_total") == pytest.approx(
        pred_before + r.cluster_failure_probability
    )
    for window in ("count", "time"):
        realized = _value(registry, "cxr_monitor_drift_realized_failure_ratio", window=window)
        assert 0 < realized <= 1

    err = _rpc_error(client.report_outcome, "outcome-1", failure=False)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    err = _rpc_error(client.report_outcome, "never-scored", failure=True)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "request id 'never-scored' is unknown" in err.details()


def test_report_outcome_from_label_and_score(
    client: ReliabilityClient, engine: Engine, data_dir: Path
) -> None:
    threshold = engine.model.card["fit_data"]["threshold"]
    client.score_file(data_dir / "dicom" / DICOMS[0], request_id="lab-1", classifier_score=threshold + 0.1)
    # Positive decision, true label 0: the classifier was wrong; the score comes from the Score request.
    assert client.report_outcome("lab-1", label=0).failure is True
    client.score_file(data_dir / "dicom" / DICOMS[0], request_id="lab-2")
    assert client.report_outcome("lab-2", label=0, score=threshold / 2).failure is False
    client.score_file(data_dir / "dicom" / DICOMS[0], request_id="lab-3")
    err = _rpc_error(client.report_outcome, "lab-3", label=1)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "labelled.score is missing" in err.details()


def test_model_info_matches_the_model(client: ReliabilityClient, engine: Engine) -> None:
    info = client.model_info()
    m = engine.model
    rates = m.rates.to_json()
    assert info.model_id == m.model_id and info.spec_version == "2.0"
    assert len(info.clusters) == m.n_clusters
    for c, row, share in zip(info.clusters, rates["clusters"], m.reference_mix, strict=True):
        assert (c.cluster, c.n_images, c.n_failures, c.blind_spot) == (
            row["cluster"], row["n_images"], row["n_failures"], row["blind_spot"],
        )  # fmt: skip
        assert c.rate == pytest.approx(row["rate"]) and c.interval.upper == pytest.approx(row["upper"])
        assert c.reference_share == pytest.approx(share)
    assert info.threshold == pytest.approx(m.card["fit_data"]["threshold"])
    assert info.calibrated == (m.calibrator is not None)
    assert list(info.feature_names) == list(m.feature_names)
    assert info.drift_thresholds.min_images == m.drift_thresholds.min_images
    # Every threshold of the model is visible over gRPC, the per-feature ones included.
    shown = {f.name for f in info.drift_thresholds.DESCRIPTOR.fields}
    assert shown == set(m.drift_thresholds.to_dict())
    assert info.drift_thresholds.feature_alpha == pytest.approx(m.drift_thresholds.feature_alpha)
    assert info.drift_thresholds.feature_shift_min == pytest.approx(m.drift_thresholds.feature_shift_min)
    assert info.reference.novelty_rate == pytest.approx(m.reference_novelty_rate)
    assert json.loads(info.card_json)["model_id"] == m.model_id
    assert info.window_images == 50


REQUIRED_METRICS = (
    "cxr_monitor_requests_total", "cxr_monitor_request_duration_seconds_bucket",
    "cxr_monitor_stage_duration_seconds_bucket", "cxr_monitor_image_size_bytes_bucket",
    "cxr_monitor_image_pixels_bucket", "cxr_monitor_reliability_ratio_bucket",
    "cxr_monitor_failure_probability_ratio_bucket", "cxr_monitor_images_scored_total",
    "cxr_monitor_cluster_assignments_total", "cxr_monitor_blind_spot_images_total",
    "cxr_monitor_novel_images_total", "cxr_monitor_predicted_failures_total", "cxr_monitor_outcomes_total",
    "cxr_monitor_predicted_failures_with_outcome_total", "cxr_monitor_reference_cluster_ratio",
    "cxr_monitor_info", "cxr_monitor_inflight_requests", "cxr_monitor_model_loaded", "cxr_monitor_drift_psi",
    "cxr_monitor_drift_js_distance", "cxr_monitor_drift_chi2_p_value", "cxr_monitor_drift_novelty_ratio",
    "cxr_monitor_drift_estimated_failure_ratio", "cxr_monitor_drift_realized_failure_ratio",
    "cxr_monitor_drift_max_feature_shift", "cxr_monitor_drift_window_images", "cxr_monitor_drift_detected",
)  # fmt: skip


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _sample(text: str, name: str, labels: str = "") -> float:
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, (prefix, lines)
    return float(lines[0].split()[-1])


def test_metrics_over_http(sidecar: tuple, client: ReliabilityClient, engine: Engine, data_dir: Path) -> None:
    server = sidecar[0]
    before = _scrape(server.metrics_port)
    r = client.score_file(data_dir / "dicom" / DICOMS[0], request_id="metrics-secret-id-42")
    text = _scrape(server.metrics_port)
    for name in REQUIRED_METRICS:
        assert any(line.startswith(name) for line in text.splitlines()), name
    assert (
        _sample(text, "cxr_monitor_images_scored_total")
        == _sample(before, "cxr_monitor_images_scored_total") + 1
    )
    assert _sample(text, "cxr_monitor_requests_total", 'code="OK",method="Score"') >= 1
    assert _sample(text, "cxr_monitor_model_loaded") == 1
    assert f'model_id="{engine.model.model_id}"' in text and 'spec_version="2.0"' in text
    for c in range(engine.model.n_clusters):
        assert f'cxr_monitor_cluster_assignments_total{{cluster="{c}"}}' in text
        assert f'cxr_monitor_reference_cluster_ratio{{cluster="{c}"}}' in text
    assert _sample(text, "cxr_monitor_drift_window_images", 'window="count"') >= 1
    assert _sample(text, "cxr_monitor_stage_duration_seconds_count", 'stage="profile"') >= 1
    assert "metrics-secret-id-42" not in text and r.request_id not in text and "request_id" not in text
    labels = {part.split("=")[0] for line in text.splitlines() if "{" in line and not line.startswith("#")
              for part in line[line.index("{") + 1 : line.index("}")].split(",") if part}  # fmt: skip
    # component: 4 drift components; feature: the model's fixed feature names; threshold: the drift thresholds.
    assert labels <= {"method", "code", "stage", "le", "cluster", "outcome", "window", "source", "model_id", "spec_version", "reason",
                      "version", "kind", "field", "result", "component", "feature", "threshold"}  # fmt: skip
    features = {line.split('feature="')[1].split('"')[0] for line in text.splitlines() if 'feature="' in line}
    assert features <= set(engine.model.feature_names)


# --------------------------------------------------------------------------- lifecycle


def test_not_serving_until_the_model_is_attached_then_overload(engine: Engine, data_dir: Path) -> None:
    server, port = build_server(
        _settings(max_concurrent_rpcs=1, metrics_port=-1), registry=CollectorRegistry()
    )
    server.start()
    address = f"127.0.0.1:{port}"
    data = (data_dir / "dicom" / DICOMS[0]).read_bytes()
    try:
        with ReliabilityClient(address, timeout=30) as client:
            assert client.health() == "NOT_SERVING" and client.health(SERVICE_NAME) == "NOT_SERVING"
            err = _rpc_error(client.score_bytes, data)
            assert (
                err.code() == grpc.StatusCode.FAILED_PRECONDITION
                and "model is still loading" in err.details()
            )
            server.attach(engine)
            assert client.health() == "SERVING"

            # An image in flight takes the only place: a second scoring call is turned away at once.
            holder = server.handler.admission.admit(0, 0, None, "holder")
            err = _rpc_error(client.score_bytes, data)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server overloaded" in err.details() and "max_concurrent_rpcs=1" in err.details()
            assert client.model_info().model_id == engine.model.model_id  # not a scoring call
            stream = list(client.score_stream(iter([bytes_request(data, request_id="shed-item")])))
            assert (
                stream[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            )  # an error item, not a broken stream
            assert (
                server.registry.get_sample_value("cxr_monitor_shed_requests_total", {"reason": "in_flight"})
                == 2
            )
            holder.done()
            assert client.score_bytes(data).image.format == "dicom"
    finally:
        server.stop(1)


def test_short_client_deadlines_never_kill_a_decoder(
    decoding_engine: Callable[..., Engine], data_dir: Path
) -> None:
    """Issue 9, defect 1: a caller whose deadline expires mid-decode used to get its decoder
    process killed and respawned, collapsing everyone's throughput."""
    served = decoding_engine(1)
    server, port = build_server(_settings(metrics_port=-1, workers=2), served, registry=CollectorRegistry())
    server.start()
    payload = (data_dir / "dicom" / DICOMS[2]).read_bytes()  # 150+ ms to decode
    try:
        with ReliabilityClient(f"127.0.0.1:{port}") as client:
            before = served.decoder_pids()
            codes = []
            for i in range(6):
                try:
                    client.score_bytes(payload, request_id=f"hurry-{i}", timeout=0.02)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
            assert set(codes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert client.score_bytes(payload, request_id="patient").image.format == "dicom"
            assert served.decoder_pids() == before and served.stuck_decoder_kills == 0
    finally:
        server.stop(1)


def test_memory_budget_sheds_what_does_not_fit(engine: Engine, png_bytes: bytes) -> None:
    """Issue 9, defect 3: decoded pixels count before decoding (from the header)."""
    registry = CollectorRegistry()
    server, port = build_server(
        _settings(metrics_port=-1, memory_budget_bytes=8 * 2**20), engine, registry=registry
    )
    server.start()
    try:
        with ReliabilityClient(f"127.0.0.1:{port}", timeout=60) as client:
            err = _rpc_error(client.score_bytes, png_bytes, request_id="big")  # 1024 x 1024: ~13 MiB
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert re.match(
                r"request big: the image needs about \d+ MiB to decode and profile", err.details()
            )
            assert "memory budget (8 MiB, --memory-budget-bytes)" in err.details()
            assert registry.get_sample_value("cxr_monitor_shed_requests_total", {"reason": "memory"}) == 1
            small = np.ones((256, 256), np.float32) + np.eye(256, dtype=np.float32)
            assert client.score_array(small, request_id="small").cluster >= 0  # the server goes on
    finally:
        server.stop(1)


def test_an_idle_decoder_process_does_not_keep_a_large_message(
    decoding_engine: Callable[..., Engine],
) -> None:
    """After a 40 MiB request the child used to hold it until its next image."""
    served = decoding_engine(1)
    served.warm_up()
    (pid,) = served.decoder_pids()

    def rss() -> int:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    with pytest.raises(InvalidInputError, match="not a readable image"):
        served.score(b"junk" * (10 * 2**20), name="junk")
    assert served.decoder_pids() == [pid]
    end = time.monotonic() + 30  # the child lets go of it just after replying
    while rss() - before >= 20 * 2**20:
        assert time.monotonic() < end, f"the idle child holds {(rss() - before) / 2**20:.0f} MiB more"
        time.sleep(0.05)


def test_a_decode_over_the_time_limit_is_resource_exhausted_and_the_server_goes_on(
    decoding_engine: Callable[..., Engine], data_dir: Path
) -> None:
    # A 1 ms limit: any JPEG 2000 decode (150+ ms) overruns it, as a decoder stuck on a hostile file would.
    served = decoding_engine(1, decode_timeout=0.001)
    server, port = build_server(_settings(metrics_port=-1), served, registry=CollectorRegistry())
    server.start()
    try:
        with ReliabilityClient(f"127.0.0.1:{port}", timeout=120) as client:
            (before,) = served.decoder_pids()
            err = _rpc_error(client.score_file, data_dir / "dicom" / DICOMS[2], request_id="slow")
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.details().startswith(
                "request slow (cxr_pa_cr_philips_j2k.dcm): decoding and profiling took"
            )
            assert "took longer than 0.001 s (--decode-timeout)" in err.details()
            assert served.stuck_decoder_kills == 1
            end = time.monotonic() + 30
            while served.decoder_pids() == [before]:  # killed and replaced
                assert time.monotonic() < end
                time.sleep(0.01)
            assert (
                client.score_array(np.ones((64, 64), np.float32) + np.eye(64, dtype=np.float32)).cluster >= 0
            )
    finally:
        server.stop(1)
    status = server.health.Check(health_pb2.HealthCheckRequest(service=""), None).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_numeric_core_never_imports_grpc_or_prometheus() -> None:
    code = (
        "import sys\n"
        "import monitor.imaging, monitor.spectrum, monitor.clustering, monitor.reliability, monitor.drift\n"
        "import monitor.model, monitor.artifact, monitor.engine, monitor.settings\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'prometheus_client'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""


def test_cli_parser_does_not_import_grpc() -> None:
    code = "import sys, monitor.cli as c; c.build_parser(); print('grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def _read_port(proc: subprocess.Popen, deadline: float) -> int:
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        doc = json.loads(line)
        if doc["msg"] == "listening":
            return int(doc["port"])
    raise AssertionError(f"the server did not report its port (exit {proc.poll()})")


def test_sigterm_graceful_shutdown_finishes_in_flight_work(data_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "CXR_MONITOR_GRACE_SECONDS": "20", "CXR_MONITOR_WORKERS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
         "--log-format", "json"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        address = f"127.0.0.1:{_read_port(proc, deadline)}"
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        data = (data_dir / "dicom" / DICOMS[0]).read_bytes()
        with ReliabilityClient(address, timeout=60) as client:
            while client.health() != "SERVING":
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
            outbox: queue.Queue = queue.Queue()
            stream = client.score_stream(iter(outbox.get, None))
            outbox.put(bytes_request(data, request_id="before"))
            assert next(stream).request_id == "before"

            proc.send_signal(signal.SIGTERM)
            with ReliabilityClient(address) as probe:  # wait until the server has begun shutting down
                while True:
                    try:
                        if probe.health(timeout=2) == "NOT_SERVING":
                            break
                    except grpc.RpcError as exc:
                        # New calls during shutdown may be refused in any of these ways.
                        assert exc.code() in (
                            grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.CANCELLED,
                        )
                        break
                    time.sleep(0.05)
            # The stream was in flight when SIGTERM came: it may still send and be answered.
            outbox.put(bytes_request(data, request_id="after"))
            late = next(stream)
            assert late.request_id == "after" and not late.HasField("error")
            outbox.put(None)
            assert list(stream) == []
        assert proc.wait(timeout=60) == 0
        messages = [json.loads(line)["msg"] for line in lines if line.startswith("{")]
        assert "received SIGTERM" in messages and "shutting down" in messages and messages[-1] == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_nan_classifier_score_means_unknown(client: ReliabilityClient, data_dir: Path) -> None:
    r = client.score_file(data_dir / "dicom" / DICOMS[0], classifier_score=math.nan)
    assert r.method == "cluster" and r.failure_probability == pytest.approx(r.cluster_failure_probability)


def test_json_log_lines_carry_extra_fields_and_tracebacks() -> None:
    import logging

    from monitor.server.logs import JsonFormatter

    record = logging.LogRecord(
        "cxr_monitor.server", logging.ERROR, __file__, 1, "Score %s", ("INTERNAL",), None
    )
    record.method, record.seconds, record.metadata = "Score", float("nan"), {"site": "A"}
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    doc = json.loads(JsonFormatter().format(record))
    assert (doc["level"], doc["logger"], doc["msg"]) == ("ERROR", "cxr_monitor.server", "Score INTERNAL")
    assert doc["method"] == "Score" and doc["seconds"] is None and doc["metadata"] == {"site": "A"}
    assert doc["ts"].endswith("+00:00") and "ValueError: boom" in doc["exc"]
    assert "args" not in doc and "levelno" not in doc


def test_decode_processes_score_the_same_and_survive_a_dead_decoder(
    engine: Engine, decoding_engine: Callable[..., Engine], data_dir: Path
) -> None:
    served = decoding_engine(1)
    server, port = build_server(_settings(metrics_port=-1), served, registry=CollectorRegistry())
    server.start()
    path = data_dir / "dicom" / DICOMS[2]
    try:
        with ReliabilityClient(f"127.0.0.1:{port}", timeout=120) as client:
            r = client.score_file(path)
            local = engine.score(path)
            assert r.cluster == local.result.cluster
            assert r.novelty == pytest.approx(local.result.novelty)
            # Profiled in the child with the same plan heuristics: the same bits, the same score.
            assert r.reliability == local.result.reliability
            err = _rpc_error(client.score_bytes, GARBAGE, request_id="child")
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # the child's MonitorError came back intact
            assert err.details().startswith("request child: not a readable image")

            (pid,) = served.decoder_pids()
            os.kill(pid, signal.SIGKILL)  # as if a decoder had crashed on a hostile file
            assert client.score_file(path).cluster == local.result.cluster  # retried on a fresh pool
            assert served.decoder_pids() != [pid]
    finally:
        server.stop(1)
