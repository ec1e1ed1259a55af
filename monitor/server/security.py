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
- runs health ``Check`` on its own small thread pool, so probes are answered while
  every scoring thread is busy.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ..errors import InvalidInputError, MonitorError
from ..settings import MIN_TOKEN_CHARS, Settings

__all__ = ["AUTH_METADATA_KEY", "CallGate", "SecurityConfigError", "read_token", "server_credentials"]

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
        ``on_reject(method, code_name)`` for each call the gate ends (metrics).
    """

    def __init__(
        self,
        service: str,
        *,
        auth_token: str | None = None,
        outcome_token: str | None = None,
        on_reject: Callable[[str, str], None] | None = None,
    ) -> None:
        self._prefix = f"/{service}/"
        self._tokens = {
            None: auth_token.encode() if auth_token else None,
            "ReportOutcome": (outcome_token or auth_token or "").encode() or None,
        }
        self._on_reject = on_reject or (lambda method, code: None)
        self._health_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="health")

    def close(self) -> None:
        self._health_pool.shutdown(wait=False, cancel_futures=True)

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        ours = method.startswith(self._prefix)
        if ours:
            name = _short(method)
            expected = self._tokens.get(name, self._tokens[None])
            if expected is not None and not _token_matches(details.invocation_metadata, expected):
                return self._deny(handler, name)
        wrapped = self._parse_safely(handler, method, ours)
        if method == _HEALTH_CHECK:
            wrapped.unary_unary.experimental_thread_pool = self._health_pool
        return wrapped

    def _deny(self, handler: Any, name: str) -> Any:
        message = f"{name}: missing or wrong bearer token (metadata 'authorization: Bearer <token>')"

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            self._on_reject(name, grpc.StatusCode.UNAUTHENTICATED.name)
            log.info("%s UNAUTHENTICATED", name, extra={"method": name, "code": "UNAUTHENTICATED"})
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        # The same shape as the real method, so grpc reads (and drops) the request first.
        kind = _kind(handler)
        return handler._replace(request_deserializer=None, **{kind: deny})

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
