"""Tests for monitor.settings: flag > environment > default, validation, one reader of os.environ."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from monitor import imaging, settings
from monitor.cli import build_parser
from monitor.errors import InvalidInputError
from monitor.settings import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_METRICS_PORT,
    DEFAULT_PORT,
    DEFAULT_WORKERS,
    Settings,
    env_name,
)

REPO = Path(__file__).resolve().parents[1]


def test_defaults() -> None:
    s = Settings.load({}, environ={})
    assert (s.port, s.metrics_port, s.workers, s.fft_threads) == (50051, 9108, 4, 1)
    assert (s.window_images, s.window_seconds, s.max_message_bytes) == (200, 300.0, 64 * 1024 * 1024)
    assert (s.log_format, s.log_level, s.host) == ("json", "INFO", "0.0.0.0")
    assert s.model == REPO / "models" / "default"
    assert DEFAULT_MAX_PIXELS == imaging.DEFAULT_MAX_PIXELS == s.max_pixels
    assert s.decode_processes == "auto"


@pytest.mark.parametrize(
    ("cpus", "workers", "value", "expected"),
    [
        (2, 4, "auto", 2),  # one process per CPU
        (8, 4, "auto", 4),  # never more processes than workers could keep busy
        (1, 4, "auto", 0),  # one CPU: decode in-thread, no IPC
        (8, 4, "3", 3),  # a number is taken as given, from text (flag, env) or int
        (8, 4, 0, 0),
        (2, 4, " AUTO ", 2),
    ],
)
def test_decode_process_count(
    monkeypatch: pytest.MonkeyPatch, cpus: int, workers: int, value: object, expected: int
) -> None:
    monkeypatch.setattr(settings, "available_cpus", lambda: cpus)
    s = Settings(workers=workers, decode_processes=value)  # type: ignore[arg-type]
    assert s.decode_process_count == expected
    assert s.to_dict()["decode_process_count"] == expected
    assert (
        Settings.load({}, environ={"CXR_MONITOR_DECODE_PROCESSES": str(value)}).decode_process_count
        == expected
    )


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2, 1.5 CPUs
        ({"cpu.max": "max 100000\n"}, None),  # v2, no limit
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no limit
        ({"cpu.max": "garbage"}, None),
        ({}, None),  # no cgroup files (not Linux, or not mounted)
    ],
)
def test_cgroup_cpu_quota(tmp_path: Path, files: dict[str, str], expected: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert settings._cgroup_cpu_quota(tmp_path) == expected  # noqa: SLF001


def test_available_cpus_is_capped_by_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "_cgroup_cpu_quota", lambda: 1.5)
    assert settings.available_cpus() == min(2, len(settings.os.sched_getaffinity(0)))
    monkeypatch.setattr(settings, "_cgroup_cpu_quota", lambda: None)
    assert settings.available_cpus() == len(settings.os.sched_getaffinity(0))


def test_flag_beats_env_beats_default() -> None:
    env = {"CXR_MONITOR_PORT": "6000", "CXR_MONITOR_WORKERS": "3", "CXR_MONITOR_MODEL": "/models/x"}
    s = Settings.load({"port": 7000, "workers": None, "unrelated": 1}, environ=env)
    assert s.port == 7000  # flag
    assert s.workers == 3  # env (the flag was not given)
    assert s.model == Path("/models/x")
    assert s.metrics_port == DEFAULT_METRICS_PORT  # default


def test_serve_flags_reach_settings_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_MONITOR_METRICS_PORT", "9200")
    monkeypatch.setenv("CXR_MONITOR_WORKERS", "2")
    monkeypatch.setenv("CXR_MONITOR_LOG_FORMAT", "text")
    args = build_parser().parse_args(["serve", "--workers", "5", "--window-seconds", "60"])
    s = Settings.load({f.name: getattr(args, f.name) for f in fields(Settings)})
    assert (s.workers, s.metrics_port, s.window_seconds, s.log_format) == (5, 9200, 60.0, "text")
    assert s.port == DEFAULT_PORT


def test_every_field_has_help_flag_and_env_name() -> None:
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # noqa: SLF001
    help_text = serve.format_help()
    for f in fields(Settings):
        assert f.metadata["help"]
        if f.metadata.get("secret"):  # environment only: argv is visible to every user
            assert "--" + f.name.replace("_", "-") + " " not in help_text
            continue
        assert "--" + f.name.replace("_", "-") in help_text
        assert env_name(f.name) in help_text
    assert env_name("metrics_port") == "CXR_MONITOR_METRICS_PORT"


def test_security_settings_from_the_environment() -> None:
    env = {"CXR_MONITOR_TLS_CERT": "/run/tls/tls.crt", "CXR_MONITOR_TLS_KEY": "/run/tls/tls.key",
           "CXR_MONITOR_TLS_CLIENT_CA": "/run/tls/ca.crt", "CXR_MONITOR_AUTH_TOKEN": "t" * 16,
           "CXR_MONITOR_OUTCOME_TOKEN_FILE": "/run/token", "CXR_MONITOR_METRICS_HOST": "127.0.0.1",
           "CXR_MONITOR_HEALTH_PORT": "50052"}  # fmt: skip
    s = Settings.load({}, environ=env)
    assert (s.tls_cert, s.tls_key, s.tls_client_ca) == tuple(
        Path(f"/run/tls/{n}") for n in ("tls.crt", "tls.key", "ca.crt")
    )
    assert s.auth_token == "t" * 16 and s.outcome_token_file == Path("/run/token")
    assert (s.metrics_bind_host, s.health_address) == ("127.0.0.1", "0.0.0.0:50052")
    d = Settings.load({}, environ={})
    assert (d.tls_cert, d.auth_token, d.health_address, d.metrics_bind_host) == (None, "", None, "0.0.0.0")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"CXR_MONITOR_TLS_CERT": "c.pem"},
            "settings tls_cert and tls_key go together: give both or neither",
        ),
        (
            {"CXR_MONITOR_TLS_CLIENT_CA": "ca.pem"},
            "setting tls_client_ca (mutual TLS) needs tls_cert and tls_key",
        ),
        (
            {"CXR_MONITOR_AUTH_TOKEN": "short"},
            "setting auth_token must be at least 16 printable ASCII characters",
        ),
        (
            {"CXR_MONITOR_OUTCOME_TOKEN": "o" * 16, "CXR_MONITOR_OUTCOME_TOKEN_FILE": "/t"},
            "settings outcome_token and outcome_token_file are exclusive",
        ),  # fmt: skip
        ({"CXR_MONITOR_HEALTH_PORT": "-2"}, "setting health_port must be -1 (off) or in 0..65535, got -2"),
    ],
)
def test_bad_security_settings_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        Settings.load({}, environ=env)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CXR_MONITOR_PORT": "abc"}, "environment variable CXR_MONITOR_PORT='abc' is not a valid int"),
        ({"CXR_MONITOR_WINDOW_SECONDS": "soon"}, "CXR_MONITOR_WINDOW_SECONDS='soon' is not a valid float"),
        ({"CXR_MONITOR_WORKERS": "0"}, "setting workers must be >= 1, got 0"),
        ({"CXR_MONITOR_PORT": "70000"}, "setting port must be in 0..65535, got 70000"),
        ({"CXR_MONITOR_LOG_FORMAT": "xml"}, "setting log_format must be one of ('json', 'text'), got 'xml'"),
        ({"CXR_MONITOR_GRACE_SECONDS": "0"}, "setting grace_seconds must be > 0, got 0.0"),
        (
            {"CXR_MONITOR_DECODE_PROCESSES": "many"},
            "setting decode_processes must be 'auto' or a whole number >= 0, got 'many'",
        ),
        (
            {"CXR_MONITOR_DECODE_PROCESSES": "-1"},
            "setting decode_processes must be 'auto' or a whole number >= 0, got '-1'",
        ),
        ({"CXR_MONITOR_DICOM_PORT": "-2"}, "setting dicom_port must be -1 (off) or in 0..65535, got -2"),
        (
            {"CXR_MONITOR_DICOM_AE_TITLE": "A_TITLE_LONGER_THAN_16"},
            "setting dicom_ae_title must be 1-16 printable characters without a backslash",
        ),
        (
            {"CXR_MONITOR_DICOM_ALLOWED_AES": "PACS@not-an-ip"},
            "setting dicom_allowed_aes: 'not-an-ip' in 'PACS@not-an-ip' is not an IP address",
        ),
        ({"CXR_MONITOR_DICOM_QUEUE_SIZE": "0"}, "setting dicom_queue_size must be >= 1, got 0"),
        (
            {"CXR_MONITOR_DICOM_TLS_CERT": "node.crt"},
            "settings dicom_tls_cert and dicom_tls_key go together",
        ),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        Settings.load({}, environ=env)


def test_empty_env_value_means_default() -> None:
    assert Settings.load({}, environ={"CXR_MONITOR_WORKERS": " "}).workers == DEFAULT_WORKERS


def test_log_level_is_case_insensitive_and_address_brackets_ipv6() -> None:
    s = Settings.load({"log_level": "debug", "host": "::", "port": 1})
    assert s.log_level == "DEBUG" and s.address == "[::]:1"
    assert Settings(host="127.0.0.1", port=5).address == "127.0.0.1:5"


def test_only_settings_reads_the_environment() -> None:
    sidecar = [REPO / "monitor" / "metrics.py", REPO / "monitor" / "client.py",
               *sorted((REPO / "monitor" / "server").glob("*.py"))]  # fmt: skip
    for path in sidecar:
        text = path.read_text()
        assert "os.environ" not in text and "getenv" not in text, path
    assert "os.environ" in (REPO / "monitor" / "settings.py").read_text()


def test_dicom_settings_from_env_and_flags() -> None:
    env = {
        "CXR_MONITOR_DICOM_PORT": "11112",
        "CXR_MONITOR_DICOM_ALLOWED_AES": " ORTHANC@127.0.0.1, CR_ROOM1 ,",
    }
    args = build_parser().parse_args(["serve", "--dicom-ae-title", "MONITOR2"])
    s = Settings.load({f.name: getattr(args, f.name) for f in fields(Settings)}, environ=env)
    assert (s.dicom_port, s.dicom_ae_title) == (11112, "MONITOR2")
    assert s.dicom_allowed_callers == {"ORTHANC": "127.0.0.1", "CR_ROOM1": None}
    assert Settings().dicom_port == -1  # off unless asked for
