"""Profile many image files in parallel, with an on-disk cache keyed by content.

The cache key is the sha256 of the file's bytes plus a digest of the profile
specification, so a refit never recomputes a profile and a spec change never
reuses a stale one. Cache entries are ``.npz`` files read with
``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from tqdm import tqdm

from .errors import MonitorError
from .imaging import DEFAULT_MAX_PIXELS, load_bytes
from .spectrum import SpectralProfiler

__all__ = ["BatchResult", "ProfileCache", "default_cache_dir", "profile_files"]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cxr-monitor`` (``~/.cache/cxr-monitor``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cxr-monitor"


class ProfileCache:
    """Profiles and image metadata on disk under ``root/<spec digest>/<sha[:2]>/<sha>.npz``."""

    def __init__(self, root: str | os.PathLike, profiler: SpectralProfiler) -> None:
        spec = json.dumps(profiler.spec(), sort_keys=True).encode()
        self.root = Path(root) / ("profiles-" + hashlib.sha256(spec).hexdigest()[:16])

    def _path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.npz"

    def get(self, digest: str) -> tuple[np.ndarray, dict] | None:
        try:
            with np.load(self._path(digest), allow_pickle=False) as z:
                return z["features"], json.loads(str(z["meta"]))
        except (OSError, KeyError, ValueError):
            return None

    def put(self, digest: str, features: np.ndarray, meta: dict) -> None:
        path = self._path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, features=features, meta=np.array(json.dumps(meta)))
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)  # atomic: parallel writers of one key cannot leave a torn file


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
    path: Path, profiler: SpectralProfiler, cache: ProfileCache | None, max_pixels: int, digest: str | None
) -> tuple[np.ndarray | None, dict | None, str | None, bool]:
    """Profile one file the cache did not hold (the caller looked it up, by ``digest``)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, None, f"{path}: cannot read ({exc.strerror})", False
    if cache is not None and digest is None:
        digest = hashlib.sha256(data).hexdigest()
    try:
        image = load_bytes(data, name=str(path), max_pixels=max_pixels)
        del data
        features = profiler.profile_image(image)
    except MonitorError as exc:
        return None, None, str(exc), False
    meta = image.meta.to_dict()
    meta.pop("source", None)
    if cache is not None and digest is not None:
        cache.put(digest, features, meta)
    return features, meta, None, False


def profile_files(
    paths: Iterable[str | os.PathLike],
    profiler: SpectralProfiler,
    *,
    jobs: int = 1,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> BatchResult:
    """Profile files in parallel (joblib processes); failures are collected, not raised.

    Parameters
    ----------
    jobs : int
        Worker processes; 1 profiles in this process.
    cache_dir : path, optional
        Root of the profile cache; ``None`` disables caching.
    progress : bool
        Show a progress bar on stderr.
    """
    paths = [Path(p) for p in paths]
    cache = ProfileCache(cache_dir, profiler) if cache_dir is not None else None
    results: list[tuple[np.ndarray | None, dict | None, str | None, bool] | None] = [None] * len(paths)
    digests: list[str | None] = [None] * len(paths)
    bar = tqdm(total=len(paths), desc="profiling", unit="img", disable=not progress, leave=False)
    if cache is not None:
        # Answer cache hits here: starting worker processes costs more than reading a profile.
        for i, path in enumerate(paths):
            try:
                digest = digests[i] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                continue  # the worker reports the read error with its reason
            if (hit := cache.get(digest)) is not None:
                results[i] = (hit[0], hit[1], None, True)
                bar.update(1)
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        tasks = (delayed(_profile_one)(paths[i], profiler, cache, max_pixels, digests[i]) for i in todo)
        n_jobs = 1 if len(todo) < 8 else jobs
        runner = Parallel(n_jobs=n_jobs, return_as="generator", batch_size=4 if n_jobs != 1 else 1)
        for i, result in zip(todo, runner(tasks), strict=True):
            results[i] = result
            bar.update(1)
    ok_paths, rows, metas, errors, hits = [], [], [], [], 0
    for path, result in zip(paths, results, strict=True):
        assert result is not None
        features, meta, error, hit = result
        if error is not None:
            errors.append((path, error))
            continue
        ok_paths.append(path)
        rows.append(features)
        metas.append(meta)
        hits += hit
    bar.close()
    n_features = len(profiler.feature_names)
    profiles = np.vstack(rows) if rows else np.empty((0, n_features))
    return BatchResult(ok_paths, profiles, metas, errors, hits)
