"""The committed generated code (monitor/proto) must be what the .proto generates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    try:
        import grpc_tools  # noqa: F401  (test extra)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("grpcio-tools is required in CI to check the generated code")
        pytest.skip("grpcio-tools not installed (pip install -e '.[test]')")
    from monitor.codegen import GENERATED_DIR, PROTO_FILE, PROTO_ROOT, generate

    assert (PROTO_ROOT / PROTO_FILE).is_file()
    written = generate(tmp_path)
    names = sorted(p.name for p in written)
    committed = sorted(p.name for p in GENERATED_DIR.iterdir() if p.is_file())
    assert committed == names, "files in monitor/proto differ from what codegen writes"
    stale = [p.name for p in written if p.read_text() != (GENERATED_DIR / p.name).read_text()]
    assert not stale, f"{stale} are out of date: run `python -m monitor.codegen` and commit the result"


def test_generated_code_is_importable_as_a_subpackage() -> None:
    from monitor.proto import monitor_pb2, monitor_pb2_grpc

    assert monitor_pb2.DESCRIPTOR.name == "cxr_monitor/v1/monitor.proto"
    assert monitor_pb2.DESCRIPTOR.package == "cxrmonitor.v1"
    assert monitor_pb2_grpc.ReliabilityMonitorStub.__module__ == "monitor.proto.monitor_pb2_grpc"
    assert set(monitor_pb2.DESCRIPTOR.services_by_name["ReliabilityMonitor"].methods_by_name) == {
        "Score", "ScoreStream", "ReportOutcome", "GetModelInfo",
    }  # fmt: skip
