"""Decoding and profiling of encoded images in worker processes (``--decode-processes``).

Some decoders hold the GIL for the whole decode: pylibjpeg-openjpeg (JPEG 2000
DICOM) lets another Python thread run about 10% of the time, so scoring threads
cannot overlap those decodes (benchmarks/results/server.md). Decoding in processes
overlaps them, and a decoder that crashes on a hostile file takes down a child
process, not the server: the child is replaced and the image is tried once more on
the new one; a second crash fails the request with INTERNAL.
The child also computes the spectral profile, so only the profile and the image
header travel back, not an image-sized array.

Each child has its own socket pair, with a writer and a reader thread in the parent:
the encoded bytes go out as they are, the child works through its images in order,
and holds the next image while it decodes one, so it never waits for the parent in
between (that hand-over left about 5% of 2 CPUs idle). Scoring threads wait on their
own image's reply with the GIL released. A caller whose deadline passes stops waiting
but the child finishes the image (killing it would cost every other caller a process
start); only a child stuck past ``--decode-timeout`` is killed, by a watchdog thread.

Frames are plain data, never pickles: a JSON header (at most :data:`MAX_HEADER_BYTES`)
and raw bytes (the encoded image one way, the float64 profile the other), so a
compromised decoder cannot make the server run code. Errors come back as a class name
and a message; only the monitor's own error classes are rebuilt by name.
"""

from __future__ import annotations

import collections
import json
import logging
import multiprocessing
import os
import queue
import signal
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import errors, imaging
from .errors import MonitorError
from .spectrum import SpectralProfiler
from .types import ImageMeta

__all__ = [
    "DecodePool",
    "DecodeTimeoutError",
    "DecoderCrashedError",
    "DecoderProtocolError",
    "Payload",
    "RemoteError",
    "RemoteTracebackError",
    "decode_and_profile",
    "profile_from_payload",
]

log = logging.getLogger("cxr_monitor.decoding")

Task = Callable[..., Any]

_HEADER = struct.Struct("!QQ")  # JSON header length, payload length
MAX_HEADER_BYTES = 1 << 20  # a header is a few hundred bytes; anything larger is a broken peer


class DecoderCrashedError(MonitorError):
    """A decoder process died while decoding (twice: once more on a fresh process)."""

    code = "internal"


class DecoderProtocolError(MonitorError):
    """A decoder process sent something that is not a well-formed frame (it is replaced)."""

    code = "internal"


class DecodeTimeoutError(MonitorError):
    """An image was not decoded in time.

    ``caller_deadline`` is true when the caller's deadline ran out first (code
    ``deadline_exceeded``; nothing was killed), false when the child was stuck past the
    pool's time limit and was killed and replaced (code ``resource_exhausted``).
    """

    def __init__(self, message: str, *, caller_deadline: bool) -> None:
        super().__init__(message)
        self.caller_deadline = caller_deadline
        self.code = "deadline_exceeded" if caller_deadline else "resource_exhausted"


class RemoteError(RuntimeError):
    """An unexpected (non-monitor) error in a decoder process: ``"Type: message"``."""


class RemoteTracebackError(Exception):
    """The traceback of an unexpected error in a decoder process (set as ``__cause__``)."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0])


@dataclass(frozen=True)
class Payload:
    """What a task returns when it has bytes to send back besides its JSON-able ``header``."""

    header: Any
    data: bytes


# Errors a child may name; anything else comes back as RemoteError with the child's traceback.
_REBUILDABLE: dict[str, type[MonitorError]] = {
    name: cls
    for name in errors.__all__
    if isinstance(cls := getattr(errors, name), type) and issubclass(cls, MonitorError)
}

_PROFILERS: dict[str, SpectralProfiler] = {}


def decode_and_profile(data: bytes, kind: str | None, name: str, max_pixels: int, spec: str) -> Payload:
    """What a child does per image: decode, profile, and return the header and the profile.

    ``spec`` is the profiler's :meth:`~monitor.spectrum.SpectralProfiler.spec` as JSON.
    The reply is read back by :func:`profile_from_payload`.
    """
    t0 = time.perf_counter()
    image = imaging.load_bytes(data, kind=kind, name=name, max_pixels=max_pixels)
    t1 = time.perf_counter()
    profiler = _PROFILERS.get(spec)
    if profiler is None:
        profiler = _PROFILERS[spec] = SpectralProfiler.from_spec(json.loads(spec))
    profile = np.ascontiguousarray(profiler.profile_image(image), dtype="<f8")
    header = {"meta": image.meta.to_dict(), "decode": t1 - t0, "profile": time.perf_counter() - t1}
    return Payload(header, profile.tobytes())


def profile_from_payload(header: Any, data: bytes) -> tuple[np.ndarray, ImageMeta, float, float]:
    """(profile, image header, decode s, profile s) from a :func:`decode_and_profile` reply.

    Raises
    ------
    DecoderProtocolError
        The reply does not have the expected fields and types.
    """
    try:
        meta = ImageMeta(**header["meta"])
        decode, prof = float(header["decode"]), float(header["profile"])
        if len(data) % 8:
            raise ValueError(f"profile of {len(data)} bytes is not float64")
    except (KeyError, TypeError, ValueError) as exc:
        raise DecoderProtocolError(f"malformed reply from a decoder process ({exc})") from None
    return np.frombuffer(data, dtype="<f8").astype(np.float64), meta, decode, prof


def _send(sock: socket.socket, header: Any, data: bytes = b"") -> None:
    # One frame: lengths, the JSON header, then the raw bytes as they are. Connection.send
    # would pickle the image into a copy and re-slice it per pipe write (quadratic copying).
    meta = json.dumps(header, separators=(",", ":")).encode()
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


def _recv(sock: socket.socket, max_data: int) -> tuple[Any, bytes]:
    """One frame; :class:`DecoderProtocolError` when its sizes or header are not plausible."""
    meta_len, data_len = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if meta_len > MAX_HEADER_BYTES or data_len > max_data:
        raise DecoderProtocolError(f"frame of {meta_len} + {data_len} bytes is larger than allowed")
    try:
        header = json.loads(_recv_exact(sock, meta_len))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecoderProtocolError(f"frame header is not JSON ({exc})") from None
    return header, bytes(_recv_exact(sock, data_len)) if data_len else b""


def _error_reply(exc: Exception) -> dict:
    name = type(exc).__name__
    if isinstance(exc, MonitorError) and _REBUILDABLE.get(name) is type(exc):
        return {"error": {"type": name, "message": str(exc)}}
    return {"error": {"type": None, "message": f"{name}: {exc}", "traceback": traceback.format_exc()}}


def _rebuild_error(error: Any) -> Exception:
    """The exception a child reported: one of ours by name, else RemoteError with its traceback."""
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return DecoderProtocolError("malformed error reply from a decoder process")
    cls = _REBUILDABLE.get(error.get("type") or "")
    if cls is not None:
        return cls(error["message"])
    exc = RemoteError(error["message"])
    tb = error.get("traceback")
    if isinstance(tb, str):
        exc.__cause__ = RemoteTracebackError(tb)
    return exc


def _child_main(sock: socket.socket, task: Task, setup: Callable[[], None] | None = None) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if setup is not None:
        setup()  # e.g. log (and route warnings) in the parent's format: children share its stderr
    # As in the parent (cli.main): parallelism is across images, so one BLAS thread per
    # process; with two, the children's small resampling products contended for the 2 cores.
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    # Decoding yields the CPU to the parent: admission, health checks and replies are short and
    # must not queue behind a decode when the cores are saturated (they shed and answer at once).
    os.nice(_CHILD_NICENESS)
    while True:
        try:
            header, data = _recv(sock, max_data=1 << 62)
        except (EOFError, OSError, DecoderProtocolError):
            return  # the parent closed its end (shutdown) or died
        if header is None:
            return
        if header == "warm":
            _send(sock, {"ok": None})  # warm-up: imports are done
            continue
        payload = b""
        try:
            result = task(data, *header["args"])
            if isinstance(result, Payload):
                result, payload = result.header, result.data
            reply: dict = {"ok": result}
            json.dumps(reply)  # a result that is not plain data is the task's bug: report it
        except Exception as exc:
            reply, payload = _error_reply(exc), b""
        _send(sock, reply, payload)
        # Not held while waiting for the next frame: an idle child kept a 60 MiB message for good.
        del header, data, payload, reply


class _Ticket:
    """One image sent to a child: its reply, or why there is none."""

    __slots__ = ("counted", "data", "done", "failure", "header", "limit", "started", "started_at")

    def __init__(self, limit: float | None, counted: bool) -> None:
        self.counted = counted  # holds one of the pool's places until it is done
        self.limit = limit  # seconds the child may spend on it (the watchdog enforces it)
        self.started = threading.Event()  # the child is working on this image now
        self.started_at: float | None = None
        self.done = threading.Event()
        self.header: Any = None
        self.data = b""
        # "crashed": the child died on it; "requeue": it died before reaching it;
        # "timeout": the watchdog killed the child stuck on it.
        self.failure: str | None = None

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.started.set()

    def overdue(self, now: float) -> bool:
        return self.limit is not None and self.started_at is not None and now - self.started_at > self.limit


class _Child:
    """A decoder process with a writer and a reader thread, so that a second image can be on
    its way while the first is decoded; replies come back in order."""

    def __init__(
        self,
        context: Any,
        task: Task,
        on_exit: Callable[[_Child], None],
        on_done: Callable[[], None],
        max_reply_bytes: int,
        setup: Callable[[], None] | None = None,
    ) -> None:
        self.sock, child_end = socket.socketpair()
        self.process = context.Process(target=_child_main, args=(child_end, task, setup), daemon=True)
        self.process.start()
        child_end.close()
        self._on_exit = on_exit
        self._on_done = on_done  # a place in the children's hands is free again
        self._max_reply = max_reply_bytes
        self._lock = threading.Lock()
        self._pending: collections.deque[_Ticket] = collections.deque()
        self._outbox: queue.SimpleQueue[tuple[Any, bytes] | None] = queue.SimpleQueue()
        self.alive = True
        self.killed_stuck = False
        self.exited = threading.Event()  # set once the pool has been told (and has replaced it)
        pid = self.process.pid
        self._writer = threading.Thread(target=self._write, name=f"decoder-{pid}-write", daemon=True)
        self._reader = threading.Thread(target=self._read, name=f"decoder-{pid}-read", daemon=True)
        self._writer.start()
        self._reader.start()

    @property
    def load(self) -> int:
        return len(self._pending)

    def head(self) -> _Ticket | None:
        """The image the child is working on now, if any."""
        with self._lock:
            return self._pending[0] if self._pending else None

    def submit(self, header: Any, data: bytes, limit: float | None, counted: bool = True) -> _Ticket:
        ticket = _Ticket(limit, counted)
        with self._lock:
            alive = self.alive
            if alive:
                self._pending.append(ticket)
                if len(self._pending) == 1:
                    ticket.start()
                # Under the lock, so that images go out in the order of _pending.
                self._outbox.put((header, data))
        if not alive:
            ticket.failure = "requeue"
            self._finish(ticket)
        return ticket

    def _finish(self, ticket: _Ticket) -> None:
        if not ticket.started.is_set():
            ticket.start()
        ticket.done.set()
        if ticket.counted:
            self._on_done()

    def _write(self) -> None:
        while (item := self._outbox.get()) is not None:
            try:
                _send(self.sock, item[0], item[1])
            except OSError:
                return  # the child is gone; the reader fails what is pending
            del item  # not held until the next image: it may be a 60 MiB message

    def _read(self) -> None:
        while True:
            try:
                header, data = _recv(self.sock, self._max_reply)
            except (EOFError, OSError):
                break
            except DecoderProtocolError as exc:
                log.error("a decoder process sent a malformed frame; stopping it", extra={"error": str(exc)})
                self.process.kill()
                break
            with self._lock:
                if not self._pending:  # a reply nobody asked for: the child is not ours to trust
                    log.error("a decoder process sent an unexpected reply; stopping it")
                    self.process.kill()
                    break
                ticket = self._pending.popleft()
                if self._pending:
                    self._pending[0].start()
            ticket.header, ticket.data = header, data
            self._finish(ticket)
        with self._lock:
            self.alive = False
            pending = list(self._pending)
            self._pending.clear()
        self._outbox.put(None)
        for i, ticket in enumerate(pending):
            ticket.failure = ("timeout" if self.killed_stuck else "crashed") if i == 0 else "requeue"
            self._finish(ticket)
        try:
            self._on_exit(self)
        finally:
            self.exited.set()

    def kill_stuck(self) -> None:
        self.killed_stuck = True
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
    left about 5% of the CPU time idle). Callers beyond that wait first come, first served,
    and leave the queue when their deadline passes, so abandoned work never reaches a child.

    Parameters
    ----------
    processes : int
        Children; each decodes one image at a time.
    task : callable, optional
        What a child runs per image (a module-level function, imported by reference in the
        child): ``task(data, *args)`` returning plain JSON data or a :class:`Payload`;
        :func:`decode_and_profile` unless a test substitutes one.
    max_reply_bytes : int, default=1 MiB
        Largest payload a child may send back (a profile is a few hundred bytes).
    setup : callable, optional
        Run once in each child before its first image; a module-level function or a
        ``functools.partial`` of one (it travels to the spawned process by reference). The
        server passes its logging set-up, so that the decoders' warnings reach its log in its
        format instead of raw lines on the stderr the children share with it.
    """

    depth = 2

    def __init__(
        self,
        processes: int,
        task: Task = decode_and_profile,
        max_reply_bytes: int = 1 << 20,
        setup: Callable[[], None] | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.processes = processes
        self._context = multiprocessing.get_context("spawn")
        self._task = task
        self._max_reply = max_reply_bytes
        self._setup = setup
        self._lock = threading.Lock()
        self._closed = False
        self._changed = threading.Condition(self._lock)  # a child was replaced, or the pool closed
        self._children = [self._spawn() for _ in range(processes)]
        self._free = processes * self.depth  # images that may be in the children's hands
        self._waiting: collections.deque[threading.Event] = collections.deque()  # set: your turn
        self.stuck_kills = 0  # children the watchdog killed (read by metrics and tests)
        self._watchdog = threading.Thread(target=self._watch, name="decoder-watchdog", daemon=True)
        self._watchdog.start()

    def _spawn(self) -> _Child:
        return _Child(
            self._context, self._task, self._child_exited, self._release, self._max_reply, self._setup
        )

    def _acquire(self, deadline: float | None) -> bool:
        """Wait for a place in a child's hands; False when ``deadline`` passed first."""
        # First come, first served: a freed place goes straight to the longest-waiting thread.
        # With a plain lock or queue the releasing thread could take it back for its next
        # image while others wait, which stretched the 8-client p99 to 1.7x the p50.
        with self._lock:
            if self._free:
                self._free -= 1
                return True
            turn = threading.Event()
            self._waiting.append(turn)
        if turn.wait(_left(deadline)):
            return True
        with self._lock:
            try:
                self._waiting.remove(turn)
                return False
            except ValueError:  # handed a place just as the deadline passed: give it on
                pass
        self._release()
        return False

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

    def _watch(self) -> None:
        """Kill a child stuck on one image past its time limit (it is replaced)."""
        while True:
            with self._changed:
                if self._closed:
                    return
                children = list(self._children)
            now = time.monotonic()
            for child in children:
                head = child.head()
                if head is not None and head.overdue(now) and not child.killed_stuck:
                    log.error(
                        "a decoder process is over its time limit; stopping it",
                        extra={"seconds": head.limit, "pid": child.process.pid},
                    )
                    self.stuck_kills += 1
                    child.kill_stuck()
            with self._changed:
                self._changed.wait(_WATCH_INTERVAL)

    def warm_up(self) -> None:
        """Wait until every child has imported the decoders, before the first request."""
        for ticket in [child.submit("warm", b"", None, counted=False) for child in self._children]:
            ticket.done.wait()

    def run(
        self, data: bytes, *args: Any, timeout: float | None = None, deadline: float | None = None
    ) -> Any:
        """``task(data, *args)`` in a child (waiting for room); its exception is re-raised here.

        ``data`` (the encoded image) travels as raw bytes; ``args`` as JSON.

        Parameters
        ----------
        timeout : float, optional
            Seconds the child may take once it starts on the image; past it the child is
            killed and replaced.
        deadline : float, optional
            The caller's deadline, a ``time.monotonic()`` instant; waiting counts. When it
            passes the caller stops waiting; nothing is killed.

        Returns
        -------
        The task's plain result, or ``(header, bytes)`` when it returned a :class:`Payload`.

        Raises
        ------
        DecoderCrashedError
            The child died on these arguments, and so did a fresh one.
        DecodeTimeoutError
            The deadline passed (``caller_deadline``), or the child was stuck past ``timeout``.
        RemoteError
            An unexpected error in the child (its traceback is the ``__cause__``).
        """
        name = args[1] if len(args) > 1 and isinstance(args[1], str) else "image"
        header = {"args": list(args)}
        crashes = 0
        while True:
            if not self._acquire(deadline):
                raise DecodeTimeoutError(
                    f"{name}: the request's deadline passed while waiting for a decoder process",
                    caller_deadline=True,
                )
            # The place is given back when the child is done with the image (its reader does
            # it), not when this caller stops waiting: a child never holds more than `depth`.
            try:
                child = self._least_loaded()
            except DecoderCrashedError:
                self._release()
                raise
            ticket = child.submit(header, data, timeout)
            if not ticket.done.wait(_left(deadline)):
                raise DecodeTimeoutError(
                    f"{name}: the request's deadline passed while "
                    + (
                        "a decoder process worked on it"
                        if ticket.started.is_set()
                        else "waiting for a decoder process"
                    ),
                    caller_deadline=True,
                )
            if ticket.failure == "requeue":
                continue
            if ticket.failure == "timeout":
                raise DecodeTimeoutError(
                    f"{name}: decoding and profiling took longer than {timeout:g} s (--decode-timeout); "
                    "the decoder process was stopped and replaced",
                    caller_deadline=False,
                )
            if ticket.failure == "crashed":
                crashes += 1
                if crashes == 2:
                    raise DecoderCrashedError(
                        f"{name}: the image decoder process died twice on this image "
                        "(a decoder crash: the file may be malformed or hostile); the server goes on"
                    )
                continue
            reply = ticket.header
            if not isinstance(reply, dict) or not ({"ok"} == reply.keys() or {"error"} == reply.keys()):
                raise DecoderProtocolError(f"{name}: malformed reply from a decoder process")
            if "error" in reply:
                raise _rebuild_error(reply["error"])
            return (reply["ok"], ticket.data) if ticket.data else reply["ok"]

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
        :meth:`monitor.spectrum.SpectralProfiler.profile_image`, and those of :meth:`run`.
        """
        spec = json.dumps(profiler.spec(), sort_keys=True)
        result = self.run(data, kind, name, max_pixels, spec, timeout=timeout, deadline=deadline)
        if not isinstance(result, tuple):
            raise DecoderProtocolError(f"{name}: a decoder process returned no profile")
        profile, meta, decode, prof = profile_from_payload(*result)
        if profile.shape != (len(profiler.feature_names),):
            raise DecoderProtocolError(f"{name}: a decoder process returned {profile.size} features")
        return profile, meta, decode, prof

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
        self._watchdog.join(timeout)


_RESPAWN_WAIT = 10.0  # seconds to wait for a replacement child
_CHILD_NICENESS = 5  # added to a decoder process's nice value
_WATCH_INTERVAL = 0.1  # seconds between the watchdog's looks at the children


def _left(deadline: float | None) -> float | None:
    """Seconds to wait for ``deadline`` (monotonic), clamped to what ``Event.wait`` accepts."""
    if deadline is None:
        return None
    return min(max(deadline - time.monotonic(), 0.0), threading.TIMEOUT_MAX)
