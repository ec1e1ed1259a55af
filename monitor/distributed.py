"""Profiling on a Dask cluster (``--scheduler``), with a shared Parquet profile cache.

Only this module imports ``dask``/``distributed`` (pyarrow and fsspec come in with
:mod:`monitor.profilestore`), and only the commands given ``--scheduler`` import it, so the
numeric core and ``--help`` stay light.

Each task profiles a small batch of sources (local paths or fsspec URLs, read on the
worker) and returns profiles and metadata, never pixels. Dask re-runs the task of a worker
that dies on another worker, and the client collects results in input order, so a killed
worker loses nothing. Profiles are written to the
:class:`~monitor.profilestore.ParquetProfileStore` keyed by content hash and spec digest,
the profile cache every worker and every later run (local or on Dask) reuses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

from .defaults import DEFAULT_MAX_PIXELS
from .errors import InvalidInputError, MonitorError
from .imaging import load_bytes
from .parallel import ProfiledFile
from .profilestore import ParquetProfileStore, spec_digest
from .spectrum import SpectralProfiler
from .types import ImageMeta

__all__ = ["DaskRunner", "read_source"]

DEFAULT_BATCH = 8
_WINDOW_PER_WORKER = 4


def read_source(source: str) -> bytes:
    """The bytes of a local path or an fsspec URL (``file://``, ``s3://``, ``http://`` ...)."""
    import fsspec

    try:
        with fsspec.open(source, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise InvalidInputError(f"{source}: file not found") from None
    except (OSError, ValueError, ImportError) as exc:
        raise InvalidInputError(f"{source}: cannot read ({exc})") from exc


# Per worker process: one profiler per spec, built on the first task that needs it.
_PROFILERS: dict[str, SpectralProfiler] = {}


def _profiler(spec: dict[str, Any]) -> SpectralProfiler:
    key = spec_digest(spec)
    if key not in _PROFILERS:
        _PROFILERS[key] = SpectralProfiler.from_spec(spec)
    return _PROFILERS[key]


def _profile_batch(
    batch: list[tuple[int, str]], spec_json: str, cache_root: str | None, max_pixels: int
) -> list[ProfiledFile]:
    """Runs on a worker: read, hash, look up, profile what is missing.

    New profiles go back to the client with their digest, which adds them to the cache in
    large writes (few files per cache partition, so lookups stay cheap).
    """
    from threadpoolctl import threadpool_limits

    spec = json.loads(spec_json)
    profiler = _profiler(spec)
    store = ParquetProfileStore.in_cache_dir(cache_root, spec) if cache_root is not None else None
    data: dict[int, bytes] = {}
    digests: dict[int, str] = {}
    out: dict[int, ProfiledFile] = {}
    for i, source in batch:
        try:
            data[i] = read_source(source)
        except MonitorError as exc:
            out[i] = ProfiledFile(i, source, None, None, str(exc))
            continue
        digests[i] = hashlib.sha256(data[i]).hexdigest()
    hits = store.lookup(digests.values()) if store is not None else {}
    with threadpool_limits(limits=1):
        for i, source in batch:
            if i in out:
                continue
            if (hit := hits.get(digests[i])) is not None:
                meta = ImageMeta(**{**hit[1], "source": source})
                out[i] = ProfiledFile(i, source, hit[0], meta, None, cached=True, digest=digests[i])
                continue
            try:
                image = load_bytes(data.pop(i), name=source, max_pixels=max_pixels)
                profile = profiler.profile_image(image)
            except MonitorError as exc:
                out[i] = ProfiledFile(i, source, None, None, str(exc))
                continue
            out[i] = ProfiledFile(i, source, profile, image.meta, digest=digests[i])
    return [out[i] for i, _ in batch]


class DaskRunner:
    """A connection to a Dask cluster that profiles sources; close it when done.

    Parameters
    ----------
    client : distributed.Client
    cluster : distributed.LocalCluster, optional
        Owned by the runner (``--scheduler local``) and closed with it.
    """

    def __init__(self, client: Any, cluster: Any = None) -> None:
        self.client = client
        self.cluster = cluster

    @classmethod
    def connect(cls, scheduler: str, *, n_workers: int = 2, timeout: float = 30.0) -> DaskRunner:
        """``local``: start a LocalCluster of ``n_workers`` single-threaded processes; else an address.

        ``timeout``: seconds to wait for the scheduler's connection."""
        from distributed import Client, LocalCluster

        if scheduler == "local":
            # The in-process scheduler logs every connection at INFO: noise on a CLI's stderr.
            logging.getLogger("distributed").setLevel(logging.WARNING)
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",  # loopback only: a local cluster is nobody else's business
                dashboard_address="127.0.0.1:0",
                silence_logs=logging.ERROR,
            )
            return cls(Client(cluster, timeout=timeout), cluster)
        try:
            return cls(Client(scheduler, timeout=timeout))
        except (OSError, TimeoutError, ValueError) as exc:
            raise InvalidInputError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc

    def n_workers(self) -> int:
        return max(1, len(self.client.scheduler_info(n_workers=-1).get("workers", {})))

    def profile_stream(
        self,
        sources: Iterable[str | os.PathLike],
        spec: dict[str, Any],
        *,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = DEFAULT_BATCH,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> Iterator[ProfiledFile]:
        """Profile sources on the cluster; one :class:`ProfiledFile` per source, in input order.

        Parameters
        ----------
        cache_dir : path or URL, optional
            The cache directory whose :class:`~monitor.profilestore.ParquetProfileStore`
            (``<cache_dir>/profiles.parquet``, the one local runs use too) the workers read and
            write; it must be reachable from every worker. ``None``: no cache.
        """
        root = None if cache_dir is None else os.fspath(cache_dir)
        spec_json = json.dumps(spec)  # a plain string: a dict argument would be read as a task graph
        it = ((i, os.fspath(s)) for i, s in enumerate(sources))

        def submit() -> Any:
            batch = list(islice(it, batch_size))
            # pure=False: a re-run after a worker died must be a new task, never a cached failure.
            return (
                self.client.submit(_profile_batch, batch, spec_json, root, max_pixels, pure=False)
                if batch
                else None
            )

        # The first batches go out now, so the caller can load its model while they run.
        window: deque[Any] = deque()
        for _ in range(self.n_workers() * _WINDOW_PER_WORKER):
            if (future := submit()) is None:
                break
            window.append(future)
        store = None if root is None else ParquetProfileStore.in_cache_dir(root, spec)
        return self._drain(window, submit, store)

    def _drain(
        self, window: deque[Any], submit: Any, store: ParquetProfileStore | None
    ) -> Iterator[ProfiledFile]:
        try:
            while window:
                done = window.popleft()
                if (future := submit()) is not None:
                    window.append(future)
                for item in done.result():
                    if store is not None and not item.cached and item.digest is not None:
                        meta = dataclasses.asdict(item.meta)
                        meta.pop("source", None)
                        store.add(item.digest, item.profile, meta)
                    yield item
        finally:
            if window:
                self.client.cancel(list(window))
            if store is not None:
                store.flush()

    def map(self, function: Callable[[Any], Any], keys: list[Any]) -> Iterator[Any]:
        """``function(key)`` for each key, run on the workers; results in key order.

        What :meth:`monitor.model.ReliabilityModel.fit_streamed` gives as ``map_partitions``:
        each task reads and summarises one partition where it runs, and only its small result
        comes back.
        """
        futures = self.client.map(function, keys, pure=False)
        try:
            for future in futures:
                yield future.result()
        finally:
            self.client.cancel(futures)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> DaskRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
