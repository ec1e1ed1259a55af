"""Profiling on a Dask cluster (``--scheduler``), with a shared Parquet profile cache.

Only this module imports ``dask``/``distributed``/``pyarrow``/``fsspec``, and only the
commands given ``--scheduler`` import it, so the numeric core and ``--help`` stay light.

Each task profiles a small batch of sources (local paths or fsspec URLs, read on the
worker) and returns profiles and metadata, never pixels. Dask re-runs the task of a worker
that dies on another worker, and the client collects results in input order, so a killed
worker loses nothing. Profiles are written to a :class:`ParquetProfileStore` keyed by
content hash and spec digest, which every worker and a later fit reuse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import numpy as np

from .defaults import DEFAULT_MAX_PIXELS
from .errors import InvalidInputError, MonitorError
from .imaging import load_bytes
from .parallel import ProfiledFile
from .spectrum import SpectralProfiler
from .types import ImageMeta

__all__ = ["DaskRunner", "ParquetProfileStore", "read_source", "spec_digest"]

DEFAULT_BATCH = 8
_WINDOW_PER_WORKER = 4


def spec_digest(spec: dict[str, Any]) -> str:
    """16 hex digits identifying a profile specification (what the features mean)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


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


class ParquetProfileStore:
    """Profiles on disk as a Parquet dataset: ``root/spec=<digest>/part-<uuid>.parquet``.

    Columns: ``sha256`` (of the file's bytes), ``features`` (list of float64), ``meta``
    (JSON of the image metadata). Each writer adds whole files, written under a hidden name
    and renamed, so concurrent workers never see a torn file; ``root`` may be any fsspec URL
    that every worker can reach (a shared filesystem, an object store).
    """

    def __init__(self, root: str | os.PathLike, spec: dict[str, Any]) -> None:
        from fsspec.core import url_to_fs

        self.fs, base = url_to_fs(os.fspath(root))
        self.spec = spec
        self.path = f"{base.rstrip('/')}/spec={spec_digest(spec)}"

    def lookup(self, digests: Iterable[str]) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        """The stored (features, meta) of each digest that is in the store."""
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        wanted = sorted(set(digests))
        if not wanted or not self.fs.exists(self.path):
            return {}
        dataset = ds.dataset(self.path, filesystem=self.fs, format="parquet")
        table = dataset.to_table(filter=pc.field("sha256").isin(wanted))
        out: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
        for sha, feats, meta in zip(
            table.column("sha256").to_pylist(),
            table.column("features").to_pylist(),
            table.column("meta").to_pylist(),
            strict=True,
        ):
            out[sha] = (np.asarray(feats, dtype=np.float64), json.loads(meta))
        return out

    def write(self, rows: list[tuple[str, np.ndarray, dict[str, Any]]]) -> None:
        """Add (sha256, features, meta) rows as one new Parquet file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not rows:
            return
        table = pa.table(
            {
                "sha256": pa.array([r[0] for r in rows], pa.string()),
                "features": pa.array(
                    [np.asarray(r[1], np.float64).tolist() for r in rows], pa.list_(pa.float64())
                ),
                "meta": pa.array([json.dumps(r[2]) for r in rows], pa.string()),
            }
        )
        self.fs.makedirs(self.path, exist_ok=True)
        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp = f"{self.path}/.{name}.tmp"  # dataset discovery skips names starting with "."
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.mv(tmp, f"{self.path}/{name}")

    def read_all(self, columns: list[str] | None = None) -> Any:
        """The whole store as a pyarrow Table (for fits that reuse it)."""
        import pyarrow.dataset as ds

        return ds.dataset(self.path, filesystem=self.fs, format="parquet").to_table(columns=columns)


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
    """Runs on a worker: read, hash, look up, profile what is missing, store it."""
    from threadpoolctl import threadpool_limits

    spec = json.loads(spec_json)
    profiler = _profiler(spec)
    store = ParquetProfileStore(cache_root, spec) if cache_root is not None else None
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
    new_rows = []
    with threadpool_limits(limits=1):
        for i, source in batch:
            if i in out:
                continue
            if (hit := hits.get(digests[i])) is not None:
                meta = ImageMeta(**{**hit[1], "source": source})
                out[i] = ProfiledFile(i, source, hit[0], meta, None, cached=True)
                continue
            try:
                image = load_bytes(data.pop(i), name=source, max_pixels=max_pixels)
                profile = profiler.profile_image(image)
            except MonitorError as exc:
                out[i] = ProfiledFile(i, source, None, None, str(exc))
                continue
            out[i] = ProfiledFile(i, source, profile, image.meta)
            new_rows.append((digests[i], profile, dataclasses.asdict(image.meta)))
    if store is not None:
        store.write(new_rows)
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
        """``local``: start a LocalCluster of ``n_workers`` single-threaded processes; else an address."""
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
            return cls(Client(cluster), cluster)
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
            Root of the :class:`ParquetProfileStore` (``<cache_dir>/profiles.parquet``); it must
            be reachable from every worker. ``None``: no cache.
        """
        root = None if cache_dir is None else f"{os.fspath(cache_dir).rstrip('/')}/profiles.parquet"
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
        return self._drain(window, submit)

    def _drain(self, window: deque[Any], submit: Any) -> Iterator[ProfiledFile]:
        try:
            while window:
                done = window.popleft()
                if (future := submit()) is not None:
                    window.append(future)
                yield from done.result()
        finally:
            if window:
                self.client.cancel(list(window))

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> DaskRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
