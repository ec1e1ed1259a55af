"""Tests for monitor.decoding.DecodePool: results, errors and crashes of decoder processes.

The tasks below run in spawned children, which import this module by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from monitor.decoding import (
    DecodePool,
    DecoderCrashedError,
    DecodeTimeoutError,
    RemoteError,
    RemoteTracebackError,
    decode_and_profile,
    profile_from_payload,
)
from monitor.errors import InvalidImageError
from monitor.spectrum import SpectralProfiler


def echo(data: bytes, *args: object) -> tuple:
    return (os.getpid(), len(data), hashlib.sha256(data).hexdigest(), *args)


def fail(data: bytes, kind: str) -> None:
    if kind == "monitor":
        raise InvalidImageError("x.png: truncated")
    if kind == "local-class":

        class LocalError(Exception):  # a class the parent could not find by name
            pass

        raise LocalError("local detail")
    raise KeyError("a bug")


def crash_unless(data: bytes, marker: str) -> str:
    """Die like a segfaulting decoder, unless ``marker`` exists; then remove it and succeed."""
    path = Path(marker)
    if path.exists():
        path.unlink()
        return "survived"
    os._exit(11)


def wait_for(data: bytes, marker: str, tag: int) -> int:
    """Hold the child until ``marker`` exists (lets a test line threads up behind it)."""
    while not Path(marker).exists():
        time.sleep(0.005)
    return tag


@pytest.fixture
def new_pool() -> Iterator[Callable[..., DecodePool]]:
    """``new_pool(processes, task)``: a warmed-up pool, shut down after the test."""
    pools: list[DecodePool] = []

    def make(processes: int, task: Callable[..., object]) -> DecodePool:
        pools.append(DecodePool(processes, task=task))
        pools[-1].warm_up()
        return pools[-1]

    yield make
    for p in pools:
        p.shutdown()


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    p = DecodePool(2, task=echo)
    p.warm_up()
    yield p
    p.shutdown()


def test_runs_in_the_children_and_spreads_concurrent_calls(pool: DecodePool) -> None:
    pids: list[int] = []
    barrier = threading.Barrier(2)

    def call(i: int) -> None:
        barrier.wait()
        pid, _, _, value = pool.run(b"", i)
        assert value == i
        pids.append(pid)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert os.getpid() not in pids
    assert set(pids) <= set(pool.pids()) and len(pool.pids()) == 2


@pytest.mark.parametrize(
    ("kind", "error", "message", "remote"),
    [
        ("monitor", InvalidImageError, "x.png: truncated", False),  # our errors come back as they are
        ("bug", RemoteError, "KeyError: 'a bug'", True),  # others carry the child's traceback
        ("local-class", RemoteError, "LocalError: local detail", True),
    ],
)
def test_errors_come_back_and_the_child_stays(
    new_pool: Callable[..., DecodePool], kind: str, error: type[Exception], message: str, remote: bool
) -> None:
    pool = new_pool(1, fail)
    before = pool.pids()
    with pytest.raises(error, match=message) as info:
        pool.run(b"", kind)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTracebackError) == remote
    if remote:
        assert "in fail" in str(cause)
    assert pool.pids() == before  # an error is not a crash


def test_a_crash_is_retried_once_on_a_fresh_process(
    new_pool: Callable[..., DecodePool], tmp_path: Path
) -> None:
    marker = tmp_path / "second-time-lucky"
    pool = new_pool(1, crash_unless)
    (first,) = pool.pids()
    with pytest.raises(DecoderCrashedError, match="died twice on this image"):
        pool.run(b"", str(marker))  # crashes twice: no marker
    assert pool.pids() != [first]
    marker.touch()
    assert pool.run(b"", str(marker)) == "survived"  # the pool still serves


def test_waiting_threads_are_served_first_come_first_served(new_pool: Callable[..., DecodePool]) -> None:
    pool = new_pool(1, echo)  # one child: room for 2 images (the one decoded and the next)
    order: list[int] = []

    def wait_until(condition: Callable[[], bool]) -> None:
        end = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < end, f"stuck: order {order}, {len(pool._waiting)} waiting"  # noqa: SLF001
            time.sleep(0.002)

    def take(tag: int) -> None:
        pool._acquire(None)  # noqa: SLF001
        order.append(tag)

    pool._acquire(None)  # noqa: SLF001
    pool._acquire(None)  # noqa: SLF001  (both places taken)
    for tag in (1, 2, 3):  # queue up in this order
        threading.Thread(target=take, args=(tag,), daemon=True).start()
        wait_until(lambda tag=tag: len(pool._waiting) == tag)  # noqa: SLF001
    pool._release()  # noqa: SLF001
    wait_until(lambda: order == [1])
    # A newcomer (or the thread that just released, asking again) queues behind 2 and 3.
    threading.Thread(target=take, args=(0,), daemon=True).start()
    wait_until(lambda: len(pool._waiting) == 3)  # noqa: SLF001
    for expected in ([1, 2], [1, 2, 3], [1, 2, 3, 0]):
        pool._release()  # noqa: SLF001
        wait_until(lambda expected=expected: order == expected)
    assert pool._free == 0 and not pool._waiting  # noqa: SLF001
    for _ in range(2):
        pool._release()  # noqa: SLF001  (give the places back for shutdown)


def test_children_killed_while_idle_are_replaced(new_pool: Callable[..., DecodePool], tmp_path: Path) -> None:
    marker = tmp_path / "go"
    pool = new_pool(2, wait_for)
    victims = pool.pids()
    for pid in victims:
        os.kill(pid, 9)  # as if each had crashed on a hostile file
    results: list[int] = []
    # Two calls at once, each held until the marker exists, so each lands on its own child.
    threads = [threading.Thread(target=lambda t=t: results.append(pool.run(b"", str(marker), t)))
               for t in (1, 2)]  # fmt: skip
    for t in threads:
        t.start()
    end = time.monotonic() + 60
    while set(victims) & set(pool.pids()) or pool._free > 2:  # noqa: SLF001  (both calls in a child)
        assert time.monotonic() < end, f"children not replaced: {pool.pids()} (killed {victims})"
        time.sleep(0.01)
    marker.touch()
    for t in threads:
        t.join()
    assert sorted(results) == [1, 2]  # every call landed on a fresh child
    assert not set(victims) & set(pool.pids())


def test_a_stuck_child_is_killed_after_the_time_limit(
    new_pool: Callable[..., DecodePool], tmp_path: Path
) -> None:
    marker = tmp_path / "never"
    pool = new_pool(1, wait_for)
    (stuck,) = pool.pids()
    with pytest.raises(DecodeTimeoutError, match="the decoder process was stopped and replaced") as info:
        pool.run(b"", str(marker), 1, timeout=0.3)
    assert info.value.caller_deadline is False and info.value.code == "resource_exhausted"
    assert pool.stuck_kills == 1
    end = time.monotonic() + 30
    while pool.pids() == [stuck]:  # replaced by the dead child's reader thread
        assert time.monotonic() < end, "the stuck child was not replaced"
        time.sleep(0.01)
    marker.touch()
    assert pool.run(b"", str(marker), 2, timeout=30.0) == 2  # the replacement serves


def test_a_caller_deadline_never_kills_the_child(new_pool: Callable[..., DecodePool], tmp_path: Path) -> None:
    """Short client deadlines must not cost every other caller a process start (issue 9, defect 1)."""
    marker = tmp_path / "go"
    pool = new_pool(1, wait_for)
    (child,) = pool.pids()
    with pytest.raises(
        DecodeTimeoutError, match="deadline passed while a decoder process worked on it"
    ) as info:
        pool.run(b"", str(marker), 1, timeout=30.0, deadline=time.monotonic() + 0.2)
    assert info.value.caller_deadline is True and info.value.code == "deadline_exceeded"
    marker.touch()  # the abandoned image finishes; its reply is dropped
    assert pool.run(b"", str(marker), 2, timeout=30.0) == 2
    assert pool.pids() == [child] and pool.stuck_kills == 0


def test_a_caller_whose_deadline_passes_in_the_queue_never_reaches_a_child(
    new_pool: Callable[..., DecodePool], tmp_path: Path
) -> None:
    marker = tmp_path / "go"
    pool = new_pool(1, wait_for)
    holders = [threading.Thread(target=pool.run, args=(b"", str(marker), t)) for t in (1, 2)]
    for t in holders:
        t.start()  # both places in the child's hands
    end = time.monotonic() + 30
    while pool._free:  # noqa: SLF001
        assert time.monotonic() < end
        time.sleep(0.005)
    with pytest.raises(DecodeTimeoutError, match="deadline passed while waiting for a decoder process"):
        pool.run(b"", str(marker), 3, deadline=time.monotonic() + 0.2)
    assert not pool._waiting  # noqa: SLF001  (it left the queue)
    marker.touch()
    for t in holders:
        t.join(30)
    assert pool._free == 2  # noqa: SLF001  (every place given back)


def test_replies_are_plain_data_never_pickles(tmp_path: Path) -> None:
    """A compromised decoder must not make the server run code (issue 9, defect 7)."""
    import pickle
    import socket

    from monitor.decoding import DecoderProtocolError, _recv, _send

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    a, b = socket.socketpair()
    with a, b:
        blob = pickle.dumps(Evil())
        a.sendall(len(blob).to_bytes(8, "big") + (0).to_bytes(8, "big") + blob)
        with pytest.raises(DecoderProtocolError, match="frame header is not JSON"):
            _recv(b, max_data=1 << 20)
        _send(a, {"ok": [1, 2]}, b"xyz")
        assert _recv(b, max_data=1 << 20) == ({"ok": [1, 2]}, b"xyz")
        a.sendall((2 << 20).to_bytes(8, "big") + (0).to_bytes(8, "big"))
        with pytest.raises(DecoderProtocolError, match="larger than allowed"):
            _recv(b, max_data=1 << 20)
    assert not marker.exists()


@pytest.mark.parametrize("size", [0, 1, 100_000, 3_000_001])
def test_the_payload_arrives_whole(pool: DecodePool, size: int) -> None:
    data = os.urandom(size)
    _, n, digest, tag = pool.run(data, "tag")
    assert (n, digest, tag) == (size, hashlib.sha256(data).hexdigest(), "tag")


def test_shutdown_stops_every_child() -> None:
    pool = DecodePool(2, task=echo)
    pool.warm_up()
    processes = [c.process for c in pool._children]  # noqa: SLF001
    pool.shutdown()
    assert all(not p.is_alive() for p in processes)
    assert all(p.exitcode == 0 for p in processes)  # asked to stop, not killed


def test_decode_and_profile_matches_the_profiler(png_bytes_small: bytes) -> None:
    reply = decode_and_profile(
        png_bytes_small, None, "a.png", 10**7, json.dumps(SpectralProfiler(128, 8).spec())
    )
    profile, meta, decode_s, profile_s = profile_from_payload(reply.header, reply.data)
    assert meta.format == "png" and decode_s >= 0 and profile_s >= 0
    from monitor.imaging import load_bytes

    expected = SpectralProfiler(128, 8).profile_image(load_bytes(png_bytes_small))
    np.testing.assert_array_equal(profile, expected)


@pytest.fixture
def png_bytes_small() -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (160, 200), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
