"""Production hardening of the sidecar (issue 9): TLS, mutual TLS and tokens, health under load,
malformed messages, bounded ids and names, and log lines that cannot be forged or leak metadata.

Certificates are made for each run with the ``openssl`` command (scripts/ensure-openssl.sh).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from monitor.cli import main
from monitor.client import ReliabilityClient, bytes_request
from monitor.defaults import default_model_dir
from monitor.engine import Engine
from monitor.errors import MonitorError
from monitor.server import build_server
from monitor.server.logs import JsonFormatter, TextFormatter, configure_logging
from monitor.server.servicer import SERVICE_NAME
from monitor.settings import Settings

REPO = Path(__file__).resolve().parents[1]
J2K = "cxr_pa_cr_philips_j2k.dcm"  # the slowest decode (150+ ms): keeps scoring threads busy
SCORING_TOKEN = "scoring-token-0123456789abcdef"
OUTCOME_TOKEN = "outcome-token-fedcba9876543210"
TINY = b"\x89PNG not really"  # INVALID_ARGUMENT after auth: enough to tell the gate let a call through


# --------------------------------------------------------------------------- certificates


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)  # fmt: skip


def _leaf(d: Path, name: str, ca: str, usage: str) -> None:
    (d / f"{name}.ext").write_text(f"subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a server and a client certificate, and a second CA with its own client."""
    if shutil.which("openssl") is None:
        msg = "the openssl command is needed to make test certificates (scripts/ensure-openssl.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _leaf(d, "server", "ca", "serverAuth")
    _leaf(d, "client", "ca", "clientAuth")
    _ca(d, "other-ca")
    _leaf(d, "intruder", "other-ca", "clientAuth")
    return d


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_directory(default_model_dir())


def _settings(**kw: object) -> Settings:
    base = dict(host="127.0.0.1", port=0, metrics_port=-1, workers=1, log_format="text", decode_processes=0,
                window_images=20)  # fmt: skip
    return Settings(**{**base, **kw})


class _Sidecar:
    def __init__(self, engine: Engine, **kw: object) -> None:
        self.registry = CollectorRegistry()
        self.server, port = build_server(_settings(**kw), engine, registry=self.registry)
        self.server.start()
        self.address = f"127.0.0.1:{port}"

    def __enter__(self) -> _Sidecar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(0.5)


def _code(fn, *args, **kwargs) -> grpc.StatusCode:
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _score_code(client: ReliabilityClient) -> grpc.StatusCode:
    return _code(client.score, bytes_request(TINY, request_id="probe"))


# --------------------------------------------------------------------------- TLS matrix


@pytest.fixture(scope="module")
def tls_sidecar(engine: Engine, certs: Path) -> Iterator[_Sidecar]:
    with _Sidecar(engine, tls_cert=certs / "server.pem", tls_key=certs / "server.key", health_port=0) as s:
        yield s


@pytest.fixture(scope="module")
def mtls_sidecar(engine: Engine, certs: Path) -> Iterator[_Sidecar]:
    with _Sidecar(
        engine, tls_cert=certs / "server.pem", tls_key=certs / "server.key", tls_client_ca=certs / "ca.pem"
    ) as s:
        yield s


def test_plaintext_server_answers_a_plaintext_client(engine: Engine) -> None:
    with _Sidecar(engine) as s, ReliabilityClient(s.address, timeout=10) as client:
        assert client.health() == "SERVING"
        assert _score_code(client) == grpc.StatusCode.INVALID_ARGUMENT  # reached the handler


def test_tls_server_only(tls_sidecar: _Sidecar, certs: Path) -> None:
    with ReliabilityClient(tls_sidecar.address, timeout=10, tls_ca=certs / "ca.pem") as client:
        assert client.health() == "SERVING"
        assert _score_code(client) == grpc.StatusCode.INVALID_ARGUMENT
        assert client.model_info().model_id
    # TLS without our CA (system roots only) cannot verify the server; plaintext cannot talk to it.
    for kwargs in ({"tls": True}, {}):
        with ReliabilityClient(tls_sidecar.address, timeout=5, **kwargs) as client:
            assert _code(client.health) == grpc.StatusCode.UNAVAILABLE
            assert _score_code(client) == grpc.StatusCode.UNAVAILABLE


def test_health_port_is_plaintext_and_serves_health_only(tls_sidecar: _Sidecar) -> None:
    port = tls_sidecar.server.health_port
    assert port and str(port) != tls_sidecar.address.rsplit(":", 1)[1]
    with ReliabilityClient(f"127.0.0.1:{port}", timeout=5) as client:
        assert client.health() == "SERVING" and client.health(SERVICE_NAME) == "SERVING"
        assert _score_code(client) == grpc.StatusCode.UNIMPLEMENTED  # no scoring API there


def test_mutual_tls(mtls_sidecar: _Sidecar, certs: Path) -> None:
    ok = {"tls_ca": certs / "ca.pem", "tls_cert": certs / "client.pem", "tls_key": certs / "client.key"}
    with ReliabilityClient(mtls_sidecar.address, timeout=10, **ok) as client:
        assert client.health() == "SERVING"
        assert _score_code(client) == grpc.StatusCode.INVALID_ARGUMENT
    refused = (
        {"tls_ca": certs / "ca.pem"},  # no client certificate
        {"tls_ca": certs / "ca.pem", "tls_cert": certs / "intruder.pem", "tls_key": certs / "intruder.key"},
        {},  # plaintext
    )
    for kwargs in refused:
        with ReliabilityClient(mtls_sidecar.address, timeout=5, **kwargs) as client:
            assert _score_code(client) == grpc.StatusCode.UNAVAILABLE, kwargs


def test_unreadable_or_non_pem_tls_files_are_named(engine: Engine, certs: Path, tmp_path: Path) -> None:
    (tmp_path / "key.txt").write_text("not a key")
    with pytest.raises(MonitorError, match=r"setting tls_key: .*key\.txt is not a PEM file"):
        build_server(_settings(tls_cert=certs / "server.pem", tls_key=tmp_path / "key.txt"))
    with pytest.raises(MonitorError, match=r"setting tls_client_ca: cannot read .*missing\.pem"):
        build_server(
            _settings(
                tls_cert=certs / "server.pem",
                tls_key=certs / "server.key",
                tls_client_ca=tmp_path / "missing.pem",
            )  # fmt: skip
        )


# --------------------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def token_sidecar(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Sidecar]:
    d = tmp_path_factory.mktemp("tokens")
    (d / "scoring").write_text(SCORING_TOKEN + "\n")  # as `echo token > file` or a mounted secret
    (d / "outcome").write_text(OUTCOME_TOKEN)
    with _Sidecar(engine, auth_token_file=d / "scoring", outcome_token_file=d / "outcome") as s:
        yield s


def _outcome_code(client: ReliabilityClient) -> grpc.StatusCode:
    return _code(client.report_outcome, "never-scored", failure=True)


def test_token_matrix(token_sidecar: _Sidecar) -> None:
    address = token_sidecar.address
    cases = [  # token sent, Score, ReportOutcome, GetModelInfo
        (None, "UNAUTHENTICATED", "UNAUTHENTICATED", "UNAUTHENTICATED"),
        ("wrong-token-0123456789abcdef", "UNAUTHENTICATED", "UNAUTHENTICATED", "UNAUTHENTICATED"),
        (SCORING_TOKEN[:-1], "UNAUTHENTICATED", "UNAUTHENTICATED", "UNAUTHENTICATED"),  # a prefix
        (SCORING_TOKEN, "INVALID_ARGUMENT", "UNAUTHENTICATED", "OK"),  # scoring, not outcomes
        (OUTCOME_TOKEN, "UNAUTHENTICATED", "NOT_FOUND", "UNAUTHENTICATED"),  # outcomes only
    ]
    for token, score, outcome, info in cases:
        with ReliabilityClient(address, timeout=10, token=token) as client:
            got = (_score_code(client).name, _outcome_code(client).name, _code(client.model_info).name)
            assert got == (score, outcome, info), token
            # Kubernetes probes send no metadata: health stays open, as does reflection.
            assert client.health() == "SERVING"
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(
            stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        assert SERVICE_NAME in [s.name for s in reply.list_services_response.service]
    # A stream needs the token too; rejections are counted like other failed calls.
    with ReliabilityClient(address, timeout=10) as client:
        assert (
            _code(lambda: list(client.score_stream([bytes_request(TINY)]))) == grpc.StatusCode.UNAUTHENTICATED
        )
    sample = token_sidecar.registry.get_sample_value(
        "cxr_monitor_requests_total", {"method": "ScoreStream", "code": "UNAUTHENTICATED"}
    )
    assert sample == 1


def test_one_token_guards_outcomes_too_when_no_outcome_token(engine: Engine) -> None:
    with _Sidecar(engine, auth_token=SCORING_TOKEN) as s:
        with ReliabilityClient(s.address, timeout=10, token=SCORING_TOKEN) as client:
            assert _outcome_code(client) == grpc.StatusCode.NOT_FOUND
        with ReliabilityClient(s.address, timeout=10) as client:
            assert _outcome_code(client) == grpc.StatusCode.UNAUTHENTICATED


def test_token_with_mutual_tls(engine: Engine, certs: Path) -> None:
    ok = {"tls_ca": certs / "ca.pem", "tls_cert": certs / "client.pem", "tls_key": certs / "client.key"}
    with _Sidecar(engine, tls_cert=certs / "server.pem", tls_key=certs / "server.key",
                  tls_client_ca=certs / "ca.pem", auth_token=SCORING_TOKEN) as s:  # fmt: skip
        with ReliabilityClient(s.address, timeout=10, token=SCORING_TOKEN, **ok) as client:
            assert _score_code(client) == grpc.StatusCode.INVALID_ARGUMENT
        with ReliabilityClient(s.address, timeout=10, **ok) as client:
            assert _score_code(client) == grpc.StatusCode.UNAUTHENTICATED


def test_bad_token_files_are_refused_at_start(engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(MonitorError, match=r"auth_token_file: .*short must hold one token of at least 16"):
        build_server(_settings(auth_token_file=tmp_path / "short"))
    with pytest.raises(MonitorError, match=r"outcome_token_file: cannot read .*absent"):
        build_server(_settings(outcome_token_file=tmp_path / "absent"))


def test_cli_health_and_client_take_tls_and_token_flags(
    tls_sidecar: _Sidecar, token_sidecar: _Sidecar, certs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tls = ["--tls-ca", str(certs / "ca.pem")]
    assert main(["health", "--address", tls_sidecar.address, *tls]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert main(["health", "--address", tls_sidecar.address, "--timeout", "3"]) == 1  # plaintext
    assert main(["client", "info", "--address", tls_sidecar.address, *tls, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_id"]

    (tmp_path / "token").write_text(SCORING_TOKEN + "\n")
    assert main(["client", "info", "--address", token_sidecar.address]) == 3
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert (
        main(["client", "info", "--address", token_sidecar.address, "--token-file", str(tmp_path / "token")])
        == 0
    )
    assert (
        main(["client", "info", "--address", token_sidecar.address, "--token-file", str(tmp_path / "nope")])
        == 3
    )
    assert "token file" in capsys.readouterr().err


def test_cli_health_without_address_uses_the_health_port(
    tls_sidecar: _Sidecar, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """As a container HEALTHCHECK: `cxr-monitor health` finds the plaintext port from the environment."""
    monkeypatch.setenv("CXR_MONITOR_HOST", "0.0.0.0")
    monkeypatch.setenv("CXR_MONITOR_HEALTH_PORT", str(tls_sidecar.server.health_port))
    assert main(["health"]) == 0 and capsys.readouterr().out.strip() == "SERVING"
    monkeypatch.delenv("CXR_MONITOR_HEALTH_PORT")
    monkeypatch.setenv("CXR_MONITOR_PORT", tls_sidecar.address.rsplit(":", 1)[1])
    assert main(["health"]) == 1  # the TLS port, in plaintext


def test_tokens_are_never_flags_nor_logged() -> None:
    from monitor.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # noqa: SLF001
    text = serve.format_help()
    assert "--auth-token-file" in text and "--outcome-token-file" in text
    assert "--auth-token " not in text and "--outcome-token " not in text
    s = Settings(auth_token=SCORING_TOKEN)
    assert SCORING_TOKEN not in repr(s) and SCORING_TOKEN not in json.dumps(s.to_dict())
    assert s.to_dict()["auth_token"] == "(set)"


# --------------------------------------------------------------------------- health under load


def test_health_answers_while_scoring_is_saturated(engine: Engine, data_dir: Path) -> None:
    """Regression (defect 2): health shared grpc's concurrency limit and was refused under load."""
    payload = (data_dir / "dicom" / J2K).read_bytes()
    with _Sidecar(engine, max_concurrent_rpcs=2, workers=1) as s:
        stop = threading.Event()
        codes: list[str] = []

        def load() -> None:
            with ReliabilityClient(s.address, timeout=60) as client:
                while not stop.is_set():
                    codes.append(_code(client.score_bytes, payload).name)

        threads = [threading.Thread(target=load) for _ in range(24)]
        for t in threads:
            t.start()
        try:
            with ReliabilityClient(s.address) as probe:
                while "RESOURCE_EXHAUSTED" not in codes:  # the scoring limit is reached
                    time.sleep(0.01)
                statuses = []
                for _ in range(100):  # before the fix, 1 to 3 in 20 were refused
                    statuses.append(_code(probe.health, timeout=10).name)
                    time.sleep(0.01)
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert statuses == ["OK"] * 100
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and "OK" in codes


def test_rpcs_beyond_the_limit_are_refused_but_health_is_not(engine: Engine) -> None:
    """Open streams fill every RPC slot (max_concurrent_rpcs + 8 spare): other calls get
    RESOURCE_EXHAUSTED at once, health checks are still answered, and the slots come back."""
    import queue

    with _Sidecar(engine, max_concurrent_rpcs=1) as s, ReliabilityClient(s.address, timeout=10) as client:
        outboxes = [queue.Queue() for _ in range(9)]
        streams = [client.score_stream(iter(q.get, None)) for q in outboxes]
        for q, stream in zip(outboxes, streams, strict=True):  # each stream now holds a handler thread
            q.put(bytes_request(TINY, request_id="idle"))
            assert next(stream).error.code_name == "INVALID_ARGUMENT"
        with pytest.raises(grpc.RpcError) as exc:
            client.model_info()
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server overloaded: 9 calls in flight (limit 9:" in exc.value.details()
        assert _score_code(client) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [client.health() for _ in range(5)] == ["SERVING"] * 5
        for q in outboxes[:4]:
            q.put(None)  # four streams end normally
        for stream in streams[4:]:
            stream.cancel()  # five are cancelled by the client
        deadline = time.monotonic() + 20
        while _code(client.model_info) != grpc.StatusCode.OK:  # slots are given back, none leaks
            assert time.monotonic() < deadline, "RPC slots were not released"
            time.sleep(0.05)
        codes = [_score_code(client) for _ in range(9)]
        assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 9
        sample = s.registry.get_sample_value(
            "cxr_monitor_requests_total", {"method": "GetModelInfo", "code": "RESOURCE_EXHAUSTED"}
        )
        assert sample >= 1


# --------------------------------------------------------------------------- malformed messages


@pytest.fixture(scope="module")
def open_sidecar(engine: Engine) -> Iterator[_Sidecar]:
    with _Sidecar(engine) as s:
        yield s


MALFORMED = {"corrupt": b"\xff\xff\xff\xff", "bad utf-8 id": b"\x0a\x02\xff\xfe"}


@pytest.mark.parametrize(
    ("method", "payload"),
    [(m, p) for m in ("Score", "ReportOutcome") for p in MALFORMED.values()]
    + [("GetModelInfo", MALFORMED["corrupt"])],  # ModelInfoRequest has no string to mis-encode
    ids=[f"{m}-{k}" for m in ("Score", "ReportOutcome") for k in MALFORMED] + ["GetModelInfo-corrupt"],
)
def test_malformed_message_is_invalid_argument_with_one_log_line(
    open_sidecar: _Sidecar, method: str, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (defect 5): grpc answered INTERNAL and logged a traceback."""
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(open_sidecar.address) as channel:
        call = channel.unary_unary(f"/{SERVICE_NAME}/{method}")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as exc:
            call(payload, timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid cxrmonitor.v1." in exc.value.details()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    lines = [r for r in caplog.records if "INVALID_ARGUMENT" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None


def test_malformed_stream_item_and_health_request(
    open_sidecar: _Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    good = bytes_request(TINY, request_id="fine").SerializeToString()
    with grpc.insecure_channel(open_sidecar.address) as channel:
        stream = channel.stream_stream(f"/{SERVICE_NAME}/ScoreStream")
        replies = stream(iter([good, MALFORMED["corrupt"]]), timeout=10)
        with pytest.raises(grpc.RpcError) as exc:
            list(replies)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "stream item 1 is not a valid cxrmonitor.v1.ScoreRequest" in exc.value.details()
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        with pytest.raises(grpc.RpcError) as exc:
            check(MALFORMED["corrupt"], timeout=10)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# --------------------------------------------------------------------------- ids, names, metadata


def test_long_request_ids_are_refused_and_not_remembered(open_sidecar: _Sidecar) -> None:
    """Regression (defect 4): 4 MiB ids were remembered (100,000 of them) for ReportOutcome."""
    outcomes = open_sidecar.server.handler.outcomes
    before = len(outcomes)
    huge = "x" * (4 << 20)
    with ReliabilityClient(open_sidecar.address, timeout=30, max_message_bytes=16 << 20) as client:
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as exc:
                client.score_bytes(TINY, request_id=huge)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert exc.value.details() == "request_id has 4194304 characters, more than the limit of 256"
        with pytest.raises(grpc.RpcError) as exc:
            client.report_outcome(huge, failure=True)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(exc.value.details()) < 200
        replies = list(client.score_stream([bytes_request(TINY, request_id=huge)]))
        assert replies[0].error.code_name == "INVALID_ARGUMENT" and len(replies[0].request_id) < 200
    assert len(outcomes) == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"request_id": "a\nb"}, "request_id contains the control character '\\n' at position 1"),
        ({"name": "n" * 257}, "request ok: encoded.name has 257 characters, more than the limit of 256"),
        (
            {"metadata": {f"k{i}": "v" for i in range(33)}},
            "metadata has 33 entries, more than the limit of 32",
        ),
        (
            {"metadata": {"site": "v" * 300}},
            "metadata['site'] has 300 characters, more than the limit of 256",
        ),
        ({"metadata": {"k" * 65: "v"}}, "a metadata key has 65 characters, more than the limit of 64"),
    ],
)
def test_ids_names_and_metadata_are_bounded(open_sidecar: _Sidecar, kwargs: dict, message: str) -> None:
    kwargs = {"request_id": "ok", **kwargs}
    with ReliabilityClient(open_sidecar.address, timeout=10) as client:
        with pytest.raises(grpc.RpcError) as exc:
            client.score_bytes(TINY, **kwargs)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().endswith(message)


def test_failed_request_logs_bounded_metadata_without_patient_fields(
    open_sidecar: _Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (defect 6): failed requests logged their metadata verbatim (1 MB lines, patient data)."""
    caplog.set_level(logging.INFO)
    metadata = {"PatientName": "Doe^Jane", "patient_id": "12345", "StudyInstanceUID": "1.2.3",
                "AccessionNumber": "A77", "site": "ward 4", "note": "n" * 200_000}  # fmt: skip
    with ReliabilityClient(open_sidecar.address, timeout=10) as client:
        with pytest.raises(grpc.RpcError):
            client.score_bytes(TINY, request_id="meta", metadata=metadata)
    (record,) = [r for r in caplog.records if getattr(r, "request_id", None) == "meta"]
    logged = record.metadata
    assert logged["site"] == "ward 4" and len(logged["note"]) == 256
    for key in ("PatientName", "patient_id", "StudyInstanceUID", "AccessionNumber"):
        assert logged[key] == "[redacted]"
    line = JsonFormatter().format(record)
    assert "Doe" not in line and "12345" not in line and "A77" not in line and len(line) < 2000


# --------------------------------------------------------------------------- log lines


def test_text_log_escapes_line_breaks_in_ids() -> None:
    """Regression (defect 6): an id holding a newline forged a second log line in text mode."""
    record = logging.LogRecord("cxr_monitor.server", logging.INFO, __file__, 1, "Score %s: request %s", ("INVALID_ARGUMENT", "a\n2026-01-01 ERROR forged\u2028x"), None)  # fmt: skip
    line = TextFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert "\n" not in line and "\u2028" not in line
    assert line.endswith("request a\\n2026-01-01 ERROR forged\\u2028x")


def test_warnings_become_one_log_line(capsys: pytest.CaptureFixture) -> None:
    import warnings

    root = logging.getLogger()
    saved = root.handlers[:], root.level, warnings.showwarning
    try:
        configure_logging("json", "INFO")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            configure_logging("json", "INFO")  # inside catch_warnings, which restores showwarning
            logging.getLogger("pydicom").warning("value too long")
            warnings.warn("value too long", UserWarning, stacklevel=1)  # pydicom's second copy
            warnings.warn("overflow in cast", RuntimeWarning, stacklevel=1)
    finally:
        root.handlers[:], warnings.showwarning = saved[0], saved[2]
        root.setLevel(saved[1])
    lines = capsys.readouterr().err.splitlines()
    docs = [json.loads(line) for line in lines]  # every line is JSON
    assert [d["msg"] for d in docs] == ["value too long", "RuntimeWarning: overflow in cast"]
    assert docs[1]["logger"] == "py.warnings" and docs[1]["source"].endswith(
        ".py:" + docs[1]["source"].split(":")[-1]
    )


def _warning_dicom(data_dir: Path, path: Path) -> Path:
    """A real DICOM whose Manufacturer (LO, max 64) is too long: pydicom warns when it is read."""
    import pydicom
    from pydicom import config

    ds = pydicom.dcmread(data_dir / "dicom" / "cxr_pa_monochrome2_jpeg.dcm")
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        with pytest.warns(UserWarning):  # setting it warns here too
            ds.Manufacturer = "M" * 100
        ds.save_as(path)
    finally:
        config.settings.writing_validation_mode = mode
    return path


def test_cli_prints_each_warning_once(data_dir: Path, tmp_path: Path) -> None:
    """Regression (defect 6): pydicom's warnings were printed twice (log record + raw warning)."""
    path = _warning_dicom(data_dir, tmp_path / "long.dcm")
    out = subprocess.run([sys.executable, "-m", "monitor.cli", "score", str(path)], capture_output=True,
                         text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if "exceeds the maximum length" in line]
    assert lines == [
        "WARNING pydicom: The value length (100) exceeds the maximum length of 64 allowed for VR LO."
    ]
    assert out.stderr.count("\n") == 1


def _read_port(proc: subprocess.Popen, deadline: float) -> tuple[int, list[str]]:
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if '"listening"' in line:
            return json.loads(line)["port"], lines
    raise AssertionError("the server did not start: " + "".join(lines))


def test_decoder_process_warnings_are_json_log_lines(data_dir: Path, tmp_path: Path) -> None:
    """Regression (defect 6): decoder processes wrote raw warnings into the JSON log."""
    path = _warning_dicom(data_dir, tmp_path / "long.dcm")
    env = {**os.environ, "CXR_MONITOR_DECODE_PROCESSES": "1", "CXR_MONITOR_WORKERS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "serve", "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "-1", "--log-format", "json"],
        stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )  # fmt: skip
    try:
        port, lines = _read_port(proc, time.monotonic() + 120)
        with ReliabilityClient(f"127.0.0.1:{port}", timeout=60) as client:
            while client.health() != "SERVING":
                time.sleep(0.1)
            assert client.score_file(path).image.format == "dicom"
    finally:
        proc.terminate()
        _, rest = proc.communicate(timeout=60)
    lines += rest.splitlines()
    docs = [json.loads(line) for line in lines if line.strip()]  # fails on any non-JSON line
    found = [d for d in docs if "exceeds the maximum length" in d["msg"]]
    assert len(found) == 1 and found[0]["logger"] == "pydicom"


# --------------------------------------------------------------------------- metrics address


def test_metrics_bind_address_is_its_own_setting(engine: Engine) -> None:
    with _Sidecar(engine, metrics_port=0, metrics_host="127.0.0.2") as s:
        port = s.server.metrics_port
        body = urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=10).read().decode()
        assert "cxr_monitor_model_loaded 1.0" in body
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


# --------------------------------------------------------------------------- the secure Kubernetes example

SECURE_K8S = REPO / "deploy" / "kubernetes" / "cxr-monitor-secure.yaml"


def _secure_docs() -> list[dict]:
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the deployment files")
    return [d for d in yaml.safe_load_all(SECURE_K8S.read_text()) if d]


def test_secure_k8s_example_runs_as_configured(engine: Engine, certs: Path, tmp_path: Path) -> None:
    """The manifest's sidecar settings, with its secret mounts pointed at generated files, give a
    server that demands mutual TLS and the tokens and answers plaintext probes on the health port."""
    from monitor.cli import build_parser

    docs = _secure_docs()
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    (sidecar,) = [c for c in spec["initContainers"] if c["image"].startswith("cxr-spectral-monitor")]
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    # Each mounted secret becomes a folder of files, as the kubelet writes them; the DICOM node's
    # certificate is signed by the same test CA as the PACS's client certificate.
    files = {
        "cxr-monitor-tls": {"tls.crt": certs / "server.pem", "tls.key": certs / "server.key", "ca.crt": certs / "ca.pem"},
        "cxr-monitor-dicom-tls": {"tls.crt": certs / "server.pem", "tls.key": certs / "server.key",
                                  "ca.crt": certs / "ca.pem"},
        "cxr-monitor-tokens": {"scoring": SCORING_TOKEN, "outcome": OUTCOME_TOKEN},
    }  # fmt: skip
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    for volume, path in mounts.items():
        folder = tmp_path / volume  # secrets and the store's emptyDir alike
        folder.mkdir()
        for key, source in files.get(secrets.get(volume, ""), {}).items():
            (folder / key).write_bytes(source.read_bytes() if isinstance(source, Path) else source.encode())
        env = {k: v.replace(path, str(folder)) for k, v in env.items()}
    assert not [v for v in env.values() if v.startswith(("/run/", "/var/"))], env  # every file is mounted

    args = build_parser().parse_args(sidecar["args"])
    as_deployed = Settings.load({f: getattr(args, f, None) for f in ("port", "metrics_port")}, environ=env)
    assert (as_deployed.port, as_deployed.metrics_port, as_deployed.health_port) == (50051, 9108, 50052)
    assert as_deployed.dicom_port == 11112 and as_deployed.dicom_tls_ca
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["grpc"]["port"] == as_deployed.health_port
    settings = Settings.load({"host": "127.0.0.1", "port": 0, "metrics_port": -1, "health_port": 0,
                              "dicom_port": 0, "decode_processes": 0, "workers": 1}, environ=env)  # fmt: skip
    server, port = build_server(settings, engine, registry=CollectorRegistry())
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        client_tls = {
            "tls_ca": certs / "ca.pem",
            "tls_cert": certs / "client.pem",
            "tls_key": certs / "client.key",
        }
        with ReliabilityClient(address, timeout=10, token=SCORING_TOKEN, **client_tls) as client:
            assert _score_code(client) == grpc.StatusCode.INVALID_ARGUMENT
            assert _outcome_code(client) == grpc.StatusCode.UNAUTHENTICATED
        with ReliabilityClient(address, timeout=10, token=OUTCOME_TOKEN, **client_tls) as client:
            assert _outcome_code(client) == grpc.StatusCode.NOT_FOUND
        with ReliabilityClient(address, timeout=5, token=SCORING_TOKEN, tls_ca=certs / "ca.pem") as client:
            assert _score_code(client) == grpc.StatusCode.UNAVAILABLE  # no client certificate
        with ReliabilityClient(f"127.0.0.1:{server.health_port}", timeout=5) as probe:
            assert probe.health(SERVICE_NAME) == "SERVING"  # what the kubelet's probe sees
        # The DICOM node: DICOM TLS with the PACS's client certificate only, allow-listed AE titles.
        pacs = _dicom_tls_context(certs, with_client_certificate=True)
        assert _dicom_echo(server.dicom_port, "ORTHANC", pacs) == 0x0000
        assert _dicom_echo(server.dicom_port, "STRANGER", pacs) is None  # not allow-listed
        assert _dicom_echo(server.dicom_port, "ORTHANC", None) is None  # plain TCP
        no_cert = _dicom_tls_context(certs, with_client_certificate=False)
        assert _dicom_echo(server.dicom_port, "ORTHANC", no_cert) is None
    finally:
        server.stop(0.5)

    # The classifier container gets the scoring token only, never the outcome token.
    (classifier,) = spec["containers"]
    (token_volume,) = [m["name"] for m in classifier["volumeMounts"] if "token" in m["name"]]
    (volume,) = [v for v in spec["volumes"] if v["name"] == token_volume]
    assert [i["key"] for i in volume["secret"]["items"]] == ["scoring"]


def _dicom_tls_context(certs: Path, *, with_client_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / "ca.pem"))
    if with_client_certificate:
        context.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    return context


def _dicom_echo(port: int, calling: str, context: ssl.SSLContext | None) -> int | None:
    """C-ECHO status from the node at 127.0.0.1:``port``, or None when no association is established."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    tls = (context, "localhost") if context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRMONITOR", tls_args=tls)
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def test_secure_k8s_network_policy_limits_each_port() -> None:
    (policy,) = [d for d in _secure_docs() if d["kind"] == "NetworkPolicy"]
    rules = {r["ports"][0]["port"]: r.get("from") for r in policy["spec"]["ingress"]}
    assert rules[50051] == [{"podSelector": {"matchLabels": {"cxr-monitor/client": "true"}}}]
    (metrics_from,) = rules[9108]
    assert metrics_from["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    # DICOM: one peer, the PACS, selected by namespace and pod together (one entry, not two).
    (dicom_from,) = rules[11112]
    assert dicom_from["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "pacs"}
    assert dicom_from["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "orthanc"}
    assert 50052 not in rules  # the plaintext health port: the node (kubelet) only
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    # Every port the sidecar opens has a rule with a peer selector, but the health port.
    (deployment,) = [d for d in _secure_docs() if d["kind"] == "Deployment"]
    (sidecar,) = deployment["spec"]["template"]["spec"]["initContainers"]
    opened = {p["containerPort"] for p in sidecar["ports"]} - {50052}
    assert opened <= {port for port, peers in rules.items() if peers}, opened


def test_secure_k8s_example_keeps_everything_of_the_plain_one() -> None:
    """The secure manifest is cxr-monitor.yaml hardened: every setting, port and Service port of the
    plain example is there too (with the same value where it is not a security setting)."""
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the deployment files")
    plain = [d for d in yaml.safe_load_all((SECURE_K8S.parent / "cxr-monitor.yaml").read_text()) if d]
    secure = _secure_docs()

    def sidecar(docs: list[dict]) -> dict:
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        (container,) = deployment["spec"]["template"]["spec"]["initContainers"]
        return container

    def service_ports(docs: list[dict]) -> dict:
        (service,) = [d for d in docs if d["kind"] == "Service"]
        return {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}

    plain_env = {e["name"]: e["value"] for e in sidecar(plain)["env"]}
    secure_env = {e["name"]: e["value"] for e in sidecar(secure)["env"]}
    assert plain_env.items() <= secure_env.items(), set(plain_env.items()) - set(secure_env.items())
    ports = [{k: p[k] for k in ("name", "containerPort")} for p in sidecar(secure)["ports"]]
    for port in sidecar(plain)["ports"]:
        assert {k: port[k] for k in ("name", "containerPort")} in ports, port
    assert service_ports(plain).items() <= service_ports(secure).items()
    plain_mounts = {m["mountPath"] for m in sidecar(plain)["volumeMounts"]}
    assert plain_mounts <= {m["mountPath"] for m in sidecar(secure)["volumeMounts"]}
