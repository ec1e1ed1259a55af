"""Tests for monitor.server.admission: count, deadline and memory limits, shed at once."""

from __future__ import annotations

import threading
import time

import pytest

from monitor.errors import DeadlineExceededError
from monitor.server.admission import AdmissionControl, OverloadedError

MiB = 2**20


def _learn(control: AdmissionControl, seconds: float, n: int = 5) -> None:
    """Feed ``n`` service times of about ``seconds`` each."""
    for _ in range(n):
        p = control.admit(0, 0, None, "warm")
        p.start()
        p._started -= seconds  # noqa: SLF001  (as if the image had taken `seconds`)
        p.served()
        p.done()


def test_count_limit_sheds_and_frees() -> None:
    control = AdmissionControl(max_in_flight=2, workers=1, memory_budget=0)
    a, b = control.admit(0, 0, None, "a"), control.admit(0, 0, None, "b")
    with pytest.raises(
        OverloadedError, match=r"c: server overloaded: 2 images in flight \(limit max_concurrent_rpcs=2\)"
    ) as info:
        control.admit(0, 0, None, "c")
    assert info.value.reason == "in_flight" and info.value.code == "resource_exhausted"
    a.done()
    a.done()  # idempotent
    control.admit(0, 0, None, "c").done()
    b.done()
    assert control.in_flight == 0


def test_deadline_shorter_than_the_work_ahead_is_shed() -> None:
    control = AdmissionControl(max_in_flight=100, workers=2, memory_budget=0)
    assert control.estimated_seconds() is None  # no estimate until enough service times were seen
    control.admit(0, 0, 0.001, "before-any-estimate").done()  # let in: nothing to judge by
    _learn(control, 0.1)
    assert control.estimated_seconds(ahead=0) == pytest.approx(0.1, rel=0.05)
    held = [control.admit(0, 0, None, f"h{i}") for i in range(6)]  # 6 ahead on 2 workers: 4 rounds
    assert control.estimated_seconds() == pytest.approx(0.4, rel=0.05)
    with pytest.raises(
        OverloadedError, match=r"late: cannot be served before its deadline \(0.3 s left; about 0.4"
    ) as info:
        control.admit(0, 0, 0.3, "late")
    assert info.value.reason == "deadline"
    with pytest.raises(OverloadedError, match="late-pre: cannot be served"):
        control.precheck(0.3, "late-pre")  # the same verdict before the header is read
    assert control.in_flight == 6  # neither reserved a place
    control.admit(0, 0, 0.5, "in-time").done()
    with pytest.raises(
        DeadlineExceededError, match=r"too-short: the deadline \(0.05 s left\) is shorter than"
    ):
        control.admit(0, 0, 0.05, "too-short")  # not an overload: no retry would help
    control.admit(0, 0, None, "no-deadline").done()  # a call without a deadline waits its turn
    for p in held:
        p.done()


def test_errors_and_dropped_work_do_not_shorten_the_estimate() -> None:
    control = AdmissionControl(max_in_flight=10, workers=1, memory_budget=0)
    _learn(control, 0.2)
    for _ in range(20):
        p = control.admit(0, 0, None, "fails")
        p.start()
        p.done()  # never served()
    assert control.estimated_seconds(ahead=0) == pytest.approx(0.2, rel=0.05)


def test_memory_budget_refuses_what_does_not_fit() -> None:
    control = AdmissionControl(max_in_flight=100, workers=4, memory_budget=100 * MiB)
    with pytest.raises(
        OverloadedError, match=r"huge: the image needs about 120 MiB .* whole memory budget \(100 MiB"
    ) as info:
        control.admit(20 * MiB, 100 * MiB, None, "huge")
    assert info.value.reason == "memory"
    a = control.admit(30 * MiB, 40 * MiB, None, "a")  # holds 30 MiB until done
    b = control.admit(30 * MiB, 30 * MiB, None, "b")
    assert control.bytes_in_flight == 60 * MiB
    with pytest.raises(OverloadedError, match=r"c: server memory budget in use \(60 of 100 MiB by 2 images"):
        control.admit(10 * MiB, 40 * MiB, None, "c")
    a.done()
    b.done()
    assert control.bytes_in_flight == 0


def test_a_decode_waits_for_memory_held_by_running_decodes() -> None:
    control = AdmissionControl(max_in_flight=100, workers=4, memory_budget=100 * MiB)
    a = control.admit(0, 60 * MiB, None, "a")
    b = control.admit(0, 60 * MiB, None, "b")  # admitted: only encoded bytes are held while queued
    assert a.start()
    assert not b.start(deadline=time.monotonic() + 0.05)  # 60 + 60 > 100: waits, then gives up
    started = threading.Event()
    t = threading.Thread(target=lambda: b.start() and started.set())
    t.start()
    assert not started.wait(0.1)
    a.done()  # frees 60 MiB: b may decode now
    t.join(10)
    assert started.is_set() and control.bytes_in_flight == 60 * MiB
    b.done()
    assert control.bytes_in_flight == 0 and control.in_flight == 0


def test_the_trimmer_trims_after_large_requests() -> None:
    from monitor.server.memory import MemoryTrimmer

    trimmer = MemoryTrimmer(threshold=100, delay=0.01, min_interval=0.05)
    try:
        if trimmer._thread is None:  # noqa: SLF001
            pytest.skip("not glibc: malloc_trim is not available, the trimmer does nothing")
        trimmer.note(60)
        time.sleep(0.2)
        assert trimmer.trims == 0  # under the threshold
        trimmer.note(60)
        end = time.monotonic() + 10
        while trimmer.trims == 0:
            assert time.monotonic() < end, "no trim after the threshold was crossed"
            time.sleep(0.01)
    finally:
        trimmer.close()
