"""Decoding and profiling of encoded images in worker processes (``--decode-processes``).

Some decoders hold the GIL for the whole decode: pylibjpeg-openjpeg (JPEG 2000
DICOM) lets another Python thread run about 10% of the time, so scoring threads
cannot overlap those decodes (benchmarks/results/server.md). Decoding in processes
overlaps them, and a decoder that crashes on a hostile file takes down a child
process, not the server: the child is replaced and the image is tried once more on
the new one; a second crash fails the request with INTERNAL.
The child also computes the spectral profile, so only 31 numbers and the image
header travel back, not an image-sized array.

Each child has its own socket pair and serves one scoring thread at a time: the
thread writes the encoded bytes as they are and blocks on the reply with the GIL
released. A ``ProcessPoolExecutor`` adds a queue-management and a feeder thread to
each request's path and copies a large message many times over; with it, a
1024x1024 PNG request spent 8.6% of its time outside decoding, profiling and scoring
(1.6% in-thread).
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import pickle
import signal
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import imaging
from ..errors import MonitorError
from ..spectrum import SpectralProfiler
from ..types import ImageMeta

__all__ = ["DecodePool", "DecodeTimeoutError", "DecoderCrashedError", "RemoteTracebackError"]

log = logging.getLogger("cxr_monitor.server")

Task = Callable[..., Any]

_HEADER = struct.Struct("!QQ")  # pickled-object length, payload length


class DecoderCrashedError(MonitorError):
    """A decoder process died while decoding (twice: once more on a fresh process)."""

    code = "internal"


class DecodeTimeoutError(Exception):
    """A decoder process did not answer in time; it was killed and replaced.

    ``caller_deadline`` tells whether the caller's deadline (rather than the pool's own
    time limit) ran out first.
    """

    def __init__(self, message: str, *, caller_deadline: bool) -> None:
        super().__init__(message)
        self.caller_deadline = caller_deadline


class RemoteTracebackError(Exception):
    """The traceback of an unexpected error in a decoder process (set as ``__cause__``)."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0])


_PROFILERS: dict[tuple[int, int], SpectralProfiler] = {}


def decode_and_profile(
    data: bytes, kind: str | None, name: str, max_pixels: int, working_size: int, n_bands: int
) -> tuple[np.ndarray, ImageMeta, float, float]:
    """What a child does per image: (profile, header, decode seconds, profile seconds)."""
    t0 = time.perf_counter()
    image = imaging.load_bytes(data, kind=kind, name=name, max_pixels=max_pixels)
    t1 = time.perf_counter()
    profiler = _PROFILERS.get((working_size, n_bands))
    if profiler is None:
        profiler = _PROFILERS[(working_size, n_bands)] = SpectralProfiler(working_size, n_bands)
    profile = profiler.profile(image.pixels)
    return profile, image.meta, t1 - t0, time.perf_counter() - t1


def _send(sock: socket.socket, obj: Any, data: bytes = b"") -> None:
    # One frame: lengths, the pickled object, then the encoded image as it is. Connection.send
    # would pickle the image into a copy and re-slice it per pipe write (quadratic copying).
    meta = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(meta), len(data)) + meta)
    if data:
        sock.sendall(memoryview(data))


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    while pos < n:
        got = sock.recv_into(view[pos:])
        if got == 0:
            raise EOFError("the other end closed the connection")
        pos += got
    return buf


def _recv(sock: socket.socket) -> tuple[Any, bytes]:
    meta_len, data_len = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    obj = pickle.loads(_recv_exact(sock, meta_len))
    return obj, bytes(_recv_exact(sock, data_len)) if data_len else b""


def _child_main(sock: socket.socket, task: Task) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # As in the parent (cli.main): parallelism is across images, so one BLAS thread per
    # process; with two, the children's small resampling products contended for the 2 cores.
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    while True:
        try:
            args, data = _recv(sock)
        except (EOFError, OSError):
            return  # the parent closed its end (shutdown) or died
        if args is None:
            return
        if args == ():
            _send(sock, ("ok", None))  # warm-up: imports are done
            continue
        try:
            reply: tuple = ("ok", task(data, *args))
        except Exception as exc:
            tb = traceback.format_exc()
            try:
                pickle.dumps(exc)
            except Exception:
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            reply = ("error", exc, None if isinstance(exc, MonitorError) else tb)
        _send(sock, reply)


class _Child:
    def __init__(self, context: Any, task: Task) -> None:
        self.sock, child_end = socket.socketpair()
        self.process = context.Process(target=_child_main, args=(child_end, task), daemon=True)
        self.process.start()
        child_end.close()

    def call(self, data: bytes, args: tuple, timeout: float | None = None) -> tuple:
        """Send one image and wait for the reply; TimeoutError after ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            _send(self.sock, args, data)
            return _recv(self.sock)[0]
        finally:
            self.sock.settimeout(None)

    def stop(self, timeout: float) -> None:
        try:
            _send(self.sock, None)
        except OSError:
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.sock.close()


class _Handoff:
    def __init__(self) -> None:
        self.ready = threading.Event()
        self.child: _Child | None = None


class DecodePool:
    """``processes`` spawned decoder processes (spawn, not fork: the parent runs grpc threads).

    Parameters
    ----------
    processes : int
        Children; each decodes one image at a time.
    task : callable, optional
        What a child runs per image (a module-level function, pickled by reference);
        :func:`decode_and_profile` unless a test substitutes one.
    """

    def __init__(self, processes: int, task: Task = decode_and_profile) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.processes = processes
        self._context = multiprocessing.get_context("spawn")
        self._task = task
        self._lock = threading.Lock()
        self._closed = False
        self._children = [_Child(self._context, task) for _ in range(processes)]
        self._idle: list[_Child] = list(self._children)
        self._waiting: collections.deque[_Handoff] = collections.deque()

    def _acquire(self) -> _Child:
        # First come, first served: a released child goes straight to the longest-waiting
        # thread. With a plain queue the releasing thread could take it back for its next
        # image while others wait, which stretched the 8-client p99 to 1.7x the p50.
        with self._lock:
            if self._idle:
                return self._idle.pop()
            handoff = _Handoff()
            self._waiting.append(handoff)
        handoff.ready.wait()
        assert handoff.child is not None
        return handoff.child

    def _release(self, child: _Child) -> None:
        with self._lock:
            if self._waiting:
                handoff = self._waiting.popleft()
                handoff.child = child
                handoff.ready.set()
            else:
                self._idle.append(child)

    def warm_up(self) -> None:
        """Wait until every child has imported the decoders, before the first request."""
        for child in self._children:
            child.call(b"", ())

    def run(
        self, data: bytes, *args: Any, timeout: float | None = None, deadline: float | None = None
    ) -> Any:
        """``task(data, *args)`` in an idle child (waiting for one); its exception is re-raised here.

        ``data`` (the encoded image) travels as raw bytes; ``args`` are pickled.

        Parameters
        ----------
        timeout : float, optional
            Seconds the child may take once it has the image.
        deadline : float, optional
            The caller's deadline, a ``time.monotonic()`` instant; waiting for an idle child counts.

        Raises
        ------
        DecoderCrashedError
            The child died on these arguments, and so did a fresh one.
        DecodeTimeoutError
            The child did not answer within ``timeout`` or before ``deadline``: it was killed
            (a decoder stuck on a hostile file would otherwise hold it forever) and replaced.
        """
        name = args[1] if len(args) > 1 else "image"
        for attempt in (1, 2):
            child = self._acquire()
            limit, caller = timeout, False
            if deadline is not None:
                left = max(deadline - time.monotonic(), 0.0)
                if limit is None or left < limit:
                    limit, caller = left, True
            try:
                reply = child.call(data, args, limit)
            except TimeoutError:
                child.process.kill()
                self._replace(child, image=name, reason="timeout", seconds=limit)
                raise DecodeTimeoutError(
                    f"{name}: decoding and profiling took longer than "
                    + ("the request's deadline" if caller else f"{limit:g} s (--decode-timeout)")
                    + "; the decoder process was stopped and replaced",
                    caller_deadline=caller,
                ) from None
            except (EOFError, OSError):
                self._replace(child, image=name, attempt=attempt)
                continue
            self._release(child)
            if reply[0] == "ok":
                return reply[1]
            _, exc, tb = reply
            if tb is not None:
                raise exc from RemoteTracebackError(tb)
            raise exc
        raise DecoderCrashedError(
            f"{name}: the image decoder process died twice on this image "
            "(a decoder crash: the file may be malformed or hostile); the server goes on"
        )

    def profile_bytes(
        self,
        data: bytes,
        *,
        kind: str | None,
        name: str,
        max_pixels: int,
        profiler: SpectralProfiler,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> tuple[np.ndarray, ImageMeta, float, float]:
        """Decode and profile in a child process: (profile, header, decode s, profile s).

        Errors are those of :func:`monitor.imaging.load_bytes` and
        :meth:`monitor.spectrum.SpectralProfiler.profile`, and those of :meth:`run`.
        """
        args = (kind, name, max_pixels, profiler.working_size, profiler.n_bands)
        return self.run(data, *args, timeout=timeout, deadline=deadline)

    def _replace(self, dead: _Child, **context: Any) -> None:
        dead.sock.close()
        dead.process.join(1.0)
        what = "was stopped after its time limit" if context.get("reason") == "timeout" else "died"
        log.error(
            f"a decoder process {what}; starting a new one",
            extra={**context, "exitcode": dead.process.exitcode},
        )
        error: Exception | None = None
        with self._lock:
            if self._closed:
                return
            try:
                fresh: _Child = _Child(self._context, self._task)
            except Exception as exc:  # e.g. out of memory or process slots
                error, fresh = exc, dead  # keep the slot: its next user tries to replace it again
            else:
                self._children[self._children.index(dead)] = fresh
        self._release(fresh)
        if error is not None:
            raise DecoderCrashedError(
                f"a decoder process died and a new one could not be started ({error})"
            ) from error

    def pids(self) -> list[int | None]:
        """Process ids of the current children (for tests and diagnostics)."""
        return [c.process.pid for c in self._children]

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every child; call once no thread is scoring (each child finishes its image first)."""
        with self._lock:
            self._closed = True
            children = list(self._children)
        for child in children:
            child.stop(timeout)
