"""Tests for monitor.client and the `cxr-monitor health|client` commands against a loopback sidecar."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from monitor.cli import main
from monitor.client import ReliabilityClient, array_request, bytes_request, file_request, to_dict
from monitor.defaults import default_model_dir
from monitor.engine import Engine
from monitor.proto import monitor_pb2 as pb
from monitor.server import build_server
from monitor.settings import Settings

DICOM = "cxr_pa_monochrome2_jpeg.dcm"


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    engine = Engine.from_directory(default_model_dir())
    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, workers=2, log_format="text")
    server, port = build_server(settings, engine, registry=CollectorRegistry())
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(1)


@pytest.fixture
def free_address() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_request_builders() -> None:
    r = bytes_request(
        b"abc", format="JPG", name="x.jpg", request_id="id", classifier_score=0.25, metadata={"site": 3}
    )
    assert r.encoded.format == pb.IMAGE_FORMAT_JPEG and r.encoded.name == "x.jpg"
    assert (r.request_id, r.classifier_score, dict(r.metadata)) == ("id", 0.25, {"site": "3"})
    assert not bytes_request(b"abc").HasField("classifier_score")
    a = array_request(np.arange(12, dtype=">u2").reshape(3, 4))
    assert (list(a.array.shape), a.array.dtype) == ([3, 4], pb.DTYPE_UINT16)
    assert np.array_equal(np.frombuffer(a.array.data, "<u2"), np.arange(12))
    with pytest.raises(ValueError, match="format must be one of"):
        bytes_request(b"abc", format="gif")
    with pytest.raises(ValueError, match="array dtype complex128 is not supported"):
        array_request(np.zeros((2, 2), dtype=complex))


def test_client_api_round_trip(address: str, data_dir: Path) -> None:
    path = data_dir / "dicom" / DICOM
    with ReliabilityClient(address, timeout=60) as client:
        assert client.health() == "SERVING"
        r = client.score_file(path, metadata={"site": "A"})
        assert r.image.format == "dicom"
        d = to_dict(r)
        assert d["request_id"] == r.request_id and d["image"]["rows"] == 1024 and "error" not in d
        streamed = list(client.score_stream([path, file_request(path, request_id="req")]))
        assert [s.request_id == "req" for s in streamed] == [False, True]
        assert client.report_outcome(r.request_id, failure=False).failure is False
        assert client.model_info().clusters[r.cluster].outcomes_reported >= 1
        with pytest.raises(ValueError, match="give failure=True/False or label=0/1"):
            client.report_outcome(r.request_id)


def test_cli_client_score_json(address: str, data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(
        ["client", "score", "--address", address, str(data_dir / "dicom" / DICOM), "--score", "0.5", "--json"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out)
    assert (
        doc["path"].endswith(DICOM)
        and doc["image"]["format"] == "dicom"
        and doc["method"] == "calibrated_score"
        and 0 <= doc["reliability"] <= 1
    )


def test_cli_client_score_prints_the_status_code_name(
    address: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"not a png at all" * 10)
    rc = main(["client", "score", "--address", address, str(bad), "--request-id", "cli-1"])
    err = capsys.readouterr().err
    assert rc == 3
    assert f"error: {bad}: INVALID_ARGUMENT: request cli-1 (scan.png): not a readable image" in err


def test_cli_client_unreachable_server(
    free_address: str, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    rc = main(
        ["client", "score", "--address", free_address, "--timeout", "5", str(data_dir / "dicom" / DICOM)]
    )
    assert rc == 3
    assert ": UNAVAILABLE: " in capsys.readouterr().err


def test_cli_health(address: str, free_address: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["health", "--address", address]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert main(["health", "--address", address, "--service", "cxrmonitor.v1.ReliabilityMonitor"]) == 0
    assert main(["health", "--address", free_address, "--timeout", "2"]) == 1
    assert capsys.readouterr().err.split(":")[0] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert main(["health", "--address", address, "--service", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_cli_health_without_address_asks_the_port_serve_would_use(
    address: str, free_address: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # As the Docker HEALTHCHECK runs it: no --address, the port from CXR_MONITOR_PORT.
    monkeypatch.setenv("CXR_MONITOR_PORT", address.rsplit(":", 1)[1])
    assert main(["health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    monkeypatch.setenv("CXR_MONITOR_HOST", address.rsplit(":", 1)[0])  # a specific interface
    assert main(["health"]) == 0
    monkeypatch.setenv("CXR_MONITOR_PORT", free_address.rsplit(":", 1)[1])
    assert main(["health", "--timeout", "2"]) == 1


def test_cli_replay_summary(
    address: str, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for name in ("cxr_pa_monochrome1_jpeg.dcm", "cxr_pa_monochrome2_jpeg.dcm"):
        shutil.copy(data_dir / "dicom" / name, tmp_path / name)
    shutil.copy(data_dir / "nih" / "images" / "00000075_000.webp", tmp_path / "a.webp")
    (tmp_path / "z_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    rc = main(["client", "replay", "--address", address, str(tmp_path), "--concurrency", "2", "--json",
               "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert rc == 1  # one image failed
    assert (summary["count"], summary["scored"], summary["errors"]) == (4, 3, 1)
    assert summary["error_codes"] == {"INVALID_ARGUMENT": 1}
    assert sum(summary["clusters"].values()) == 3
    assert 0 < summary["latency_p50_seconds"] <= summary["latency_p99_seconds"]
    assert summary["throughput_per_second"] > 0
    assert "z_broken.png: INVALID_ARGUMENT" in captured.err

    assert (
        main(["client", "replay", "--address", address, str(tmp_path), "--limit", "2", "--no-progress"]) == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("2 images in ") and "latency p50" in text and "clusters: " in text


def test_cli_info_and_outcome(address: str, data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["client", "score", "--address", address, str(data_dir / "dicom" / DICOM), "--request-id", "o-1",
                 "--json"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["client", "outcome", "--address", address, "o-1", "--failure", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["failure"] is True
    assert main(["client", "outcome", "--address", address, "o-1", "--success"]) == 3
    assert "ALREADY_EXISTS" in capsys.readouterr().err
    assert main(["client", "outcome", "--address", address, "nobody", "--label", "1", "--score", "0.9"]) == 3
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["client", "info", "--address", address, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["card"]["model_id"] == info["model_id"] and len(info["clusters"]) >= 2
    assert main(["client", "info", "--address", address]) == 0
    assert "clusters; global failure rate" in capsys.readouterr().out
