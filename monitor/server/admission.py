"""Admission of scoring work: a call is let in only if it can be served in time and in memory.

Three limits, each shedding with RESOURCE_EXHAUSTED at once (never after queueing):

* **count**: at most ``max_in_flight`` images admitted and not yet done;
* **deadline**: a call whose deadline is shorter than the estimated time to serve it
  (the work ahead of it, spread over the worker threads, times the recent service time
  per image) is refused at once instead of waiting in the queue only to expire there
  (DEADLINE_EXCEEDED instead when even an idle server could not make it);
* **memory**: the bytes in flight stay within ``memory_budget``. Each image costs its
  encoded bytes (held from admission until done) and its decode cost (held while it is
  decoded and profiled; estimated from the header, see
  :meth:`monitor.engine.Engine.memory_estimate`). Admission refuses an image whose cost
  does not fit beside what is held; an admitted image whose decode would not fit beside
  the decodes running waits for them before it starts (at most ``workers`` run at once),
  so the budget is never exceeded. An image larger than the whole budget is refused with
  a message that says so.
"""

from __future__ import annotations

import math
import threading
import time

from ..errors import DeadlineExceededError, MonitorError

__all__ = ["AdmissionControl", "OverloadedError", "Pass"]


class OverloadedError(MonitorError):
    """Shed: the server cannot take this work now (count, deadline or memory)."""

    code = "resource_exhausted"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # "in_flight", "deadline" or "memory": a bounded metric label


class Pass:
    """An admitted image; :meth:`done` (or the ``with`` block's end) gives its place back."""

    __slots__ = ("_control", "_decode", "_encoded", "_released", "_running", "_service", "_started")

    def __init__(self, control: AdmissionControl, encoded: int, decode: int) -> None:
        self._control = control
        self._encoded = encoded
        self._decode = decode
        self._running = False
        self._started: float | None = None
        self._service: float | None = None
        self._released = False

    def start(self, deadline: float | None = None) -> bool:
        """Wait until this image's decode fits in the budget, then count it as running.

        Returns False when ``deadline`` (a ``time.monotonic()`` instant) passed first.
        """
        if not self._control._start(self._decode, deadline):
            return False
        self._running = True
        self._started = time.perf_counter()
        return True

    def served(self) -> None:
        """The image was scored: its service time counts in the estimate (errors and images
        dropped at their deadline do not, as they take no time to 'serve')."""
        if self._started is not None:
            self._service = time.perf_counter() - self._started

    def done(self) -> None:
        if self._released:
            return
        self._released = True
        self._control._release(self._encoded, self._decode if self._running else 0, self._service)

    def __enter__(self) -> Pass:
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()


class AdmissionControl:
    """Admit scoring work by count, deadline and memory (thread-safe).

    Parameters
    ----------
    max_in_flight : int
        Images admitted and not yet done (queued or running).
    workers : int
        Images served at once; the queue ahead of a call drains ``workers`` at a time.
    memory_budget : int
        Bytes the admitted images may need together (0: no memory limit).
    """

    #: Weight of the newest service time in the moving average.
    alpha = 0.1
    #: Service times seen before deadlines are judged (until then every call is let in).
    min_samples = 5

    def __init__(self, max_in_flight: int, workers: int, memory_budget: int) -> None:
        self.max_in_flight = max_in_flight
        self.workers = max(1, workers)
        self.memory_budget = memory_budget
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._in_flight = 0
        self._encoded = 0  # encoded bytes of every admitted image
        self._decoding = 0  # decode cost of the images being decoded now
        self._service: float | None = None
        self._samples = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def bytes_in_flight(self) -> int:
        return self._encoded + self._decoding

    def estimated_seconds(self, ahead: int | None = None) -> float | None:
        """Estimated time to serve one more image behind ``ahead`` others (None: not known yet)."""
        with self._lock:
            return self._estimate(self._in_flight if ahead is None else ahead)

    def _estimate(self, ahead: int) -> float | None:
        if self._service is None or self._samples < self.min_samples:
            return None
        return math.ceil((ahead + 1) / self.workers) * self._service

    def precheck(self, deadline_left: float | None, what: str) -> None:
        """Raise at once if the count or deadline limit refuses any image now (reserves nothing).

        The caller runs it before it reads the image's header for :meth:`admit`'s memory cost,
        so that a call refused anyway is refused without that work.
        """
        with self._lock:
            self._check_count_and_deadline(deadline_left, what)

    def admit(self, encoded: int, decode: int, deadline_left: float | None, what: str) -> Pass:
        """Let one image in, or raise :class:`OverloadedError` at once.

        Parameters
        ----------
        encoded, decode : int
            Bytes the image holds from admission on, and while it is decoded and profiled.
        deadline_left : float or None
            Seconds until the caller's deadline (None: no deadline).
        what : str
            Names the request in the error message.
        """
        cost = encoded + decode
        with self._lock:
            self._check_count_and_deadline(deadline_left, what)
            if self.memory_budget:
                if cost > self.memory_budget:
                    raise OverloadedError(
                        f"{what}: the image needs about {cost / 2**20:.0f} MiB to decode and profile, more than "
                        f"the server's whole memory budget ({self.memory_budget / 2**20:.0f} MiB, "
                        "--memory-budget-bytes)",
                        "memory",
                    )
                held = self._encoded + self._decoding
                if held + cost > self.memory_budget:
                    raise OverloadedError(
                        f"{what}: server memory budget in use ({held / 2**20:.0f} of "
                        f"{self.memory_budget / 2**20:.0f} MiB by {self._in_flight} images in flight; this "
                        f"one needs about {cost / 2**20:.0f} MiB); retry with backoff",
                        "memory",
                    )
            self._in_flight += 1
            self._encoded += encoded
        return Pass(self, encoded, decode)

    def _check_count_and_deadline(self, deadline_left: float | None, what: str) -> None:
        if self._in_flight >= self.max_in_flight:
            raise OverloadedError(
                f"{what}: server overloaded: {self._in_flight} images in flight "
                f"(limit max_concurrent_rpcs={self.max_in_flight}); retry with backoff",
                "in_flight",
            )
        if deadline_left is not None:
            alone = self._estimate(0)
            if alone is not None and alone > deadline_left:  # too short even on an idle server
                raise DeadlineExceededError(
                    f"{what}: the deadline ({deadline_left:.3g} s left) is shorter than the time one "
                    f"image takes (about {alone:.3g} s): deadline exceeded before decoding"
                )
            estimate = self._estimate(self._in_flight)
            if estimate is not None and estimate > deadline_left:
                raise OverloadedError(
                    f"{what}: cannot be served before its deadline ({deadline_left:.3g} s left; about "
                    f"{estimate:.3g} s needed with {self._in_flight} images ahead); retry with backoff "
                    "or a longer deadline",
                    "deadline",
                )

    def _start(self, decode: int, deadline: float | None) -> bool:
        with self._freed:
            while (
                self.memory_budget
                and self._decoding
                and self._encoded + self._decoding + decode > self.memory_budget
            ):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._freed.wait(None if left is None else min(left, threading.TIMEOUT_MAX))
            self._decoding += decode
            return True

    def _release(self, encoded: int, decode: int, service: float | None) -> None:
        with self._freed:
            self._in_flight -= 1
            self._encoded -= encoded
            self._decoding -= decode
            self._freed.notify_all()
            if service is not None:
                self._samples += 1
                self._service = (
                    service
                    if self._service is None
                    else (1 - self.alpha) * self._service + self.alpha * service
                )
