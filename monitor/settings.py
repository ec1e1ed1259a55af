"""Configuration of the gRPC sidecar, in one place.

Each :class:`Settings` field is read from, in order of precedence: a command-line
flag (``--metrics-port``), an environment variable (``CXR_MONITOR_METRICS_PORT``),
the default (``DEFAULT_METRICS_PORT``). This is the only module that reads
``os.environ``; everything else receives a :class:`Settings`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .defaults import (
    DEFAULT_DECODE_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MEMORY_BUDGET_BYTES,
    DEFAULT_METRICS_PORT,
    DEFAULT_PORT,
    bundled_model_dir,
)
from .errors import InvalidInputError

__all__ = [
    "DEFAULT_DECODE_PROCESSES",
    "DEFAULT_DECODE_TIMEOUT",
    "DEFAULT_DICOM_AE_TITLE",
    "DEFAULT_DICOM_PORT",
    "DEFAULT_DICOM_QUEUE_SIZE",
    "DEFAULT_DICOM_WORKERS",
    "DEFAULT_FFT_THREADS",
    "DEFAULT_GRACE_SECONDS",
    "DEFAULT_HEALTH_PORT",
    "DEFAULT_HOST",
    "DEFAULT_LOG_FORMAT",
    "DEFAULT_LOG_LEVEL",
    "DEFAULT_MAX_CONCURRENT_RPCS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "DEFAULT_METRICS_PORT",
    "DEFAULT_OUTCOME_CACHE_SIZE",
    "DEFAULT_PORT",
    "DEFAULT_STORE_MAX_AGE_DAYS",
    "DEFAULT_STORE_MAX_ROWS",
    "DEFAULT_WINDOW_IMAGES",
    "DEFAULT_WINDOW_SECONDS",
    "DEFAULT_WORKERS",
    "ENV_PREFIX",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MIN_TOKEN_CHARS",
    "Settings",
    "available_cpus",
    "env_name",
]

ENV_PREFIX = "CXR_MONITOR_"

DEFAULT_HEALTH_PORT = -1
DEFAULT_WORKERS = 4
DEFAULT_FFT_THREADS = 1
DEFAULT_DECODE_PROCESSES = "auto"
DEFAULT_WINDOW_IMAGES = 200
DEFAULT_WINDOW_SECONDS = 300.0
DEFAULT_MAX_CONCURRENT_RPCS = 64
DEFAULT_GRACE_SECONDS = 8.0
DEFAULT_OUTCOME_CACHE_SIZE = 100_000
DEFAULT_STORE_MAX_AGE_DAYS = 365.0
# ~0.8 GB: ~380 bytes a row at 31 features (benchmarks/results/store_cost.md).
DEFAULT_STORE_MAX_ROWS = 2_000_000
DEFAULT_DICOM_PORT = -1
DEFAULT_DICOM_AE_TITLE = "CXRMONITOR"
DEFAULT_DICOM_QUEUE_SIZE = 16  # a quarter of max_concurrent_rpcs: a DICOM flood leaves gRPC room
DEFAULT_DICOM_WORKERS = 2
DEFAULT_LOG_FORMAT = "json"
DEFAULT_LOG_LEVEL = "INFO"
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# A bearer token shorter than this is refused: it could be guessed.
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Settings:
    """Everything ``cxr-monitor serve`` can be told; see the module docstring for precedence.

    Each field documents itself in ``metadata["help"]`` (also the ``--flag`` help text).
    """

    model: Path = field(
        default_factory=bundled_model_dir,
        metadata={"help": "Model directory written by ``cxr-monitor fit``."},
    )

    host: str = field(
        default=DEFAULT_HOST,
        metadata={"help": "Address the gRPC and metrics servers bind to (0.0.0.0: every IPv4 interface)."},
    )

    port: int = field(default=DEFAULT_PORT, metadata={"help": "gRPC port; 0 picks a free port (tests)."})

    metrics_port: int = field(
        default=DEFAULT_METRICS_PORT,
        metadata={
            "help": "Port of the Prometheus /metrics HTTP server; 0 picks a free port, -1 disables it."
        },
    )

    metrics_host: str = field(
        default="",
        metadata={
            "help": "Address the /metrics server binds to; empty: the same as --host. E.g. 127.0.0.1 "
            "to keep metrics on the pod, or the gRPC port public and metrics on an internal interface."
        },
    )

    health_port: int = field(
        default=DEFAULT_HEALTH_PORT,
        metadata={
            "help": "A second gRPC port on --host that serves only grpc.health.v1, in plaintext and "
            "without a token, for probes that can do neither (Kubernetes gRPC probes) when the main "
            "port uses TLS; 0 picks a free port, -1 disables it. Health on the main port stays open too."
        },
    )

    tls_cert: Path | None = field(
        default=None,
        metadata={
            "help": "PEM certificate chain of the server: serve gRPC over TLS (with --tls-key). "
            "Read at start; restart to rotate."
        },
    )

    tls_key: Path | None = field(default=None, metadata={"help": "PEM private key of --tls-cert."})

    tls_client_ca: Path | None = field(
        default=None,
        metadata={
            "help": "PEM CA certificates: require a client certificate signed by one of them (mutual "
            "TLS); needs --tls-cert."
        },
    )

    auth_token: str = field(
        default="",
        repr=False,
        metadata={
            "secret": True,
            "help": "Bearer token every cxrmonitor.v1 call must carry (metadata `authorization: Bearer "
            "<token>`); UNAUTHENTICATED otherwise. Health and reflection stay open. Environment only, "
            "never a flag (argv is visible to every user); or use --auth-token-file.",
        },
    )

    auth_token_file: Path | None = field(
        default=None,
        metadata={"help": "File holding the auth token (e.g. a mounted Kubernetes secret)."},
    )

    outcome_token: str = field(
        default="",
        repr=False,
        metadata={
            "secret": True,
            "help": "Bearer token for ReportOutcome instead of the auth token, so that whoever scores "
            "cannot report outcomes and the reporter cannot score. Environment only; or use "
            "--outcome-token-file.",
        },
    )

    outcome_token_file: Path | None = field(
        default=None, metadata={"help": "File holding the outcome token."}
    )

    workers: int = field(
        default=DEFAULT_WORKERS,
        metadata={
            "help": "Images scored at the same time (threads; about two per decoder process keep them busy)."
        },
    )

    fft_threads: int = field(
        default=DEFAULT_FFT_THREADS,
        metadata={
            "help": "FFTW threads per transform (the server scales by running transforms side by side)."
        },
    )

    decode_processes: int | str = field(
        default=DEFAULT_DECODE_PROCESSES,
        metadata={
            "help": "Processes that decode and profile encoded images, so that decoders holding the GIL "
            "(JPEG 2000 DICOM) still use every core and a decoder crash kills a child, not the server. "
            "auto: one per available CPU (affinity and cgroup quota), at most --workers, none on one CPU; "
            "0: decode in the scoring threads."
        },
    )

    decode_timeout: float = field(
        default=DEFAULT_DECODE_TIMEOUT,
        metadata={
            "help": "Seconds a decoder process may spend on one image before it is killed and replaced "
            "(a decoder stuck on a hostile file); the request then fails with RESOURCE_EXHAUSTED, or "
            "DEADLINE_EXCEEDED when the caller's deadline comes first. Decoder processes only."
        },
    )

    window_images: int = field(
        default=DEFAULT_WINDOW_IMAGES,
        metadata={"help": "Size of the count drift window: the last N images scored."},
    )

    window_seconds: float = field(
        default=DEFAULT_WINDOW_SECONDS, metadata={"help": "Span of the time drift window, in seconds."}
    )

    max_message_bytes: int = field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        metadata={"help": "Largest gRPC message accepted or sent (RESOURCE_EXHAUSTED above)."},
    )

    max_pixels: int = field(
        default=DEFAULT_MAX_PIXELS,
        metadata={"help": "Largest image (rows * columns, read from the header before decoding) accepted."},
    )

    max_concurrent_rpcs: int = field(
        default=DEFAULT_MAX_CONCURRENT_RPCS,
        metadata={
            "help": "Scoring RPCs in flight (running or queued) before new ones get RESOURCE_EXHAUSTED."
        },
    )

    memory_budget_bytes: int = field(
        default=DEFAULT_MEMORY_BUDGET_BYTES,
        metadata={
            "help": "Bytes the images being scored may need together (encoded bytes plus decoded pixels, "
            "estimated from each image's header before decoding); a request beyond it gets "
            "RESOURCE_EXHAUSTED at once. 0: no limit. Size the container for the server's own "
            "memory plus this (deploy/README.md)."
        },
    )

    grace_seconds: float = field(
        default=DEFAULT_GRACE_SECONDS,
        metadata={"help": "On SIGTERM/SIGINT, how long in-flight requests may take to finish."},
    )

    outcome_cache_size: int = field(
        default=DEFAULT_OUTCOME_CACHE_SIZE,
        metadata={"help": "Request ids remembered for ReportOutcome (least recently used forgotten first)."},
    )

    store: str = field(
        default="",
        metadata={
            "help": "SQLite file keeping every scored request (id, time, model id, cluster, probabilities, "
            "novelty, spectral profile: no pixels, names or patient data) and each reported outcome, "
            "committed before ReportOutcome answers; per-cluster outcome tallies and recent request ids "
            "are restored from it on start, and `cxr-monitor refit` re-estimates failure rates from it. "
            "Empty: outcomes are kept in memory only and lost on restart."
        },
    )

    store_max_age_days: float = field(
        default=DEFAULT_STORE_MAX_AGE_DAYS,
        metadata={"help": "Stored requests older than this many days are deleted (checked every minute)."},
    )

    store_max_rows: int = field(
        default=DEFAULT_STORE_MAX_ROWS,
        metadata={"help": "Most stored requests kept; the oldest are deleted first (checked every minute)."},
    )

    dicom_port: int = field(
        default=DEFAULT_DICOM_PORT,
        metadata={
            "help": "Port of the DICOM storage node (C-ECHO, C-STORE of radiographs), on --host; "
            "-1 (default) disables it, 0 picks a free port (tests). DICOM's usual port is 11112 (or 104)."
        },
    )

    dicom_ae_title: str = field(
        default=DEFAULT_DICOM_AE_TITLE,
        metadata={"help": "The DICOM node's own AE title (1-16 characters, no backslash)."},
    )

    dicom_allowed_aes: str = field(
        default="",
        metadata={
            "help": "Comma-separated calling AE titles allowed to associate, each optionally "
            "restricted to one peer address as TITLE@IP (e.g. 'ORTHANC@10.0.0.5,CR_ROOM1'); empty "
            "(default): anyone. Allowed titles are also the per-source metric labels; any other "
            "caller is counted as 'other'."
        },
    )

    dicom_queue_size: int = field(
        default=DEFAULT_DICOM_QUEUE_SIZE,
        metadata={
            "help": "Received instances waiting to be scored; when full, C-STORE answers 0xA700 "
            "(out of resources) at once instead of making the sender wait. Queued instances also "
            "count in --max-concurrent-rpcs and --memory-budget-bytes, shared with gRPC requests."
        },
    )

    dicom_workers: int = field(
        default=DEFAULT_DICOM_WORKERS,
        metadata={"help": "Threads scoring the DICOM node's queue."},
    )

    dicom_tls_cert: str = field(
        default="",
        metadata={
            "help": "PEM certificate of the DICOM node; with --dicom-tls-key it speaks DICOM TLS only."
        },
    )

    dicom_tls_key: str = field(default="", metadata={"help": "PEM private key of --dicom-tls-cert."})

    dicom_tls_ca: str = field(
        default="",
        metadata={
            "help": "PEM CA bundle: with TLS on, callers must present a certificate signed by it "
            "(mutual TLS); empty: any caller that completes the TLS handshake."
        },
    )

    log_format: str = field(
        default=DEFAULT_LOG_FORMAT,
        metadata={
            "help": "``json`` (one object per line: ts, level, logger, msg and extra fields) or ``text``."
        },
    )

    log_level: str = field(default=DEFAULT_LOG_LEVEL, metadata={"help": "DEBUG, INFO, WARNING or ERROR."})

    scope_modalities: str = field(
        default="",
        metadata={
            "help": "Comma-separated (0008,0060) Modality values the model covers, replacing the model's "
            "allow-list (learned at fit: CR, DR, DX, RG and the fit set's); * accepts any; empty keeps "
            "the model's. A DICOM outside it is scored as out of scope and not trusted."
        },
    )

    scope_body_parts: str = field(
        default="",
        metadata={
            "help": "Comma-separated (0018,0015) Body Part Examined values the model covers (model's list: "
            "CHEST, LUNG, THORAX and the fit set's); * accepts any; empty keeps the model's."
        },
    )

    scope_view_positions: str = field(
        default="",
        metadata={
            "help": "Comma-separated (0018,5101) View Position values the model covers (model's list: the "
            "projection radiograph views and the fit set's); * accepts any; empty keeps the model's."
        },
    )

    @property
    def scope_overrides(self) -> dict[str, str]:
        """The scope allow-lists given, by :class:`~monitor.scope.ScopeRules` field (empty: none)."""
        given = {
            "modalities": self.scope_modalities,
            "body_parts": self.scope_body_parts,
            "view_positions": self.scope_view_positions,
        }
        return {k: v for k, v in given.items() if v.strip()}

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", Path(self.model))
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "outcome_token_file"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "log_format", self.log_format.lower())
        object.__setattr__(self, "log_level", self.log_level.upper())
        for name in ("workers", "fft_threads", "window_images", "max_message_bytes", "max_pixels",
                     "max_concurrent_rpcs", "outcome_cache_size", "store_max_rows", "dicom_queue_size",
                     "dicom_workers"):  # fmt: skip
            if getattr(self, name) < 1:
                raise InvalidInputError(f"setting {name} must be >= 1, got {getattr(self, name)}")
        if self.memory_budget_bytes < 0:
            raise InvalidInputError(
                f"setting memory_budget_bytes must be >= 0, got {self.memory_budget_bytes}"
            )
        for name in ("window_seconds", "grace_seconds", "decode_timeout", "store_max_age_days"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"setting {name} must be > 0, got {getattr(self, name)}")
        object.__setattr__(
            self, "decode_processes", _count_or_auto("decode_processes", self.decode_processes)
        )
        if not 0 <= self.port <= 65535:
            raise InvalidInputError(f"setting port must be in 0..65535, got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise InvalidInputError(
                f"setting metrics_port must be -1 (off) or in 0..65535, got {self.metrics_port}"
            )
        if not -1 <= self.health_port <= 65535:
            raise InvalidInputError(
                f"setting health_port must be -1 (off) or in 0..65535, got {self.health_port}"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInputError("settings tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidInputError(
                "setting tls_client_ca (mutual TLS) needs tls_cert and tls_key: the server must use TLS"
            )
        for name in ("auth_token", "outcome_token"):
            value = getattr(self, name)
            if value and getattr(self, name + "_file") is not None:
                raise InvalidInputError(f"settings {name} and {name}_file are exclusive: give one")
            if value and (
                len(value) < MIN_TOKEN_CHARS or not (value.isascii() and value.isprintable()) or " " in value
            ):
                raise InvalidInputError(
                    f"setting {name} must be at least {MIN_TOKEN_CHARS} printable ASCII characters without "
                    f"spaces (got {len(value)} characters)"
                )
        if not -1 <= self.dicom_port <= 65535:
            raise InvalidInputError(
                f"setting dicom_port must be -1 (off) or in 0..65535, got {self.dicom_port}"
            )
        title = self.dicom_ae_title.strip()
        if not 1 <= len(title) <= 16 or "\\" in title or not title.isprintable():
            raise InvalidInputError(
                f"setting dicom_ae_title must be 1-16 printable characters without a backslash, "
                f"got {self.dicom_ae_title!r}"
            )
        object.__setattr__(self, "dicom_ae_title", title)
        _ = self.dicom_allowed_callers  # validates the list now, not at the first association
        if bool(self.dicom_tls_cert) != bool(self.dicom_tls_key):
            raise InvalidInputError(
                "settings dicom_tls_cert and dicom_tls_key go together: give both for DICOM TLS, or neither"
            )
        if self.dicom_tls_ca and not self.dicom_tls_cert:
            raise InvalidInputError(
                "setting dicom_tls_ca needs dicom_tls_cert and dicom_tls_key (TLS is off)"
            )
        if self.log_format not in LOG_FORMATS:
            raise InvalidInputError(
                f"setting log_format must be one of {LOG_FORMATS}, got {self.log_format!r}"
            )
        if self.log_level not in LOG_LEVELS:
            raise InvalidInputError(f"setting log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        for name in ("scope_modalities", "scope_body_parts", "scope_view_positions"):
            value = getattr(self, name)
            if value.strip() and not any(v.strip() for v in value.split(",")):
                raise InvalidInputError(f"setting {name} needs at least one value or '*', got {value!r}")

    @property
    def decode_process_count(self) -> int:
        """``decode_processes`` with ``auto`` resolved on this machine (0: decode in-thread)."""
        if self.decode_processes != "auto":
            return int(self.decode_processes)
        cpus = available_cpus()
        # One process per CPU; more processes than workers would never all be busy, and on one
        # CPU the processes would only add IPC to the same core.
        return min(cpus, self.workers) if cpus >= 2 else 0

    @property
    def dicom_allowed_callers(self) -> dict[str, str | None]:
        """``dicom_allowed_aes`` parsed: AE title → required peer address (None: any address)."""
        callers: dict[str, str | None] = {}
        for entry in self.dicom_allowed_aes.split(","):
            entry = entry.strip()
            if not entry:
                continue
            title, _, host = entry.partition("@")
            title, host = title.strip(), host.strip()
            if not 1 <= len(title) <= 16 or "\\" in title:
                raise InvalidInputError(
                    f"setting dicom_allowed_aes: {entry!r} is not an AE title (1-16 characters, "
                    "no backslash), optionally followed by @IP"
                )
            if host:
                try:
                    host = str(ipaddress.ip_address(host))
                except ValueError:
                    raise InvalidInputError(
                        f"setting dicom_allowed_aes: {host!r} in {entry!r} is not an IP address"
                    ) from None
            callers[title] = host or None
        return callers

    @property
    def address(self) -> str:
        """``host:port`` for the gRPC server (IPv6 hosts bracketed)."""
        return _join(self.host, self.port)

    @property
    def health_address(self) -> str | None:
        """``host:health_port`` of the plaintext health-only server, or None when disabled."""
        return None if self.health_port < 0 else _join(self.host, self.health_port)

    @property
    def metrics_bind_host(self) -> str:
        """Where /metrics listens: ``metrics_host``, else ``host``."""
        return self.metrics_host or self.host

    @classmethod
    def load(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Settings from ``overrides`` (e.g. parsed flags) over ``environ`` over the defaults.

        Parameters
        ----------
        overrides : mapping, optional
            Field name to value; ``None`` values and unknown names are ignored, so an
            ``argparse.Namespace`` whose flags default to ``None`` can be passed as ``vars(args)``.
        environ : mapping, optional
            Environment variables (default: ``os.environ``); ``CXR_MONITOR_<FIELD>``.

        Raises
        ------
        InvalidInputError
            An environment variable cannot be parsed or a value is out of range; the
            message names the variable or setting.
        """
        env = os.environ if environ is None else environ
        overrides = overrides or {}
        values: dict[str, Any] = {}
        for f in fields(cls):
            if overrides.get(f.name) is not None:
                values[f.name] = overrides[f.name]
                continue
            raw = env.get(env_name(f.name))
            if raw is not None and raw.strip() != "":
                values[f.name] = _parse(f, raw.strip())
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain values for the start-up log; secrets show only whether they are set."""
        d = dataclasses.asdict(self)
        for f in fields(self):
            if isinstance(d[f.name], Path):
                d[f.name] = str(d[f.name])
            if f.metadata.get("secret"):
                d[f.name] = "(set)" if d[f.name] else ""
        d["decode_process_count"] = self.decode_process_count
        return d


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota.

    ``os.cpu_count()`` reports the host's CPUs; in a container limited to 2 CPUs on a
    64-core node that would start 64 processes.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(cpus, 1)


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup v2 ``cpu.max`` or v1 CFS quota under ``root``, or None."""
    candidates = (
        (root / "cpu.max", None),
        (root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"),
    )
    for path, period_path in candidates:
        try:
            text = path.read_text().split()
            if period_path is None:
                quota, period = text[0], text[1]
            else:
                quota, period = text[0], period_path.read_text().split()[0]
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            return int(quota) / int(period)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def _count_or_auto(name: str, value: int | str) -> int | str:
    """``auto`` or a whole number >= 0 (given as int or text)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"setting {name} must be 'auto' or a whole number >= 0, got {value!r}"
        ) from None
    if count < 0 or isinstance(value, float):
        raise InvalidInputError(f"setting {name} must be 'auto' or a whole number >= 0, got {value!r}")
    return count


def _join(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{host}:{port}"


def env_name(field_name: str) -> str:
    """The environment variable of a setting: ``metrics_port`` → ``CXR_MONITOR_METRICS_PORT``."""
    return ENV_PREFIX + field_name.upper()


def _parse(f: dataclasses.Field, raw: str) -> Any:
    if str(f.type) == "int | str":
        return _count_or_auto(f.name, raw)
    kind = {"Path": Path, "Path | None": Path, "int": int, "float": float, "str": str}[str(f.type)]
    try:
        return kind(raw)
    except ValueError:
        raise InvalidInputError(
            f"environment variable {env_name(f.name)}={raw!r} is not a valid {kind.__name__}"
        ) from None
