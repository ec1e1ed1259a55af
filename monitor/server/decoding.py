"""Decoding and profiling of encoded images in worker processes (``--decode-processes``).

Some decoders hold the GIL for the whole decode: pylibjpeg-openjpeg (JPEG 2000
DICOM) lets another Python thread run about 10% of the time, so scoring threads
cannot overlap those decodes (benchmarks/results/server.md). Decoding in processes
overlaps them, and a decoder that crashes on a hostile file takes down a child
process, not the server: the child is replaced and the image is tried once more on
the new one; a second crash fails the request with INTERNAL.
The child also computes the spectral profile, so only 31 numbers and the image
header travel back, not an image-sized array.

Each child has its own socket pair, with a writer and a reader thread in the parent:
the encoded bytes go out as they are (no pickling of the image), the child works
through its images in order, and holds the next image while it decodes one, so it
never waits for the parent in between (that hand-over left about 5% of 2 CPUs idle).
Scoring threads wait on their own image's reply with the GIL released, and a stuck
child is killed after ``--decode-timeout``. A ``ProcessPoolExecutor`` adds a
queue-management and a feeder thread to each request's path and copies a large message
many times over; with it, a 1024x1024 PNG request spent 8.6% of its time outside
decoding, profiling and scoring (1.6% in-thread).
"""

from __future__ import annotations

import collections
import json
import logging
import multiprocessing
import pickle
import queue
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
    """An image was not decoded in time: the child working on it was killed and replaced, or
    the caller's deadline passed before a child reached it (then nothing was killed).

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


_PROFILERS: dict[str, SpectralProfiler] = {}


def decode_and_profile(
    data: bytes, kind: str | None, name: str, max_pixels: int, spec: str
) -> tuple[np.ndarray, ImageMeta, float, float]:
    """What a child does per image: (profile, header, decode seconds, profile seconds).

    ``spec`` is the profiler's :meth:`~monitor.spectrum.SpectralProfiler.spec` as JSON.
    """
    t0 = time.perf_counter()
    image = imaging.load_bytes(data, kind=kind, name=name, max_pixels=max_pixels)
    t1 = time.perf_counter()
    profiler = _PROFILERS.get(spec)
    if profiler is None:
        profiler = _PROFILERS[spec] = SpectralProfiler.from_spec(json.loads(spec))
    profile = profiler.profile_image(image)
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


class _Ticket:
    """One image sent to a child: its reply, or why there is none."""

    __slots__ = ("done", "failure", "reply", "started")

    def __init__(self) -> None:
        self.started = threading.Event()  # the child is working on this image now
        self.done = threading.Event()
        self.reply: tuple | None = None
        # "crashed": the child died on this image; "requeue": it died before reaching it.
        self.failure: str | None = None


class _Child:
    """A decoder process with a writer and a reader thread, so that a second image can be on
    its way while the first is decoded; replies come back in order."""

    def __init__(self, context: Any, task: Task, on_exit: Callable[[_Child], None]) -> None:
        self.sock, child_end = socket.socketpair()
        self.process = context.Process(target=_child_main, args=(child_end, task), daemon=True)
        self.process.start()
        child_end.close()
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._pending: collections.deque[_Ticket] = collections.deque()
        self._outbox: queue.SimpleQueue[tuple[Any, bytes] | None] = queue.SimpleQueue()
        self.alive = True
        self.exited = threading.Event()  # set once the pool has been told (and has replaced it)
        pid = self.process.pid
        self._writer = threading.Thread(target=self._write, name=f"decoder-{pid}-write", daemon=True)
        self._reader = threading.Thread(target=self._read, name=f"decoder-{pid}-read", daemon=True)
        self._writer.start()
        self._reader.start()

    @property
    def load(self) -> int:
        return len(self._pending)

    def submit(self, data: bytes, args: tuple) -> _Ticket:
        ticket = _Ticket()
        with self._lock:
            if not self.alive:
                ticket.failure = "requeue"
                ticket.started.set()
                ticket.done.set()
                return ticket
            self._pending.append(ticket)
            if len(self._pending) == 1:
                ticket.started.set()
            # Under the lock, so that images go out in the order of _pending.
            self._outbox.put((args, data))
        return ticket

    def _write(self) -> None:
        while (item := self._outbox.get()) is not None:
            try:
                _send(self.sock, item[0], item[1])
            except OSError:
                return  # the child is gone; the reader fails what is pending

    def _read(self) -> None:
        while True:
            try:
                reply, _ = _recv(self.sock)
            except (EOFError, OSError):
                break
            with self._lock:
                ticket = self._pending.popleft()
                if self._pending:
                    self._pending[0].started.set()
            ticket.reply = reply
            ticket.done.set()
        with self._lock:
            self.alive = False
            pending = list(self._pending)
            self._pending.clear()
        self._outbox.put(None)
        for i, ticket in enumerate(pending):
            ticket.failure = "crashed" if i == 0 else "requeue"
            ticket.started.set()
            ticket.done.set()
        try:
            self._on_exit(self)
        finally:
            self.exited.set()

    def kill(self) -> None:
        self.process.kill()

    def stop(self, timeout: float) -> None:
        self._outbox.put((None, b""))  # the child exits on None after the images before it
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._reader.join(timeout)
        self.sock.close()


class DecodePool:
    """``processes`` spawned decoder processes (spawn, not fork: the parent runs grpc threads).

    Each child has up to two images in hand: the one it decodes and the next, already sent,
    so that it never waits for the parent between images (on 2 CPUs the hand-over otherwise
    left about 5% of the CPU time idle). Callers beyond that wait first come, first served.

    Parameters
    ----------
    processes : int
        Children; each decodes one image at a time.
    task : callable, optional
        What a child runs per image (a module-level function, pickled by reference);
        :func:`decode_and_profile` unless a test substitutes one.
    """

    depth = 2

    def __init__(self, processes: int, task: Task = decode_and_profile) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.processes = processes
        self._context = multiprocessing.get_context("spawn")
        self._task = task
        self._lock = threading.Lock()
        self._closed = False
        self._changed = threading.Condition(self._lock)  # a child was replaced
        self._children = [self._spawn() for _ in range(processes)]
        self._free = processes * self.depth  # images that may be in the children's hands
        self._waiting: collections.deque[threading.Event] = collections.deque()  # set: your turn

    def _spawn(self) -> _Child:
        return _Child(self._context, self._task, self._child_exited)

    def _acquire(self) -> None:
        # First come, first served: a freed place goes straight to the longest-waiting thread.
        # With a plain lock or queue the releasing thread could take it back for its next
        # image while others wait, which stretched the 8-client p99 to 1.7x the p50.
        with self._lock:
            if self._free:
                self._free -= 1
                return
            turn = threading.Event()
            self._waiting.append(turn)
        turn.wait()

    def _release(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()
            else:
                self._free += 1

    def _least_loaded(self) -> _Child:
        with self._changed:
            end = time.monotonic() + _RESPAWN_WAIT
            while True:
                alive = [c for c in self._children if c.alive]
                if alive:
                    return min(alive, key=lambda c: c.load)
                # Every child just died: wait for a replacement rather than spin on dead ones.
                left = end - time.monotonic()
                if self._closed or left <= 0:
                    raise DecoderCrashedError(
                        "no decoder process is running and none could be started; see the server log"
                    )
                self._changed.wait(left)

    def warm_up(self) -> None:
        """Wait until every child has imported the decoders, before the first request."""
        for ticket in [child.submit(b"", ()) for child in self._children]:
            ticket.done.wait()

    def run(
        self, data: bytes, *args: Any, timeout: float | None = None, deadline: float | None = None
    ) -> Any:
        """``task(data, *args)`` in a child (waiting for room); its exception is re-raised here.

        ``data`` (the encoded image) travels as raw bytes; ``args`` are pickled.

        Parameters
        ----------
        timeout : float, optional
            Seconds the child may take once it starts on the image.
        deadline : float, optional
            The caller's deadline, a ``time.monotonic()`` instant; waiting counts.

        Raises
        ------
        DecoderCrashedError
            The child died on these arguments, and so did a fresh one.
        DecodeTimeoutError
            The child did not finish within ``timeout`` or before ``deadline``: it was killed
            (a decoder stuck on a hostile file would otherwise hold it forever) and replaced.
            If the deadline passes before the child starts on the image, nothing is killed.
        """
        name = args[1] if len(args) > 1 else "image"
        crashes = 0
        while True:
            self._acquire()
            try:
                child = self._least_loaded()
                ticket = child.submit(data, args)
                if not ticket.started.wait(_left(deadline)):
                    raise DecodeTimeoutError(
                        f"{name}: the request's deadline passed while waiting for a decoder process",
                        caller_deadline=True,
                    )
                limit, caller = timeout, False
                left = _left(deadline)
                if left is not None and (limit is None or left < limit):
                    limit, caller = left, True
                if not ticket.done.wait(limit):
                    log.error(
                        "a decoder process is over its time limit; stopping it",
                        extra={"image": name, "seconds": limit, "pid": child.process.pid},
                    )
                    child.kill()
                    child.exited.wait(_RESPAWN_WAIT)  # so that the next image finds its replacement
                    raise DecodeTimeoutError(
                        f"{name}: decoding and profiling took longer than "
                        + ("the request's deadline" if caller else f"{limit:g} s (--decode-timeout)")
                        + "; the decoder process was stopped and replaced",
                        caller_deadline=caller,
                    )
            finally:
                self._release()
            if ticket.failure == "requeue":
                continue
            if ticket.failure == "crashed":
                crashes += 1
                if crashes == 2:
                    raise DecoderCrashedError(
                        f"{name}: the image decoder process died twice on this image "
                        "(a decoder crash: the file may be malformed or hostile); the server goes on"
                    )
                continue
            assert ticket.reply is not None
            if ticket.reply[0] == "ok":
                return ticket.reply[1]
            _, exc, tb = ticket.reply
            if tb is not None:
                raise exc from RemoteTracebackError(tb)
            raise exc

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
        args = (kind, name, max_pixels, json.dumps(profiler.spec(), sort_keys=True))
        return self.run(data, *args, timeout=timeout, deadline=deadline)

    def _child_exited(self, dead: _Child) -> None:
        """Called by a child's reader thread when the child is gone: start a replacement."""
        dead.process.join(1.0)
        with self._lock:
            if self._closed:
                return
        log.error("a decoder process died; starting a new one", extra={"exitcode": dead.process.exitcode})
        try:
            fresh = self._spawn()
        except Exception:  # e.g. out of memory or process slots: callers time out in _least_loaded
            log.exception("could not start a new decoder process")
            return
        finally:
            dead.sock.close()
        with self._changed:
            self._children[self._children.index(dead)] = fresh
            self._changed.notify_all()

    def pids(self) -> list[int | None]:
        """Process ids of the current children (for tests and diagnostics)."""
        with self._lock:
            return [c.process.pid for c in self._children]

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every child; call once no thread is scoring (each child finishes its images first)."""
        with self._changed:
            self._closed = True
            children = list(self._children)
            self._changed.notify_all()
        for child in children:
            child.stop(timeout)


_RESPAWN_WAIT = 10.0  # seconds to wait for a replacement child


def _left(deadline: float | None) -> float | None:
    """Seconds to wait for ``deadline`` (monotonic), clamped to what ``Event.wait`` accepts."""
    if deadline is None:
        return None
    return min(max(deadline - time.monotonic(), 0.0), threading.TIMEOUT_MAX)
