"""Profile many image files on every local core, streamed back in input order.

:func:`profile_stream` is what ``cxr-monitor profile|score|drift`` run on files and
folders: worker processes each hold one :class:`~monitor.spectrum.SpectralProfiler`
(built from the model's spec) and return small results (a profile and the image
metadata), never pixels; the caller scores them with its model. At most a bounded
window of chunks is in flight, and sources are read lazily from the iterable, so
memory stays flat however many files there are.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from .allocator import reuse_freed_memory
from .defaults import DEFAULT_MAX_PIXELS
from .errors import MonitorError
from .imaging import load_image
from .spectrum import SpectralProfiler
from .types import ImageMeta

__all__ = ["ProfiledFile", "profile_stream"]

# Images per task: large enough that inter-process overhead (~0.2 ms a task) is noise
# next to a ~15 ms profile, small enough that results come back smoothly and in order.
DEFAULT_CHUNK = 4
# Chunks in flight per worker: enough that the workers keep going while the caller is busy
# for a few seconds (importing scikit-learn to load its model), small enough to bound memory.
_WINDOW_PER_WORKER = 16


@dataclass(frozen=True)
class ProfiledFile:
    """The profile of one source, or why there is none.

    index : position of the source in the input
    source : the path or URL as given
    profile : ndarray of shape (n_features,), or None on error
    meta : image metadata, or None on error
    error : the reason the image could not be profiled (names the file), or None
    cached : the profile came from a profile cache
    digest : sha256 of the file's bytes, when the runner hashed it (to cache the profile)
    """

    index: int
    source: str
    profile: np.ndarray | None
    meta: ImageMeta | None
    error: str | None = None
    cached: bool = False
    digest: str | None = None


# One profiler per worker process, built once by the pool initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(spec: dict[str, Any], max_pixels: int) -> None:
    from threadpoolctl import threadpool_limits

    # Parallelism comes from processes: BLAS threads inside each would contend for the same cores.
    threadpool_limits(limits=1)
    reuse_freed_memory()
    _WORKER["profiler"] = SpectralProfiler.from_spec(spec)
    _WORKER["max_pixels"] = max_pixels


def _profile_one(index: int, source: str, profiler: SpectralProfiler, max_pixels: int) -> ProfiledFile:
    try:
        image = load_image(Path(source), max_pixels=max_pixels)
        profile = profiler.profile_image(image)
    except MonitorError as exc:
        return ProfiledFile(index, source, None, None, str(exc))
    return ProfiledFile(index, source, profile, image.meta)


def _profile_chunk(chunk: list[tuple[int, str]]) -> list[ProfiledFile]:
    profiler, max_pixels = _WORKER["profiler"], _WORKER["max_pixels"]
    return [_profile_one(i, s, profiler, max_pixels) for i, s in chunk]


def _chunks(sources: Iterable[str | os.PathLike], size: int) -> Iterator[list[tuple[int, str]]]:
    it = ((i, str(s)) for i, s in enumerate(sources))
    while chunk := list(islice(it, size)):
        yield chunk


def profile_stream(
    sources: Iterable[str | os.PathLike],
    spec: dict[str, Any],
    *,
    jobs: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    chunk_size: int = DEFAULT_CHUNK,
    window: int | None = None,
) -> Iterator[ProfiledFile]:
    """Profile image files with ``jobs`` processes; results come in input order.

    With ``jobs > 1`` the worker processes start and the first ``window`` chunks are handed
    out before this returns, so the caller can load its model while they work.

    Parameters
    ----------
    sources : iterable of paths
        Read lazily: a generator over millions of files is fine.
    spec : dict
        ``SpectralProfiler.spec()`` of the model the profiles are for.
    jobs : int
        Worker processes; 1 profiles in this process (no start-up cost).
    chunk_size : int
        Images per task sent to a worker.
    window : int, optional
        Chunks in flight at most (default: 16 per worker); results are a profile and metadata
        each, so this bounds memory, not the number of sources.

    Yields
    ------
    ProfiledFile
        One per source, in input order; unreadable images carry their ``error``.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs == 1:
        return _serial(sources, spec, max_pixels)
    # forkserver: children start from a small clean process (no threads, no scikit-learn
    # imported by the parent).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["monitor.parallel"])
    pool = ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_init_worker, initargs=(spec, max_pixels)
    )
    chunks = _chunks(sources, chunk_size)
    pending: deque[Future[list[ProfiledFile]]] = deque()
    limit = window or jobs * _WINDOW_PER_WORKER
    for chunk in islice(chunks, limit):
        pending.append(pool.submit(_profile_chunk, chunk))
    return _drain(pool, chunks, pending)


def _serial(
    sources: Iterable[str | os.PathLike], spec: dict[str, Any], max_pixels: int
) -> Iterator[ProfiledFile]:
    reuse_freed_memory()
    profiler = SpectralProfiler.from_spec(spec)
    for i, s in enumerate(sources):
        yield _profile_one(i, str(s), profiler, max_pixels)


def _drain(
    pool: ProcessPoolExecutor,
    chunks: Iterator[list[tuple[int, str]]],
    pending: deque[Future[list[ProfiledFile]]],
) -> Iterator[ProfiledFile]:
    try:
        while pending:
            done = pending.popleft()
            if (chunk := next(chunks, None)) is not None:
                pending.append(pool.submit(_profile_chunk, chunk))
            yield from done.result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
