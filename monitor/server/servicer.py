"""The thin gRPC servicer: call the handler, map errors to status codes, count and log each RPC.

One wrapper per RPC shape does the same thing: ``MonitorError`` → its status code
with its message; :class:`~monitor.server.handler.RpcAbortError` → its code; anything
else → INTERNAL with a log line carrying a reference quoted in the reply. The
server never crashes on a request.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ..errors import MonitorError
from ..proto import monitor_pb2 as pb
from ..proto import monitor_pb2_grpc as pb_grpc
from . import convert
from .handler import RequestHandler, RpcAbortError

__all__ = ["SERVICE_NAME", "ReliabilityMonitorServicer"]

log = logging.getLogger("cxr_monitor.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ReliabilityMonitor"].full_name

# Codes that say "the request was bad", logged at INFO; overload and bugs are louder.
_CLIENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)


# grpc reports "no deadline" as ~9.2e18 s left (its infinite-future timestamp): anything past
# a year is treated as none, so no wait is ever computed from it (threading waits overflow).
_NO_DEADLINE_SECONDS = 365 * 24 * 3600.0


def _remaining(context: grpc.ServicerContext) -> Callable[[], float | None]:
    """Seconds left before the caller's deadline (0 once the caller has gone), or ``None`` when
    the call has none."""

    def remaining() -> float | None:
        if not context.is_active():  # the caller cancelled or went away: nothing is left to wait for
            return 0.0
        try:
            left = context.time_remaining()
        except TypeError:  # no deadline on some grpc versions: deadline is None
            return None
        return None if left is None or left > _NO_DEADLINE_SECONDS else left

    return remaining


def _classify(exc: BaseException, method: str, context: grpc.ServicerContext) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RpcAbortError):
        return exc.code, exc.message
    if isinstance(exc, MonitorError):
        return convert.status_code(exc), str(exc)
    if not context.is_active():  # the client cancelled or the deadline passed mid-call
        return grpc.StatusCode.CANCELLED, "the call ended before the reply"
    ref = uuid.uuid4().hex[:12]
    log.exception("unexpected error in %s", method, extra={"method": method, "error_ref": ref})
    return grpc.StatusCode.INTERNAL, f"internal error in {method} (server log reference {ref})"


def _log(method: str, code: grpc.StatusCode, message: str, seconds: float, extra: dict[str, Any]) -> None:
    fields = {"method": method, "code": code.name, "seconds": round(seconds, 6), **extra}
    if code is grpc.StatusCode.OK:
        log.debug("%s OK", method, extra=fields)
    elif code in _CLIENT_CODES:
        log.info("%s %s: %s", method, code.name, message, extra=fields)
    elif code is not grpc.StatusCode.INTERNAL:  # INTERNAL was logged with its traceback
        log.warning("%s %s: %s", method, code.name, message, extra=fields)


def _unary(method: str) -> Callable:
    """Wrap a unary handler ``fn(self, request, context, started)``."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(self: ReliabilityMonitorServicer, request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            metrics = self.handler.metrics
            metrics.inflight.inc()
            code, message, response = grpc.StatusCode.OK, "", None
            try:
                response = fn(self, request, context, started)
            except Exception as exc:
                code, message = _classify(exc, method, context)
            finally:
                seconds = time.perf_counter() - started
                metrics.inflight.dec()
                metrics.observe_request(method, code.name, seconds)
            _log(method, code, message, seconds, _request_fields(request, response))
            if code is not grpc.StatusCode.OK:
                context.abort(code, message)
            return response

        return wrapper

    return decorate


def _request_fields(request: Any, response: Any) -> dict[str, Any]:
    # Bounded and escaped: these fields come from the caller (a rejected request may carry a
    # megabyte id, line breaks, or patient identifiers in its metadata).
    fields: dict[str, Any] = {}
    rid = getattr(response, "request_id", "") or getattr(request, "request_id", "")
    if rid:
        fields["request_id"] = convert.log_id(rid)
    if isinstance(request, pb.ScoreRequest) and request.metadata:
        fields["metadata"] = convert.log_metadata(request.metadata)
    if isinstance(response, pb.ScoreResponse):
        fields["cluster"] = response.cluster
        fields["failure_probability"] = round(response.failure_probability, 6)
    return fields


class ReliabilityMonitorServicer(pb_grpc.ReliabilityMonitorServicer):
    """``cxrmonitor.v1.ReliabilityMonitor`` on top of a :class:`RequestHandler`."""

    def __init__(self, handler: RequestHandler) -> None:
        self.handler = handler

    @_unary("Score")
    def Score(  # noqa: N802
        self, request: pb.ScoreRequest, context: grpc.ServicerContext, started: float
    ) -> pb.ScoreResponse:
        return self.handler.score(request, _remaining(context), started)

    @_unary("ReportOutcome")
    def ReportOutcome(  # noqa: N802
        self, request: pb.OutcomeRequest, context: grpc.ServicerContext, started: float
    ) -> pb.OutcomeResponse:
        return self.handler.report_outcome(request)

    @_unary("GetModelInfo")
    def GetModelInfo(  # noqa: N802
        self, request: pb.ModelInfoRequest, context: grpc.ServicerContext, started: float
    ) -> pb.ModelInfo:
        return self.handler.model_info()

    def ScoreStream(  # noqa: N802
        self, request_iterator: Iterator[pb.ScoreRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ScoreResponse]:
        method = "ScoreStream"
        started = time.perf_counter()
        metrics = self.handler.metrics
        metrics.inflight.inc()
        code, message, n, finished = grpc.StatusCode.OK, "", 0, False
        try:
            for response in self.handler.score_stream(request_iterator, _remaining(context)):
                n += 1
                yield response
            finished = True
        except Exception as exc:
            code, message = _classify(exc, method, context)
            finished = True
        finally:
            if not finished:  # the generator was closed: the client cancelled
                code, message = grpc.StatusCode.CANCELLED, "the client cancelled the stream"
            seconds = time.perf_counter() - started
            metrics.inflight.dec()
            metrics.observe_request(method, code.name, seconds)
            _log(method, code, message, seconds, {"items": n})
        if code is not grpc.StatusCode.OK:
            context.abort(code, message)
