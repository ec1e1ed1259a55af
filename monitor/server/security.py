"""Transport security and the gate in front of every RPC: TLS, tokens, malformed messages, probes.

:func:`server_credentials` turns the ``tls_*`` settings into gRPC credentials (TLS, or
mutual TLS with ``tls_client_ca``). :class:`CallGate` is a server interceptor that sees
each call before grpc reads its message and

- checks the bearer token of ``cxrmonitor.v1`` calls (``authorization: Bearer <token>``,
  compared in constant time): ``ReportOutcome`` takes the outcome token when one is
  set, every other method the auth token; health and reflection stay open, because
  Kubernetes probes cannot send metadata;
- parses requests itself, so that bytes that are not the expected message (or hold
  invalid UTF-8) end the call with INVALID_ARGUMENT and one log line, instead of grpc's
  INTERNAL with a traceback;
- bounds the RPCs in flight (``rpc_limit``: running or waiting for a handler thread),
  answering RESOURCE_EXHAUSTED beyond, like grpc's ``maximum_concurrent_rpcs`` but
  without counting health checks, which that option refused on a busy server;
- runs health ``Check`` on its own small thread pool, so probes are answered while
  every handler thread is busy.

Calls the gate ends (no token, too many RPCs) are answered on a pool of their own and
without reading the request, so a flood of them neither waits for nor delays real work.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ..errors import InvalidInputError, MonitorError
from ..settings import MIN_TOKEN_CHARS, Settings

__all__ = [
    "AUTH_METADATA_KEY",
    "CallGate",
    "CountingExecutor",
    "SecurityConfigError",
    "read_token",
    "server_credentials",
]

log = logging.getLogger("cxr_monitor.server")

AUTH_METADATA_KEY = "authorization"
_BEARER = "bearer "
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class SecurityConfigError(MonitorError):
    """A TLS file or token file cannot be used; the message names the file and the setting."""

    code = "failed_precondition"


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"setting {setting}: cannot read {path} ({exc.strerror or exc})") from exc


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from ``tls_cert``/``tls_key`` (+ ``tls_client_ca``: mutual TLS), or None.

    Raises
    ------
    SecurityConfigError
        A file cannot be read or is not PEM.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    pem = {}
    for setting, path in (("tls_cert", settings.tls_cert), ("tls_key", settings.tls_key),
                          ("tls_client_ca", settings.tls_client_ca)):  # fmt: skip
        if path is None:
            continue
        pem[setting] = _read(path, setting)
        if b"-----BEGIN " not in pem[setting]:
            raise SecurityConfigError(f"setting {setting}: {path} is not a PEM file (no -----BEGIN line)")
    ca = pem.get("tls_client_ca")
    return grpc.ssl_server_credentials(
        [(pem["tls_key"], pem["tls_cert"])], root_certificates=ca, require_client_auth=ca is not None
    )


def read_token(value: str, path: Path | None, setting: str) -> str | None:
    """The token of a setting pair (``auth_token`` / ``auth_token_file``), or None when neither is set.

    A file's trailing newline is dropped (``echo token > file``); the token must still
    have at least :data:`~monitor.settings.MIN_TOKEN_CHARS` printable characters.
    """
    if path is None:
        return value or None
    raw = _read(path, setting + "_file")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise SecurityConfigError(f"setting {setting}_file: {path} must hold an ASCII token") from None
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise SecurityConfigError(
            f"setting {setting}_file: {path} must hold one token of at least {MIN_TOKEN_CHARS} printable "
            f"characters without spaces (found {len(token)} characters)"
        )
    return token


class _Malformed:
    """What the tolerant deserializer returns instead of raising: grpc would answer INTERNAL."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return _Malformed(str(exc) or type(exc).__name__)

    return parse


class _MalformedMessageError(InvalidInputError):
    pass


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


class CountingExecutor(ThreadPoolExecutor):
    """A thread pool that knows how many tasks it holds (queued or running).

    Every submitted task is counted until it returns, including those whose RPC was
    cancelled while queued (grpc still runs them, briefly), so the count cannot leak.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._count_lock = threading.Lock()
        self._held = 0

    @property
    def held(self) -> int:
        """Tasks submitted and not yet finished."""
        return self._held

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with self._count_lock:
            self._held += 1
        try:
            return super().submit(self._counted, fn, *args, **kwargs)
        except BaseException:
            self._done()
            raise

    def _counted(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            self._done()

    def _done(self) -> None:
        with self._count_lock:
            self._held -= 1


class CallGate(grpc.ServerInterceptor):
    """Token check, tolerant parsing and a separate pool for health checks (see the module docstring).

    Parameters
    ----------
    service : str
        Full name of the service whose calls need a token (``cxrmonitor.v1.ReliabilityMonitor``).
    auth_token, outcome_token : str, optional
        None: that part of the service is open. ``ReportOutcome`` uses ``outcome_token``
        when set, else ``auth_token``.
    on_reject : callable, optional
        ``on_reject(method, code_name)`` for each call of ``service`` the gate ends (metrics).
    handlers : CountingExecutor, optional
        The server's handler pool; with ``rpc_limit``, calls other than health checks get
        RESOURCE_EXHAUSTED while it holds ``rpc_limit`` tasks.
    rpc_limit : int, optional
    """

    def __init__(
        self,
        service: str,
        *,
        auth_token: str | None = None,
        outcome_token: str | None = None,
        on_reject: Callable[[str, str], None] | None = None,
        handlers: CountingExecutor | None = None,
        rpc_limit: int | None = None,
    ) -> None:
        self._prefix = f"/{service}/"
        self._tokens = {
            None: auth_token.encode() if auth_token else None,
            "ReportOutcome": (outcome_token or auth_token or "").encode() or None,
        }
        self._on_reject = on_reject or (lambda method, code: None)
        self._handlers = handlers
        self._rpc_limit = rpc_limit
        self._health_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="health")
        self._reject_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="reject")

    def close(self) -> None:
        self._health_pool.shutdown(wait=False, cancel_futures=True)
        self._reject_pool.shutdown(wait=False, cancel_futures=True)

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        ours = method.startswith(self._prefix)
        name = _short(method)
        if ours:
            expected = self._tokens.get(name, self._tokens[None])
            if expected is not None and not _token_matches(details.invocation_metadata, expected):
                message = f"{name}: missing or wrong bearer token (metadata 'authorization: Bearer <token>')"
                return self._deny(handler, name, ours, grpc.StatusCode.UNAUTHENTICATED, message)
        wrapped = self._parse_safely(handler, method, ours)
        if method == _HEALTH_CHECK:
            wrapped.unary_unary.experimental_thread_pool = self._health_pool
        elif (
            self._handlers is not None
            and self._rpc_limit is not None
            and self._handlers.held >= self._rpc_limit
        ):
            message = (
                f"server overloaded: {self._handlers.held} calls in flight (limit {self._rpc_limit}: "
                "max_concurrent_rpcs plus spare threads); retry with backoff"
            )
            return self._deny(handler, name, ours, grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        return wrapped

    def _deny(self, handler: Any, name: str, ours: bool, code: grpc.StatusCode, message: str) -> Any:
        def deny(requests: Any, context: grpc.ServicerContext) -> Any:
            if ours:
                self._on_reject(name, code.name)
            level = logging.INFO if code is grpc.StatusCode.UNAUTHENTICATED else logging.WARNING
            log.log(level, "%s %s: %s", name, code.name, message, extra={"method": name, "code": code.name})
            context.abort(code, message)

        deny.experimental_thread_pool = self._reject_pool  # type: ignore[attr-defined]
        # As a request-streaming method whatever the real one is, so that grpc does not read (a
        # possibly large) request before the call is turned away.
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        return grpc.stream_unary_rpc_method_handler(deny)

    def _parse_safely(self, handler: Any, method: str, ours: bool) -> Any:
        kind = _kind(handler)
        behaviour = getattr(handler, kind)
        name = _short(method)
        streaming_in = kind in ("stream_unary", "stream_stream")

        def reject(malformed: _Malformed, context: grpc.ServicerContext, item: int | None = None) -> None:
            what = f"{name}: the request is not a valid {_message_name(handler)} message"
            if item is not None:
                what = f"{name}: stream item {item} is not a valid {_message_name(handler)} message"
            message = f"{what} ({malformed.reason})"
            if ours and item is not None:  # the servicer maps it, counts it and logs it
                raise _MalformedMessageError(message)
            if ours:
                self._on_reject(name, grpc.StatusCode.INVALID_ARGUMENT.name)
            log.info("%s INVALID_ARGUMENT: %s", name, message, extra={"method": name,
                                                                    "code": "INVALID_ARGUMENT"})  # fmt: skip
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        if streaming_in:

            def checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                for i, request in enumerate(requests):
                    if isinstance(request, _Malformed):
                        reject(request, context, i)
                    yield request

            def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                return behaviour(checked(requests, context), context)

        else:

            def call(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, _Malformed):
                    reject(request, context)
                return behaviour(request, context)

        return handler._replace(request_deserializer=_tolerant(handler.request_deserializer), **{kind: call})


def _kind(handler: Any) -> str:
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"


def _message_name(handler: Any) -> str:
    owner = getattr(handler.request_deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else "request"


def _token_matches(metadata: Any, expected: bytes) -> bool:
    """Whether the call carries ``authorization: Bearer <expected>``; constant time in the token."""
    presented = b""
    for key, value in metadata or ():
        if key == AUTH_METADATA_KEY:
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            if text[: len(_BEARER)].lower() == _BEARER:
                presented = text[len(_BEARER) :].strip().encode("latin-1", "replace")
            break
    # compare_digest takes time independent of where the bytes differ (not of their lengths).
    return hmac.compare_digest(presented, expected)
