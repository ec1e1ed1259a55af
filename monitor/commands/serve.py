"""``cxr-monitor serve`` and ``cxr-monitor health``: run the sidecar, probe it.

grpc is imported inside the command functions only, so other subcommands never load it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import fields
from typing import Any

from ..defaults import DEFAULT_PORT, EXIT_OK
from ..settings import Settings, env_name
from .output import add_command
from .remote import add_connection_options, connect

__all__ = ["register"]

log = logging.getLogger("cxr_monitor.server")

_FLAG_TYPES = {"Path": str, "Path | None": str, "int": int, "float": float, "str": str, "int | str": str}


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..server.logs import configure_logging
    from ..server.service import build_engine, build_server

    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    if args.verbose and overrides["log_level"] is None:
        overrides["log_level"] = "DEBUG"
    settings = Settings.load(overrides)
    configure_logging(settings.log_format, settings.log_level)
    log.info("starting", extra={"settings": settings.to_dict()})

    stop = threading.Event()
    reload = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        (reload if signum == signal.SIGHUP else stop).set()

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in signals}
    try:
        server, _ = build_server(settings)
        server.start()  # listening and NOT_SERVING while the model loads
        engine = None
        try:
            engine = build_engine(settings)
            if not stop.is_set():
                server.attach(engine)
                reload.clear()  # a SIGHUP while loading: the model just loaded is the current one
            while not stop.wait(0.5):
                if reload.is_set():
                    reload.clear()
                    server.reload()  # in this thread: the signal handler only sets the event
        finally:
            server.stop(settings.grace_seconds)
            if engine is not None:
                engine.close()  # its decoder processes, once no call is scoring
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return EXIT_OK


def _cmd_health(args: argparse.Namespace) -> int:
    import grpc

    address = args.address
    if address is None:
        # Where `serve` would listen in this environment (CXR_MONITOR_HOST/PORT, or the plaintext
        # CXR_MONITOR_HEALTH_PORT when set), so that a container HEALTHCHECK follows a changed
        # port and needs no TLS files; loopback for a wildcard host.
        settings = Settings.load({})
        port = settings.health_port if settings.health_port >= 0 else settings.port
        wildcard = settings.host in ("0.0.0.0", "::", "[::]", "")
        host = "127.0.0.1" if wildcard else settings.address.rsplit(":", 1)[0]
        address = f"{host}:{port}"
    with connect(args, address) as client:
        try:
            status = client.health(args.service, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(status)
    return EXIT_OK if status == "SERVING" else 1


def register(sub: Any) -> None:
    """Add ``serve`` and ``health`` to the ``cxr-monitor`` subparsers."""
    defaults = Settings()
    p = add_command(
        sub,
        "serve",
        "run the gRPC reliability sidecar with Prometheus metrics",
        """
        Serve cxrmonitor.v1.ReliabilityMonitor (Score, ScoreStream, ReportOutcome,
        GetModelInfo; protos/cxr_monitor/v1/monitor.proto) with grpc.health.v1 health
        checking and server reflection, and Prometheus metrics on /metrics. With
        --dicom-port, also a DICOM storage node (C-ECHO, C-STORE of CR, DX and Secondary
        Capture) that scores every radiograph a PACS or router sends it, per calling AE title.

        Health is NOT_SERVING while the model loads, SERVING after, NOT_SERVING again
        from SIGTERM/SIGINT: the server then refuses new calls, lets in-flight ones
        finish within --grace-seconds and exits 0.

        SIGHUP reloads --model: the new model is loaded, its manifest verified and a
        test image scored, then it replaces the old one atomically; calls in flight
        finish on the old model, drift windows restart empty. A model that fails is
        refused (ERROR log line, cxr_monitor_model_reloads_total{result="refused"})
        and the old one keeps serving.

        With --store, every scored request (numbers only: no pixels, names or patient
        data) and every outcome goes to an SQLite file; an outcome is on disk before
        ReportOutcome answers, and a restart restores the per-cluster outcome tallies
        and the request ids that can still be reported. `cxr-monitor refit` re-fits the
        failure rates from that file.

        Each option can also be set by an environment variable (shown in brackets);
        a flag wins over the variable, the variable over the default. Logs go to
        stderr, by default as JSON lines (ts, level, logger, msg, ...).

        Security (deploy/README.md): --tls-cert/--tls-key serve TLS, --tls-client-ca
        requires client certificates (mutual TLS). A bearer token (metadata
        "authorization: Bearer <token>") is required when one is configured:
        --auth-token-file or CXR_MONITOR_AUTH_TOKEN for every cxrmonitor.v1 call,
        --outcome-token-file or CXR_MONITOR_OUTCOME_TOKEN for ReportOutcome instead.
        Tokens are never flags (argv is visible to every user). Health and
        reflection need no token; --health-port serves health in plaintext for
        probes that cannot do TLS.
        """,
        """
        examples:
          cxr-monitor serve
          cxr-monitor serve --model models/mine --port 50051 --metrics-port 9108 --workers 2
          CXR_MONITOR_WORKERS=2 CXR_MONITOR_LOG_FORMAT=text cxr-monitor serve
          cxr-monitor serve --tls-cert tls.crt --tls-key tls.key --tls-client-ca ca.crt \\
              --auth-token-file /run/secrets/token --health-port 50052 --metrics-host 127.0.0.1
          cxr-monitor serve --store /var/lib/cxr-monitor/outcomes.sqlite
          kill -HUP <pid>      # reload the model directory
          cxr-monitor serve --dicom-port 11112 --dicom-allowed-aes 'ORTHANC@10.0.0.5,CR_ROOM1'
        """,
    )
    for f in fields(Settings):
        if f.metadata.get("secret"):  # environment only: argv is visible to every user (ps)
            p.set_defaults(**{f.name: None})
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kwargs: dict[str, Any] = {"type": _FLAG_TYPES[str(f.type)], "default": None, "dest": f.name}
        if f.name == "log_format":
            kwargs["choices"] = ("json", "text")
        metavar = {"model": "MODEL_DIR", "host": "HOST", "metrics_host": "HOST", "decode_processes": "N|auto",
                   "tls_cert": "PEM", "tls_key": "PEM", "tls_client_ca": "PEM", "auth_token_file": "FILE",
                   "outcome_token_file": "FILE", "store": "FILE"}.get(f.name)  # fmt: skip
        if metavar:
            kwargs["metavar"] = metavar
        help_text = f.metadata["help"].replace("``", "").replace("%", "%%")
        kwargs["help"] = f"{help_text} [{env_name(f.name)}] (default: {default})"
        p.add_argument(flag, **kwargs)
    p.set_defaults(func=_cmd_serve)

    p = add_command(
        sub,
        "health",
        "check a sidecar's health (exit 0 if SERVING)",
        """
        Ask the grpc.health.v1 service of a running sidecar. Prints the status
        (SERVING, NOT_SERVING, SERVICE_UNKNOWN) or the gRPC error; exit status 0 when
        SERVING, 1 otherwise. Suitable as a Docker HEALTHCHECK.
        """,
        "examples:\n  cxr-monitor health\n  cxr-monitor health --address localhost:50051",
    )
    add_connection_options(p, default=None, default_text=f"where serve would listen here: {env_name('host')} "
             f"(127.0.0.1 for 0.0.0.0) and {env_name('health_port')} if set, else {env_name('port')}, "
             f"else 127.0.0.1:{DEFAULT_PORT}")  # fmt: skip
    p.set_defaults(timeout=3.0)
    p.add_argument("--service", default="", help='service name to check (default: "", the whole server)')
    p.set_defaults(func=_cmd_health)
