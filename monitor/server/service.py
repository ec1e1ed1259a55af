"""Build, start and stop the sidecar: gRPC server, health, reflection, /metrics.

Health (``grpc.health.v1``) is NOT_SERVING for ``""`` and ``cxrmonitor.v1.ReliabilityMonitor``
until a model is attached, SERVING after, and NOT_SERVING again from the start of
shutdown. :meth:`MonitorServer.stop` stops accepting RPCs, lets in-flight ones finish
within the grace period, then stops the metrics server, the scoring pool and the
outcome store. :meth:`MonitorServer.reload` swaps in a new model while serving.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from ..engine import Engine
from ..errors import MonitorError
from ..metrics import DicomMetrics, MonitorMetrics
from ..proto import monitor_pb2_grpc as pb_grpc
from ..settings import Settings
from ..store import OutcomeStore
from .handler import RequestHandler, Serving
from .logs import configure_logging
from .security import CallGate, CountingExecutor, read_token, server_credentials
from .servicer import SERVICE_NAME, ReliabilityMonitorServicer

if TYPE_CHECKING:
    from .dicom import DicomNode

__all__ = ["MonitorServer", "build_engine", "build_server"]

log = logging.getLogger("cxr_monitor.server")

# RPC slots and handler threads beyond max_concurrent_rpcs, so model info and outcomes are
# answered (and overloaded scoring RPCs rejected promptly) when scoring is saturated. The slots
# are counted by the CallGate, not by grpc's `maximum_concurrent_rpcs`: that option counts
# health checks too, so a busy server refused them ("Concurrent RPC limit exceeded") and
# Kubernetes restarted it. Health Check is never counted and has threads of its own.
_SPARE = 8


class _BindError(MonitorError):
    code = "failed_precondition"


class MonitorServer:
    """The sidecar; use :func:`build_server`.

    Attributes
    ----------
    port : int
        The bound gRPC port (the real one when settings.port is 0).
    metrics_port : int or None
        The bound /metrics port once started (None when disabled or not started).
    registry : CollectorRegistry
    handler : RequestHandler
    """

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = MonitorMetrics(self.registry)
        self.metrics.model_loaded.set(0)
        self.store: OutcomeStore | None = None
        if settings.store:
            self.store = OutcomeStore(
                settings.store,
                max_age_seconds=settings.store_max_age_days * 86400.0,
                max_rows=settings.store_max_rows,
            )
            self.metrics.watch_store(self.store.stats)
        try:
            self._build(settings)
        except BaseException:
            if self.store is not None:
                self.store.close()
            raise
        self._reload_lock = threading.Lock()
        self._reloaded: Engine | None = None  # the engine the last reload built: closed at stop()
        self._retiring: list[threading.Thread] = []

    def _build(self, settings: Settings) -> None:
        self.handler = RequestHandler(settings, self.metrics, self.store)
        self.health = health.HealthServicer()
        credentials = server_credentials(settings)
        limit = settings.max_concurrent_rpcs + _SPARE
        handlers = CountingExecutor(max_workers=limit, thread_name_prefix="grpc")
        self.gate = CallGate(
            SERVICE_NAME,
            auth_token=read_token(settings.auth_token, settings.auth_token_file, "auth_token"),
            outcome_token=read_token(settings.outcome_token, settings.outcome_token_file, "outcome_token"),
            on_reject=lambda method, code: self.metrics.requests.labels(method=method, code=code).inc(),
            handlers=handlers,
            rpc_limit=limit,
        )
        self.grpc_server = grpc.server(
            handlers,
            interceptors=[self.gate],
            options=_OPTIONS
            + [
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
            ],
        )
        pb_grpc.add_ReliabilityMonitorServicer_to_server(
            ReliabilityMonitorServicer(self.handler), self.grpc_server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server
        )
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = _bind(self.grpc_server, settings.address, credentials, "gRPC")
        # Probes that can send neither a token nor a TLS handshake (Kubernetes gRPC probes) get a
        # plaintext port that serves health only; the scoring API never listens there.
        self.health_server: grpc.Server | None = None
        self.health_port: int | None = None
        if settings.health_address is not None:
            self.health_server = grpc.server(
                ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"), options=_OPTIONS
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = _bind(self.health_server, settings.health_address, None, "health checks")
        self._metrics_http: WSGIServer | None = None
        self.metrics_port: int | None = None
        self.dicom: DicomNode | None = None
        if settings.dicom_port >= 0:
            # Imported here so that a sidecar without the DICOM node never loads pynetdicom.
            from . import dicom

            self.dicom = dicom.DicomNode(settings, self.handler, self.metrics, DicomMetrics(self.registry))

    def start(self) -> None:
        """Start serving RPCs (NOT_SERVING until :meth:`attach`) and /metrics."""
        self.grpc_server.start()
        if self.health_server is not None:
            self.health_server.start()
        s = self.settings
        if s.metrics_port >= 0:
            host = s.metrics_bind_host
            try:
                self._metrics_http, _ = start_http_server(s.metrics_port, addr=host, registry=self.registry)
            except OSError as exc:
                self.grpc_server.stop(None)
                if self.health_server is not None:
                    self.health_server.stop(None)
                raise _BindError(f"cannot listen on {host}:{s.metrics_port} for /metrics ({exc})") from exc
            self.metrics_port = self._metrics_http.server_port
        if self.dicom is not None:
            try:
                self.dicom.start()
            except MonitorError:
                self.grpc_server.stop(None)
                if self.health_server is not None:
                    self.health_server.stop(None)
                if self._metrics_http is not None:
                    self._metrics_http.shutdown()
                    self._metrics_http.server_close()
                raise
        log.info(
            "listening",
            extra={
                "address": s.address,
                "port": self.port,
                "tls": "mutual" if s.tls_client_ca else ("server" if s.tls_cert else "off"),
                "health_port": self.health_port,
                "metrics_port": self.metrics_port,
                "dicom_port": self.dicom_port,
            },
        )

    @property
    def dicom_port(self) -> int | None:
        """The bound DICOM port once started (None when the node is disabled or not started)."""
        return None if self.dicom is None else self.dicom.port

    def attach(self, engine: Engine) -> None:
        """Serve ``engine``'s model: metrics describe it, health turns SERVING."""
        self.handler.attach(engine)
        self._describe(engine)
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        d = self.handler.description
        assert d is not None
        log.info("model loaded, serving", extra={"model_id": d.model_id, "clusters": engine.model.n_clusters})

    def reload(self, directory: str | os.PathLike | None = None) -> bool:
        """Load, check and swap in the model in ``directory`` (default: settings.model).

        Calls in flight finish on the old model; new calls use the new one. Drift windows
        restart empty (they compare with the model's own reference); the outcome log of the
        new model is restored from the store. A model that fails to load (bad manifest,
        other spec version, unreadable) or to score is refused: an ERROR log line,
        ``cxr_monitor_model_reloads_total{result="refused"}``, and the old model keeps serving.

        The new engine is built like ``serve``'s (:func:`build_engine`) and belongs to the
        server: the old one (its decoder processes) is closed once its last call has
        finished, the last one built here at :meth:`stop`.

        Returns
        -------
        bool
            True if the new model is now served.
        """
        directory = self.settings.model if directory is None else directory
        with self._reload_lock:  # one reload at a time (SIGHUP twice in a row)
            if self.handler.serving is None:
                log.error(
                    "model reload refused: no model is attached yet", extra={"model_dir": str(directory)}
                )
                self.metrics.model_reloads.labels(result="refused").inc()
                return False
            engine = None
            try:
                engine = build_engine(dataclasses.replace(self.settings, model=Path(directory)))
                old = self.handler.swap(engine)
            except Exception as exc:  # any failure leaves the old model serving
                if engine is not None:
                    engine.close()
                log.error(
                    "model reload refused: %s",
                    exc,
                    extra={"model_dir": str(directory), "error": str(exc), "error_type": type(exc).__name__},
                )
                self.metrics.model_reloads.labels(result="refused").inc()
                return False
            self._reloaded = engine
            retire = threading.Thread(target=self._retire, args=(old,), name="retire-model", daemon=True)
            retire.start()
            self._retiring.append(retire)
            self._describe(engine)
            self.metrics.model_reloads.labels(result="loaded").inc()
            log.info(
                "model reloaded",
                extra={"model_id": self.handler.serving.description.model_id,
                       "previous_model_id": old.description.model_id, "model_dir": str(directory)},
            )  # fmt: skip
            return True

    @staticmethod
    def _retire(old: Serving) -> None:
        """Close a swapped-out engine once the calls that started on it have finished."""
        old.calls.wait_idle(None)
        old.engine.close()
        log.info("previous model closed", extra={"model_id": old.description.model_id})

    def _describe(self, engine: Engine) -> None:
        """Point the model metrics and drift gauges at the served model."""
        m = engine.model
        d = self.handler.description
        assert d is not None
        self.metrics.set_model(
            model_id=d.model_id,
            spec_version=d.spec_version,
            version=d.server_version,
            reference_mix=m.reference_mix,
            reference_failure_rate=m.reference_failure_probability,
            blind_spots=m.rates.blind_spot_,
        )
        windows = self.handler.windows
        assert windows is not None
        self.metrics.watch_windows(windows.snapshot)
        sources = self.handler.source_windows
        assert sources is not None
        self.metrics.watch_source_windows(sources.snapshot)

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new RPCs, give in-flight ones ``grace`` seconds (default: settings), stop."""
        grace = self.settings.grace_seconds if grace is None else grace
        log.info("shutting down", extra={"grace_seconds": grace})
        self.health.enter_graceful_shutdown()
        if self.dicom is not None:
            self.dicom.stop(grace)
        self.grpc_server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(None).wait()
        self.gate.close()
        self.metrics.model_loaded.set(0)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        self.handler.close()
        for retire in self._retiring:
            retire.join(grace)
        if self._reloaded is not None:
            self._reloaded.close()
        if self.store is not None:
            self.store.close()
        log.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the gRPC server has stopped; True if it did within ``timeout``."""
        return self.grpc_server.wait_for_termination(timeout)


# Without so_reuseport=0, a second server on the same port would silently share it.
_OPTIONS: list[tuple[str, int]] = [("grpc.so_reuseport", 0)]


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None, what: str) -> int:
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise _BindError(f"cannot listen on {address} for {what} ({exc}); is the port in use?") from exc


def build_server(
    settings: Settings, engine: Engine | None = None, *, registry: CollectorRegistry | None = None
) -> tuple[MonitorServer, int]:
    """A sidecar bound to ``settings.host:settings.port`` (not started).

    Parameters
    ----------
    settings : Settings
    engine : Engine, optional
        Attached at once; without it the server answers NOT_SERVING / FAILED_PRECONDITION
        until :meth:`MonitorServer.attach` (so it can start listening while the model loads).
    registry : CollectorRegistry, optional
        Where the metrics go (default: a new one, exported on settings.metrics_port).

    Returns
    -------
    (MonitorServer, int)
        The server and its bound gRPC port. Call ``start()``, later ``stop()``.
    """
    server = MonitorServer(settings, registry)
    if engine is not None:
        server.attach(engine)
    return server, server.port


def build_engine(settings: Settings) -> Engine:
    """The engine ``serve`` runs: the model of ``settings.model`` with the server's decoding and
    scope settings.

    The caller closes it (:meth:`Engine.close`) after the server has stopped.
    """
    return Engine.from_directory(
        settings.model,
        max_pixels=settings.max_pixels,
        fft_threads=settings.fft_threads,
        decode_processes=settings.decode_process_count,
        decode_timeout=settings.decode_timeout,
        # Decoder processes log like the server (format, level, warnings as records): they share
        # its stderr, and raw warning lines would break a JSON log.
        decoder_setup=functools.partial(configure_logging, settings.log_format, settings.log_level),
        scope_overrides=settings.scope_overrides,
    )
