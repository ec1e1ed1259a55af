"""What each RPC does, in protobuf terms: admission, scoring on the worker pool (the engine
does the whole per-image path), drift windows, the outcome log and per-image metrics.

The servicer (``servicer.py``) only adds status-code mapping, request metrics and
logging around these methods.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import grpc

from ..engine import Engine
from ..errors import InvalidInputError, MonitorError
from ..metrics import MonitorMetrics
from ..proto import monitor_pb2 as pb
from ..settings import Settings
from . import convert
from .tracking import DriftWindows, OutcomeLog, Prediction

__all__ = ["RequestHandler", "RpcAbortError", "STREAM_ITEM_METHOD"]

log = logging.getLogger("cxr_monitor.server")

STREAM_ITEM_METHOD = "ScoreStream/item"

Remaining = Callable[[], "float | None"]


class RpcAbortError(Exception):
    """End the RPC with a status code that has no MonitorError equivalent."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _OverloadedError(MonitorError):
    code = "resource_exhausted"


class _NotLoadedError(MonitorError):
    code = "failed_precondition"


class RequestHandler:
    """Scores requests with an :class:`Engine` once one is attached.

    Parameters
    ----------
    settings : Settings
        ``workers`` sizes the scoring pool, ``max_concurrent_rpcs`` the admission limit.
    metrics : MonitorMetrics
    """

    def __init__(self, settings: Settings, metrics: MonitorMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        # Every image, unary or streamed, is scored on this pool: one FIFO queue, `workers` images at once.
        self._pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="score")
        self._admit_lock = threading.Lock()
        self._admitted = 0
        self.engine: Engine | None = None
        self.description: convert.ModelDescription | None = None
        self.windows: DriftWindows | None = None
        self.outcomes: OutcomeLog | None = None
        # Items a stream may have in flight: enough to keep every worker busy while replies are sent.
        self.stream_lookahead = 2 * settings.workers

    # ------------------------------------------------------------------ lifecycle
    def attach(self, engine: Engine) -> None:
        """Start serving ``engine``'s model (windows and outcome log start empty).

        Each worker thread first warms the engine up (FFT plans are per thread), so that
        planning does not add to the first requests' latency.
        """
        self._warm_up(engine)
        s = self.settings
        self.windows = DriftWindows(engine, s.window_images, s.window_seconds)
        self.outcomes = OutcomeLog(s.outcome_cache_size, engine.model.n_clusters)
        self.description = convert.ModelDescription.of(engine.model)
        self.engine = engine

    def _warm_up(self, engine: Engine) -> None:
        n = self.settings.workers
        barrier = threading.Barrier(n)

        def plan() -> None:
            engine.warm_up()
            barrier.wait(timeout=60)  # hold the thread so each job lands on a different one

        for future in [self._pool.submit(plan) for _ in range(n)]:
            future.result()

    def close(self) -> None:
        """Stop the scoring threads (the engine belongs to the caller: see ``Engine.close``)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _engine(self) -> Engine:
        if self.engine is None:
            raise _NotLoadedError("the model is still loading: retry when the health check reports SERVING")
        return self.engine

    def admit(self) -> _Admission:
        """Count a scoring RPC in flight; RESOURCE_EXHAUSTED beyond ``max_concurrent_rpcs``."""
        return _Admission(self)

    # ------------------------------------------------------------------ RPCs
    def score(self, request: pb.ScoreRequest, remaining: Remaining, started: float) -> pb.ScoreResponse:
        self._engine()
        with self.admit():
            return self._pool.submit(self._score_one, request, remaining, started).result()

    def score_stream(
        self, requests: Iterable[pb.ScoreRequest], remaining: Remaining
    ) -> Iterator[pb.ScoreResponse]:
        """Score a stream, ``stream_lookahead`` items at a time, answering in request order.

        A reader thread pulls requests so that a client waiting for each answer before
        sending the next (ping-pong) and a client sending everything at once both work.
        """
        self._engine()
        with self.admit():
            slots = threading.Semaphore(self.stream_lookahead)
            pending: queue.Queue[Future | BaseException | None] = queue.Queue()
            stop = threading.Event()

            def read() -> None:
                try:
                    for request in requests:
                        while not slots.acquire(timeout=0.1):
                            if stop.is_set():
                                return
                        if stop.is_set():
                            return
                        started = time.perf_counter()
                        pending.put(self._pool.submit(self._stream_item, request, remaining, started))
                except BaseException as exc:  # the client went away or the stream broke
                    pending.put(exc)
                finally:
                    pending.put(None)

            reader = threading.Thread(target=read, name="score-stream-reader", daemon=True)
            reader.start()
            try:
                while (item := pending.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    response = item.result()
                    slots.release()
                    yield response
            finally:
                stop.set()

    def report_outcome(self, request: pb.OutcomeRequest) -> pb.OutcomeResponse:
        self._engine()
        assert self.outcomes is not None and self.windows is not None and self.description is not None
        rid = request.request_id
        if not rid:
            raise InvalidInputError("outcome: request_id is empty")
        prediction = self.outcomes.get(rid)
        if prediction is None:
            raise RpcAbortError(
                grpc.StatusCode.NOT_FOUND,
                f"outcome: request id {rid!r} is unknown (never scored, or forgotten after "
                f"{self.outcomes.capacity} newer requests or a server restart)",
            )
        failure = convert.outcome_failure(request, prediction.classifier_score, self.description.threshold)
        try:
            recorded = self.outcomes.record(rid, failure)
        except KeyError:
            raise RpcAbortError(
                grpc.StatusCode.ALREADY_EXISTS, f"outcome: already reported for request id {rid!r}"
            ) from None
        if recorded is None:  # evicted between get and record
            raise RpcAbortError(grpc.StatusCode.NOT_FOUND, f"outcome: request id {rid!r} was just forgotten")
        prediction, n_outcomes, n_failures = recorded
        self.windows.record_outcome(rid, failure)
        self.metrics.observe_outcome(prediction.cluster, failure, prediction.cluster_failure_probability)
        return pb.OutcomeResponse(
            request_id=rid,
            cluster=prediction.cluster,
            failure=failure,
            failure_probability=prediction.failure_probability,
            cluster_failure_probability=prediction.cluster_failure_probability,
            cluster_outcomes=n_outcomes,
            cluster_failures=n_failures,
        )

    def model_info(self) -> pb.ModelInfo:
        engine = self._engine()
        assert self.outcomes is not None and self.description is not None
        s = self.settings
        return convert.model_info(
            engine.model, self.description, self.outcomes.tallies(), s.window_images, s.window_seconds
        )

    # ------------------------------------------------------------------ work (on the pool)
    def _stream_item(
        self, request: pb.ScoreRequest, remaining: Remaining, started: float
    ) -> pb.ScoreResponse:
        """One stream item: per-image errors become an error response, not a broken stream."""
        code, message = grpc.StatusCode.OK, ""
        rid = request.request_id
        try:
            response = self._score_one(request, remaining, started)
        except MonitorError as exc:
            code, message = convert.status_code(exc), str(exc)
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:  # the stream's deadline: ends the whole stream
                self.metrics.observe_request(STREAM_ITEM_METHOD, code.name, time.perf_counter() - started)
                raise RpcAbortError(code, message) from None
        except Exception:
            ref = uuid.uuid4().hex[:12]
            log.exception(
                "unexpected error scoring a stream item", extra={"error_ref": ref, "request_id": rid}
            )
            code, message = grpc.StatusCode.INTERNAL, f"internal error (server log reference {ref})"
        self.metrics.observe_request(STREAM_ITEM_METHOD, code.name, time.perf_counter() - started)
        if code is grpc.StatusCode.OK:
            return response
        log.info("stream item failed", extra={"request_id": rid, "code": code.name, "error": message})
        return convert.error_response(rid, code, message)

    def _score_one(self, request: pb.ScoreRequest, remaining: Remaining, started: float) -> pb.ScoreResponse:
        engine = self._engine()
        assert self.windows is not None and self.outcomes is not None and self.description is not None
        rid = request.request_id or uuid.uuid4().hex
        image = convert.request_to_input(request, rid)
        self.metrics.observe_input(image.size_bytes)
        classifier_score = None
        if request.HasField("classifier_score"):
            classifier_score = request.classifier_score
            if not (math.isnan(classifier_score) or 0.0 <= classifier_score <= 1.0):
                raise InvalidInputError(
                    f"request {rid}: classifier_score must be a probability in [0, 1] (or NaN for unknown), "
                    f"got {classifier_score}"
                )
        left = remaining()
        source = image.array if image.array is not None else image.data
        assert source is not None
        scored = engine.score(
            source,
            kind=image.kind,
            name=image.name,
            classifier_score=classifier_score,
            deadline=None if left is None else time.monotonic() + left,
        )
        r = scored.result
        self.windows.add(rid, scored)
        self.outcomes.remember(
            rid, Prediction(r.cluster, r.failure_probability, r.cluster_failure_probability, classifier_score)
        )
        self.metrics.observe_scored(scored)
        return convert.scored_to_response(scored, rid, self.description, time.perf_counter() - started)


class _Admission:
    def __init__(self, handler: RequestHandler) -> None:
        self._h = handler

    def __enter__(self) -> None:
        h = self._h
        with h._admit_lock:
            if h._admitted >= h.settings.max_concurrent_rpcs:
                raise _OverloadedError(
                    f"server overloaded: {h._admitted} scoring requests in flight "
                    f"(limit max_concurrent_rpcs={h.settings.max_concurrent_rpcs}); retry with backoff"
                )
            h._admitted += 1

    def __exit__(self, *exc: object) -> None:
        with self._h._admit_lock:
            self._h._admitted -= 1
