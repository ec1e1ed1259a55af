"""What each RPC does, in protobuf terms: admission, scoring on the worker pool (the engine
does the whole per-image path), drift windows, the outcome log (and its durable store) and
per-image metrics.

The served model and its state (drift windows, outcome log) are one :class:`Serving`
replaced in one assignment by :meth:`RequestHandler.swap` (hot reload): each call reads
it once, so a call in flight during a swap finishes on the model it started with.

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
from dataclasses import dataclass, field

import grpc
import numpy as np

from ..engine import Engine
from ..errors import DeadlineExceededError, InvalidInputError, MonitorError
from ..metrics import MonitorMetrics
from ..proto import monitor_pb2 as pb
from ..settings import Settings
from ..store import OutcomeStore, StoredPrediction
from ..types import ScoredImage
from . import convert
from .admission import AdmissionControl, OverloadedError, Pass
from .memory import MemoryTrimmer
from .tracking import GRPC_SOURCE, DriftWindows, OutcomeLog, Prediction, SourceWindows

__all__ = ["RequestHandler", "RpcAbortError", "STREAM_ITEM_METHOD", "Serving"]

log = logging.getLogger("cxr_monitor.server")

STREAM_ITEM_METHOD = "ScoreStream/item"

Remaining = Callable[[], "float | None"]


class RpcAbortError(Exception):
    """End the RPC with a status code that has no MonitorError equivalent."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _NotLoadedError(MonitorError):
    code = "failed_precondition"


class _Calls:
    """Scoring calls in flight on one :class:`Serving`, so a swapped-out engine is closed when idle."""

    def __init__(self) -> None:
        self._n = 0
        self._idle = threading.Condition()

    def __enter__(self) -> None:
        with self._idle:
            self._n += 1

    def __exit__(self, *exc: object) -> None:
        with self._idle:
            self._n -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float | None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._n == 0, timeout)


@dataclass(frozen=True)
class Serving:
    """A served model with the state that belongs to it (windows and outcomes are per model)."""

    engine: Engine
    description: convert.ModelDescription
    windows: DriftWindows
    outcomes: OutcomeLog
    source_windows: SourceWindows  # one window pair per source (grpc, DICOM callers)
    calls: _Calls = field(default_factory=_Calls)


class RequestHandler:
    """Scores requests with an :class:`Engine` once one is attached.

    Parameters
    ----------
    settings : Settings
        ``workers`` sizes the scoring pool, ``max_concurrent_rpcs`` the admission limit.
    metrics : MonitorMetrics
    store : OutcomeStore, optional
        Where predictions and outcomes are kept durably (outcomes are committed before
        ReportOutcome answers); the outcome log is restored from it on attach.
    """

    def __init__(
        self, settings: Settings, metrics: MonitorMetrics, store: OutcomeStore | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store
        # Every image, unary or streamed, is scored on this pool: one FIFO queue, `workers` images at once.
        self._pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="score")
        self.trimmer = MemoryTrimmer()
        self.admission = AdmissionControl(
            settings.max_concurrent_rpcs, settings.workers, settings.memory_budget_bytes
        )
        self.serving: Serving | None = None
        # The model served before the last swap: outcomes of requests it scored are still accepted.
        self.previous: Serving | None = None
        # Items a stream may have in flight: enough to keep every worker busy while replies are sent.
        self.stream_lookahead = 2 * settings.workers

    # ------------------------------------------------------------------ lifecycle
    @property
    def engine(self) -> Engine | None:
        return None if self.serving is None else self.serving.engine

    @property
    def description(self) -> convert.ModelDescription | None:
        return None if self.serving is None else self.serving.description

    @property
    def windows(self) -> DriftWindows | None:
        return None if self.serving is None else self.serving.windows

    @property
    def outcomes(self) -> OutcomeLog | None:
        return None if self.serving is None else self.serving.outcomes

    @property
    def source_windows(self) -> SourceWindows | None:
        return None if self.serving is None else self.serving.source_windows

    def attach(self, engine: Engine) -> None:
        """Start serving ``engine``'s model (windows empty; outcome log from the store, if any).

        Each worker thread first warms the engine up (FFT plans are per thread), so that
        planning does not add to the first requests' latency.
        """
        self._warm_up(engine)
        self.serving = self._serving_for(engine)

    def swap(self, engine: Engine) -> Serving:
        """Serve ``engine``'s model from now on (hot reload); returns the old :class:`Serving`.

        The new model is warmed up and scores a synthetic image in this thread first (a
        model that cannot score is refused before anything changes). Calls in flight finish
        on the old model (``old.calls.wait_idle``); drift windows start empty, since they
        compare with the model's own reference.

        Raises
        ------
        Exception
            The new model failed its check; the old one keeps serving.
        """
        old = self._current()
        engine.warm_up()
        n = engine.model.profiler.working_size
        engine.score(np.random.default_rng(0).random((n, n), dtype=np.float32), name="<reload check>")
        new = self._serving_for(engine)
        self.previous, self.serving = old, new
        return old

    def _serving_for(self, engine: Engine) -> Serving:
        s = self.settings
        model = engine.model
        description = convert.ModelDescription.of(model)
        outcomes = OutcomeLog(s.outcome_cache_size, model.n_clusters)
        if self.store is not None:
            self.store.register_model(description.model_id, model.feature_names, model.n_clusters)
            self.store.flush()  # rows of this model still queued (a reload back to it)
            recent = self.store.recent(description.model_id, s.outcome_cache_size)
            outcomes.restore(
                (
                    (p.request_id, Prediction(p.cluster, p.failure_probability, p.cluster_failure_probability,
                                              p.classifier_score, p.failure))
                    for p in recent
                ),
                self.store.tallies(description.model_id, model.n_clusters),
            )  # fmt: skip
        windows = DriftWindows(engine, s.window_images, s.window_seconds)
        sources = SourceWindows(engine, s.window_images, s.window_seconds)
        return Serving(engine, description, windows, outcomes, sources)

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
        self.trimmer.close()

    def _current(self) -> Serving:
        serving = self.serving
        if serving is None:
            raise _NotLoadedError("the model is still loading: retry when the health check reports SERVING")
        return serving

    def _engine(self) -> Engine:
        return self._current().engine

    # ------------------------------------------------------------------ RPCs
    def score(self, request: pb.ScoreRequest, remaining: Remaining, started: float) -> pb.ScoreResponse:
        work = self._admit(request, remaining)  # sheds at once, before any queueing
        return self._pool.submit(self._score_one, work, remaining, started).result()

    def score_stream(
        self, requests: Iterable[pb.ScoreRequest], remaining: Remaining
    ) -> Iterator[pb.ScoreResponse]:
        """Score a stream, ``stream_lookahead`` items at a time, answering in request order.

        A reader thread pulls requests so that a client waiting for each answer before
        sending the next (ping-pong) and a client sending everything at once both work.
        Each item is admitted like a unary call; a shed item gets an error response.
        """
        self._engine()
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
                    try:
                        work = self._admit(request, remaining)
                    except MonitorError as exc:
                        shed: Future = Future()
                        shed.set_result(self._stream_error(request.request_id, exc, started))
                        pending.put(shed)
                        continue
                    pending.put(self._pool.submit(self._stream_item, work, remaining, started))
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
        serving = self._current()
        convert.check_outcome_request(request)
        rid = request.request_id
        if not rid:
            raise InvalidInputError("outcome: request_id is empty")
        prediction = serving.outcomes.get(rid)
        previous = self.previous
        if prediction is None and previous is not None:  # scored by the model before a reload
            serving, prediction = previous, previous.outcomes.get(rid)
        if prediction is None:
            restart = "" if self.store is not None else " or a server restart"
            raise RpcAbortError(
                grpc.StatusCode.NOT_FOUND,
                f"outcome: request id {rid!r} is unknown (never scored, or forgotten after "
                f"{serving.outcomes.capacity} newer requests{restart})",
            )
        failure = convert.outcome_failure(request, prediction.classifier_score, serving.description.threshold)
        try:
            recorded = serving.outcomes.record(rid, failure)
        except KeyError:
            raise RpcAbortError(
                grpc.StatusCode.ALREADY_EXISTS, f"outcome: already reported for request id {rid!r}"
            ) from None
        if recorded is None:  # evicted between get and record
            raise RpcAbortError(grpc.StatusCode.NOT_FOUND, f"outcome: request id {rid!r} was just forgotten")
        if self.store is not None:
            self._store_outcome(serving, rid, failure)
        prediction, n_outcomes, n_failures = recorded
        serving.windows.record_outcome(rid, failure)
        serving.source_windows.record_outcome(prediction.source, rid, failure)
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

    def _store_outcome(self, serving: Serving, rid: str, failure: bool) -> None:
        """Commit an outcome already claimed in memory (so two concurrent reports cannot both
        pass); the reply waits for the commit, and a failed commit is undone in memory."""
        assert self.store is not None
        try:
            self.store.record_outcome(rid, failure)
        except KeyError:
            serving.outcomes.unrecord(rid)
            raise RpcAbortError(
                grpc.StatusCode.ALREADY_EXISTS, f"outcome: already reported for request id {rid!r}"
            ) from None
        except BaseException:
            serving.outcomes.unrecord(rid)
            raise

    def model_info(self) -> pb.ModelInfo:
        serving = self._current()
        s = self.settings
        return convert.model_info(
            serving.engine.model,
            serving.description,
            serving.outcomes.tallies(),
            s.window_images,
            s.window_seconds,
            scope=serving.engine.scope,
        )

    def current(self) -> Serving:
        """The served model and its state, read once per image so a hot reload does not split it.

        Raises FAILED_PRECONDITION (as a MonitorError) while the model is loading.
        """
        return self._current()

    def record(
        self,
        request_id: str,
        scored: ScoredImage,
        classifier_score: float | None = None,
        source: str = GRPC_SOURCE,
        *,
        serving: Serving | None = None,
    ) -> None:
        """Track a scored image: drift windows (all traffic and its source's), outcome log, the
        outcome store, metrics.

        Every scored image goes through here, whether it came as a gRPC request or a DICOM
        instance, so ``ReportOutcome(request_id)`` joins either.

        Parameters
        ----------
        request_id : str
            The id an outcome will be reported under (a DICOM instance: its SOP Instance UID).
        source : str
            Bounded label of where the image came from: ``grpc`` or a DICOM caller's label.
        serving : Serving, optional
            The model that scored it (default: the current one).
        """
        serving = self._current() if serving is None else serving
        r = scored.result
        serving.windows.add(request_id, scored)
        serving.source_windows.add(source, request_id, scored)
        serving.outcomes.remember(
            request_id,
            Prediction(
                r.cluster,
                r.failure_probability,
                r.cluster_failure_probability,
                classifier_score,
                source=source,
            ),
        )
        if self.store is not None and scored.profile is not None:
            self.store.add_prediction(
                StoredPrediction(request_id, time.time(), serving.description.model_id, r.cluster,
                                 r.failure_probability, r.cluster_failure_probability, r.novelty, classifier_score,
                                 scored.profile)
            )  # fmt: skip
        self.metrics.observe_scored(scored, source)

    # ------------------------------------------------------------------ admission
    def _admit(self, request: pb.ScoreRequest, remaining: Remaining) -> _Work:
        """Unpack and check a request, then admit it by count, deadline and memory (or shed it)."""
        engine = self._engine()
        convert.check_score_request(request)
        rid = request.request_id or uuid.uuid4().hex
        image = convert.request_to_input(request, rid)
        self.metrics.observe_input(image.size_bytes)
        self.trimmer.note(image.size_bytes)  # admitted or not, gRPC has buffered the whole message
        classifier_score = None
        if request.HasField("classifier_score"):
            classifier_score = request.classifier_score
            if not (math.isnan(classifier_score) or 0.0 <= classifier_score <= 1.0):
                raise InvalidInputError(
                    f"request {rid}: classifier_score must be a probability in [0, 1] (or NaN for unknown), "
                    f"got {classifier_score}"
                )
        source = image.array if image.array is not None else image.data
        assert source is not None
        left = remaining()
        if left is not None and left <= 0:  # already late (or gone): not an overload
            raise DeadlineExceededError(f"request {rid}: deadline exceeded before decoding")
        try:
            self.admission.precheck(left, f"request {rid}")  # before the header is read for memory
            held, decode = engine.memory_estimate(source, kind=image.kind)
            admitted = self.admission.admit(held, decode, left, f"request {rid}")
        except OverloadedError as exc:
            self.metrics.observe_shed(exc.reason)
            raise
        return _Work(rid, image.name, source, image.kind, classifier_score, admitted)

    def _stream_error(self, rid: str, exc: MonitorError, started: float) -> pb.ScoreResponse:
        rid = convert.log_id(rid)  # an id rejected for its size is neither logged nor echoed whole
        code, message = convert.status_code(exc), str(exc)
        self.metrics.observe_request(STREAM_ITEM_METHOD, code.name, time.perf_counter() - started)
        log.info("stream item failed", extra={"request_id": rid, "code": code.name, "error": message})
        return convert.error_response(rid, code, message)

    # ------------------------------------------------------------------ work (on the pool)
    def _stream_item(self, work: _Work, remaining: Remaining, started: float) -> pb.ScoreResponse:
        """One stream item: per-image errors become an error response, not a broken stream."""
        try:
            response = self._score_one(work, remaining, started)
        except MonitorError as exc:
            if exc.code == "deadline_exceeded":  # the stream's deadline: ends the whole stream
                self.metrics.observe_request(
                    STREAM_ITEM_METHOD, "DEADLINE_EXCEEDED", time.perf_counter() - started
                )
                raise RpcAbortError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
            return self._stream_error(work.rid, exc, started)
        except Exception:
            ref = uuid.uuid4().hex[:12]
            log.exception(
                "unexpected error scoring a stream item", extra={"error_ref": ref, "request_id": work.rid}
            )
            message = f"internal error (server log reference {ref})"
            self.metrics.observe_request(STREAM_ITEM_METHOD, "INTERNAL", time.perf_counter() - started)
            return convert.error_response(work.rid, grpc.StatusCode.INTERNAL, message)
        self.metrics.observe_request(STREAM_ITEM_METHOD, "OK", time.perf_counter() - started)
        return response

    def _score_one(self, work: _Work, remaining: Remaining, started: float) -> pb.ScoreResponse:
        serving = self._current()  # read once: a hot reload does not change this call's model
        with serving.calls:
            return self._score_on(serving, work, remaining, started)

    def _score_on(
        self, serving: Serving, work: _Work, remaining: Remaining, started: float
    ) -> pb.ScoreResponse:
        with work.admitted:
            engine = serving.engine
            left = remaining()  # 0 once the caller has gone: the engine drops the work unstarted
            deadline = None if left is None else time.monotonic() + left
            if not work.admitted.start(deadline):  # waited for decode memory past the deadline
                raise DeadlineExceededError(f"request {work.rid}: deadline exceeded before decoding")
            scored = engine.score(
                work.source,
                kind=work.kind,
                name=work.name,
                classifier_score=work.classifier_score,
                deadline=deadline,
            )
            work.admitted.served()
        rid = work.rid
        self.record(rid, scored, work.classifier_score, serving=serving)
        return convert.scored_to_response(scored, rid, serving.description, time.perf_counter() - started)


@dataclass(frozen=True)
class _Work:
    """One admitted image, ready for the worker pool."""

    rid: str
    name: str
    source: bytes | np.ndarray
    kind: str | None
    classifier_score: float | None
    admitted: Pass
