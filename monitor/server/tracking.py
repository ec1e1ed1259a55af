"""Server-side state that outlives a request: drift windows and the request-id → prediction log.

Both are shared by the worker threads and guarded by locks; neither imports grpc.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..drift import SlidingWindow
from ..engine import Engine
from ..metrics import WindowSnapshot
from ..types import ScoredImage

__all__ = [
    "DriftWindows",
    "GRPC_SOURCE",
    "OutcomeLog",
    "Prediction",
    "SourceWindows",
    "TIME_WINDOW_MAX_IMAGES",
]

GRPC_SOURCE = "grpc"
"""Source label of images scored through the gRPC API (DICOM images carry their calling AE title)."""

TIME_WINDOW_MAX_IMAGES = 100_000
"""Memory bound of the time window: beyond this many images within window_seconds, the oldest go."""


@dataclass
class Prediction:
    """What Score said about a request, kept until its outcome arrives (or it is evicted)."""

    cluster: int
    failure_probability: float
    cluster_failure_probability: float
    classifier_score: float | None
    failure: bool | None = None  # the reported outcome, once known
    source: str = GRPC_SOURCE  # where the image came from: gRPC, or a DICOM caller's label


class OutcomeLog:
    """Bounded LRU map request id → :class:`Prediction`, with per-cluster realized tallies.

    Parameters
    ----------
    capacity : int
        Request ids remembered; the least recently used is forgotten first.
    n_clusters : int
    """

    def __init__(self, capacity: int, n_clusters: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Prediction] = OrderedDict()
        self._lock = threading.Lock()
        self.outcomes = [0] * n_clusters
        self.failures = [0] * n_clusters
        self.predicted = [0.0] * n_clusters

    def __len__(self) -> int:
        return len(self._items)

    def remember(self, request_id: str, prediction: Prediction) -> None:
        with self._lock:
            self._items[request_id] = prediction
            self._items.move_to_end(request_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, request_id: str) -> Prediction | None:
        with self._lock:
            return self._items.get(request_id)

    def record(self, request_id: str, failure: bool) -> tuple[Prediction, int, int] | None:
        """Attach an outcome; returns the prediction and the cluster's (outcomes, failures) so far.

        ``None`` if the id is unknown. Raises ``KeyError`` if an outcome was already recorded.
        """
        with self._lock:
            p = self._items.get(request_id)
            if p is None:
                return None
            if p.failure is not None:
                raise KeyError(request_id)
            p.failure = failure
            c = p.cluster
            self.outcomes[c] += 1
            self.failures[c] += int(failure)
            self.predicted[c] += p.cluster_failure_probability
            return p, self.outcomes[c], self.failures[c]

    def unrecord(self, request_id: str) -> None:
        """Undo :meth:`record` (its outcome could not be stored durably)."""
        with self._lock:
            p = self._items.get(request_id)
            if p is None or p.failure is None:
                return
            c = p.cluster
            self.outcomes[c] -= 1
            self.failures[c] -= int(p.failure)
            self.predicted[c] -= p.cluster_failure_probability
            p.failure = None

    def restore(
        self, predictions: Iterable[tuple[str, Prediction]], tallies: Iterable[tuple[int, int, float]]
    ) -> None:
        """Start from stored state: request ids (oldest first) and per-cluster tallies."""
        for request_id, prediction in predictions:
            self.remember(request_id, prediction)
        with self._lock:
            for c, (n, f, predicted) in enumerate(tallies):
                self.outcomes[c], self.failures[c], self.predicted[c] = n, f, predicted

    def tallies(self) -> list[tuple[int, int, float]]:
        """Per cluster: outcomes reported, failures among them, sum of predicted probabilities."""
        with self._lock:
            return list(zip(self.outcomes, self.failures, self.predicted, strict=True))


@dataclass
class _Slot:
    time: float
    request_id: str
    failure: bool | None = None


class _TrackedWindow:
    """A :class:`SlidingWindow` plus which of its images have a reported outcome.

    The mirror deque applies the same two bounds with the same ``now`` as the core
    window, so both always hold the same images.
    """

    def __init__(self, window: SlidingWindow) -> None:
        self.window = window
        self.slots: deque[_Slot] = deque()
        self.by_id: dict[str, _Slot] = {}
        self.outcomes = 0
        self.failures = 0

    def add(self, now: float, request_id: str, scored: ScoredImage) -> None:
        r = scored.result
        self.window.add(
            now, r.cluster, r.is_novel, r.cluster_failure_probability, scored.z_profile, r.scope_field
        )
        slot = _Slot(now, request_id)
        self.slots.append(slot)
        self.by_id[request_id] = slot
        self.evict(now)

    def evict(self, now: float) -> None:
        w = self.window
        while self.slots and (
            (w.max_images is not None and len(self.slots) > w.max_images)
            or (w.max_age_seconds is not None and now - self.slots[0].time > w.max_age_seconds)
        ):
            slot = self.slots.popleft()
            if self.by_id.get(slot.request_id) is slot:
                del self.by_id[slot.request_id]
            if slot.failure is not None:
                self.outcomes -= 1
                self.failures -= int(slot.failure)

    def record(self, request_id: str, failure: bool) -> None:
        slot = self.by_id.get(request_id)
        if slot is not None and slot.failure is None:
            slot.failure = failure
            self.outcomes += 1
            self.failures += int(failure)


class DriftWindows:
    """The count window (last ``window_images``) and the time window (last ``window_seconds``).

    Parameters
    ----------
    engine : Engine
    window_images : int
    window_seconds : float
    clock : callable, optional
        Monotonic seconds (tests inject a fake clock).
    """

    def __init__(
        self,
        engine: Engine,
        window_images: int,
        window_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._lock = threading.Lock()
        self._windows = {
            "count": _TrackedWindow(engine.new_window(max_images=window_images)),
            "time": _TrackedWindow(
                engine.new_window(max_images=TIME_WINDOW_MAX_IMAGES, max_age_seconds=window_seconds)
            ),
        }

    def add(self, request_id: str, scored: ScoredImage) -> None:
        with self._lock:
            now = self._clock()
            for w in self._windows.values():
                w.add(now, request_id, scored)

    def record_outcome(self, request_id: str, failure: bool) -> None:
        with self._lock:
            for w in self._windows.values():
                w.record(request_id, failure)

    def snapshot(self) -> dict[str, WindowSnapshot]:
        """Drift report of each window now (the metrics collector calls this on every scrape)."""
        with self._lock:
            now = self._clock()
            out = {}
            for name, w in self._windows.items():
                w.evict(now)
                report = self._engine.window_drift(w.window, now)
                out[name] = WindowSnapshot(report=report, outcomes=w.outcomes, failures=w.failures)
            return out


class SourceWindows:
    """One :class:`DriftWindows` pair per source label, made on first use.

    Sources are a bounded set (``grpc`` plus the DICOM node's allow-listed AE titles and
    ``other``), so the number of windows is bounded too.

    Parameters
    ----------
    engine : Engine
    window_images : int
    window_seconds : float
    """

    def __init__(self, engine: Engine, window_images: int, window_seconds: float) -> None:
        self._engine = engine
        self._window_images = window_images
        self._window_seconds = window_seconds
        self._lock = threading.Lock()
        self._by_source: dict[str, DriftWindows] = {}

    def _windows(self, source: str) -> DriftWindows:
        with self._lock:
            windows = self._by_source.get(source)
            if windows is None:
                windows = DriftWindows(self._engine, self._window_images, self._window_seconds)
                self._by_source[source] = windows
            return windows

    def add(self, source: str, request_id: str, scored: ScoredImage) -> None:
        self._windows(source).add(request_id, scored)

    def record_outcome(self, source: str, request_id: str, failure: bool) -> None:
        self._windows(source).record_outcome(request_id, failure)

    def snapshot(self) -> dict[tuple[str, str], WindowSnapshot]:
        """``(source, window)`` → drift snapshot, for every source seen so far."""
        with self._lock:
            items = list(self._by_source.items())
        return {
            (source, window): snap for source, windows in items for window, snap in windows.snapshot().items()
        }
