"""Profile many image files in parallel, with the on-disk profile cache keyed by content.

The cache is the Parquet dataset of :class:`monitor.profilestore.ParquetProfileStore`
under ``cache_dir`` (``<cache_dir>/profiles.parquet``), the same one Dask workers read and
write: its key is the sha256 of the file's bytes plus a digest of the profile
specification, so a refit never recomputes a profile, a spec change never reuses a stale
one, and a local run reuses what a Dask run wrote and the other way round. (The ``.npz``
files of earlier versions, ``<cache_dir>/profiles-<digest>/``, are no longer read.)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from tqdm import tqdm

from .errors import MonitorError
from .imaging import DEFAULT_MAX_PIXELS, load_bytes
from .parallel import ProfiledFile
from .spectrum import SpectralProfiler
from .types import ImageMeta

__all__ = ["BatchResult", "default_cache_dir", "iter_profiled_files", "profile_files"]

# Files looked up and profiled together: bounds memory however many files there are.
_CHUNK = 1024


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cxr-monitor`` (``~/.cache/cxr-monitor``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cxr-monitor"


@dataclass
class BatchResult:
    """What :func:`profile_files` made of a list of files.

    profiles : ndarray of shape (n_ok, n_features) for ``paths`` (in input order)
    metas : image metadata dicts, one per profiled file
    errors : (path, reason) for each file that could not be profiled
    cache_hits : how many profiles came from the cache
    """

    paths: list[Path]
    profiles: np.ndarray
    metas: list[dict]
    errors: list[tuple[Path, str]]
    cache_hits: int


def _profile_one(
    path: Path, profiler: SpectralProfiler, max_pixels: int
) -> tuple[np.ndarray | None, ImageMeta | None, str | None]:
    """Profile one file the cache did not hold: (features, meta, None) or (None, None, reason)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, None, f"{path}: cannot read ({exc.strerror})"
    try:
        image = load_bytes(data, name=str(path), max_pixels=max_pixels)
        del data
        return profiler.profile_image(image), image.meta, None
    except MonitorError as exc:
        return None, None, str(exc)


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None  # the profiling step reports the read error with its reason


def iter_profiled_files(
    paths: Iterable[str | os.PathLike],
    profiler: SpectralProfiler,
    *,
    jobs: int = 1,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[ProfiledFile]:
    """Profile files in parallel (joblib processes), streamed back in input order.

    Files go in chunks of 1024: the cache answers what it holds (hashing happens here,
    starting a worker costs more than reading a profile), the workers profile the rest, and
    new profiles are added to the cache. Memory is bounded by a chunk, not the number of files.

    Parameters
    ----------
    paths : iterable of paths
    jobs : int
        Worker processes; 1 profiles in this process.
    cache_dir : path, optional
        Cache directory (see the module docstring); ``None`` disables caching.
    progress : bool
        Show a progress bar on stderr.

    Yields
    ------
    ProfiledFile
        One per path; ``source`` is ``str(path)``, failures carry their ``error``.
    """
    store: Any = None
    if cache_dir is not None:
        # pyarrow is loaded only by runs that cache: the core imports stay light.
        from .profilestore import ParquetProfileStore

        store = ParquetProfileStore.in_cache_dir(cache_dir, profiler.spec())
    total = len(paths) if isinstance(paths, Sized) else None
    it = enumerate(Path(p) for p in paths)
    bar = tqdm(total=total, desc="profiling", unit="img", disable=not progress, leave=False)
    try:
        while chunk := list(islice(it, _CHUNK)):
            yield from _chunk(chunk, profiler, store, jobs, max_pixels, bar)
    finally:
        bar.close()
        if store is not None:
            store.flush()


def _chunk(
    chunk: list[tuple[int, Path]],
    profiler: SpectralProfiler,
    store: Any,
    jobs: int,
    max_pixels: int,
    bar: Any,
) -> Iterator[ProfiledFile]:
    digests = [_digest(path) if store is not None else None for _, path in chunk]
    hits = store.lookup(d for d in digests if d is not None) if store is not None else {}
    todo = [j for j, d in enumerate(digests) if d is None or d not in hits]
    if len(todo) < 8 or jobs == 1:
        made = (_profile_one(chunk[j][1], profiler, max_pixels) for j in todo)
    else:
        # joblib keeps its worker processes between chunks (a reusable executor).
        made = Parallel(n_jobs=jobs, return_as="generator", batch_size=4)(
            delayed(_profile_one)(chunk[j][1], profiler, max_pixels) for j in todo
        )
    fresh = dict(zip(todo, made, strict=True)) if todo else {}
    for j, (index, path) in enumerate(chunk):
        bar.update(1)
        source = str(path)
        if j not in fresh:
            features, meta = hits[digests[j]]  # type: ignore[index]
            yield ProfiledFile(index, source, features, ImageMeta(**{**meta, "source": source}), cached=True)
            continue
        features, image_meta, error = fresh[j]
        if error is not None:
            yield ProfiledFile(index, source, None, None, error)
            continue
        if store is not None and digests[j] is not None:
            meta = image_meta.to_dict()  # type: ignore[union-attr]
            meta.pop("source", None)
            store.add(digests[j], features, meta)
        yield ProfiledFile(index, source, features, image_meta)


def profile_files(
    paths: Iterable[str | os.PathLike],
    profiler: SpectralProfiler,
    *,
    jobs: int = 1,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> BatchResult:
    """Profile files in parallel and collect them; failures are collected, not raised.

    As :func:`iter_profiled_files` (same parameters), gathered into one
    :class:`BatchResult`; for a number of files that does not fit in memory, iterate instead.
    """
    paths = [Path(p) for p in paths]
    ok_paths, rows, metas, errors, hits = [], [], [], [], 0
    for item in iter_profiled_files(
        paths, profiler, jobs=jobs, cache_dir=cache_dir, progress=progress, max_pixels=max_pixels
    ):
        path = paths[item.index]
        if item.error is not None:
            errors.append((path, item.error))
            continue
        ok_paths.append(path)
        rows.append(item.profile)
        meta = item.meta.to_dict()  # type: ignore[union-attr]
        meta.pop("source", None)
        metas.append(meta)
        hits += item.cached
    n_features = len(profiler.feature_names)
    profiles = np.vstack(rows) if rows else np.empty((0, n_features))
    return BatchResult(ok_paths, profiles, metas, errors, hits)
