"""Profiles on disk as Parquet: the profile cache every run shares, and one fit's streamed fit set.

:class:`ParquetProfileStore` is THE profile cache: local ``fit`` and every Dask worker read and
write the same dataset, keyed by the sha256 of an image file's bytes and a digest of the
profile specification. :class:`ParquetFitSet` holds one fit's profiles and outcomes in row
order, partition by partition, so a fit of more profiles than fit in memory reads them one
partition at a time (:meth:`monitor.model.ReliabilityModel.fit_streamed`).

Only commands that cache or stream import this module (it loads pyarrow and fsspec); the
numeric core reaches it through a lazy import or takes its objects as arguments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .fitset import FitPartition

__all__ = ["PREFIX_CHARS", "ParquetFitSet", "ParquetProfileStore", "spec_digest"]

PREFIX_CHARS = 2
"""Hex characters of the sha256 that name a store partition (``prefix=ab``): 256 partitions."""

_log = logging.getLogger(__name__)


def spec_digest(spec: dict[str, Any]) -> str:
    """16 hex digits identifying a profile specification (what the features mean)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _write_atomic(fs: fsspec.AbstractFileSystem, table: pa.Table, folder: str, name: str) -> None:
    """Write under a hidden name and rename: readers never see a torn file."""
    fs.makedirs(folder, exist_ok=True)
    tmp = f"{folder}/.{name}.tmp"  # listings below skip names starting with "."
    pq.write_table(table, tmp, filesystem=fs)
    fs.mv(tmp, f"{folder}/{name}")


def _parts(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """The finished part files of a folder (no hidden temporaries), sorted; [] when absent."""
    try:
        names = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(".parquet") and not n.rsplit("/", 1)[-1].startswith("."))


class ParquetProfileStore:
    """The profile cache: ``root/spec=<digest>/prefix=<sha[:2]>/part-<uuid>.parquet``.

    Columns: ``sha256`` (of the file's bytes), ``features`` (list of float64), ``meta``
    (JSON of the image metadata, without its source). Rows are partitioned (hive style) by
    the first :data:`PREFIX_CHARS` hex characters of their sha256, so a lookup reads only
    the partitions of the digests it asks for. Each write adds whole files under unique
    names, written hidden and renamed, so concurrent writers (Dask workers, local fits)
    never collide and readers never see a torn file; :meth:`compact` merges a partition's
    small files. ``root`` may be any fsspec URL every worker can reach.

    Parameters
    ----------
    root : path or URL
        The dataset's root (see :meth:`in_cache_dir` for the conventional one).
    spec : dict
        ``SpectralProfiler.spec()`` of the profiles: another spec never reads these rows.
    """

    def __init__(self, root: str | os.PathLike, spec: dict[str, Any]) -> None:
        self.fs, base = url_to_fs(os.fspath(root))
        self.spec = spec
        self.path = f"{base.rstrip('/')}/spec={spec_digest(spec)}"
        self.files_read = 0  # part files opened by lookups (for tests and the benchmark)
        self.buffer_rows = 8192
        self.compact_at = 8
        self._buffer: list[tuple[str, np.ndarray, dict[str, Any]]] = []

    @classmethod
    def in_cache_dir(cls, cache_dir: str | os.PathLike, spec: dict[str, Any]) -> ParquetProfileStore:
        """The store of a cache directory: ``<cache_dir>/profiles.parquet``."""
        return cls(f"{os.fspath(cache_dir).rstrip('/')}/profiles.parquet", spec)

    def _partition(self, prefix: str) -> str:
        return f"{self.path}/prefix={prefix}"

    def lookup(self, digests: Iterable[str]) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        """The stored (features, meta) of each digest that is in the store.

        Reads only the partitions of the asked digests; an unreadable part file (truncated
        by a crash of a foreign tool, say) is skipped with a warning, so its rows are
        recomputed.
        """
        wanted = sorted(set(digests))
        files = [
            part
            for prefix in sorted({d[:PREFIX_CHARS] for d in wanted})
            for part in _parts(self.fs, self._partition(prefix))
        ]
        self.files_read += len(files)
        if not files:
            return {}
        row_filter = pc.field("sha256").isin(wanted)
        try:
            # One scan of every file concerned: pyarrow reads them concurrently.
            tables = [ds.dataset(files, filesystem=self.fs, format="parquet").to_table(filter=row_filter)]
        except (pa.ArrowException, OSError):
            tables = self._read_each(files, row_filter)  # find and skip the bad file
        out: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
        for table in tables:
            for sha, feats, meta in zip(
                table.column("sha256").to_pylist(),
                table.column("features").to_pylist(),
                table.column("meta").to_pylist(),
                strict=True,
            ):
                out[sha] = (np.asarray(feats, dtype=np.float64), json.loads(meta))
        return out

    def _read_each(self, files: list[str], row_filter: Any) -> list[pa.Table]:
        tables = []
        for part in files:
            try:
                tables.append(pq.read_table(part, filesystem=self.fs, filters=row_filter))
            except FileNotFoundError:
                continue  # compacted away since the listing: its rows are in the merged file
            except (pa.ArrowException, OSError) as exc:
                _log.warning("profile cache: skipping unreadable %s (%s)", part, exc)
        return tables

    def write(self, rows: list[tuple[str, np.ndarray, dict[str, Any]]]) -> None:
        """Add (sha256, features, meta) rows now: one new file per partition they fall in, and
        any partition that reaches :attr:`compact_at` files is compacted."""
        by_prefix: dict[str, list[tuple[str, np.ndarray, dict[str, Any]]]] = defaultdict(list)
        for row in rows:
            by_prefix[row[0][:PREFIX_CHARS]].append(row)
        for prefix, group in sorted(by_prefix.items()):
            table = pa.table(
                {
                    "sha256": pa.array([r[0] for r in group], pa.string()),
                    "features": pa.array(
                        [np.asarray(r[1], np.float64).tolist() for r in group], pa.list_(pa.float64())
                    ),
                    "meta": pa.array([json.dumps(r[2]) for r in group], pa.string()),
                }
            )
            folder = self._partition(prefix)
            _write_atomic(self.fs, table, folder, f"part-{uuid.uuid4().hex}.parquet")
            self._compact_folder(folder, self.compact_at)

    def add(self, digest: str, features: np.ndarray, meta: dict[str, Any]) -> None:
        """Buffer a row; written with the others every :attr:`buffer_rows` rows and by :meth:`flush`.

        Buffering makes part files of many rows, so partitions hold few files and lookups
        stay cheap; a crash loses only the buffered rows, which are recomputed next time.
        """
        self._buffer.append((digest, features, meta))
        if len(self._buffer) >= self.buffer_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows."""
        rows, self._buffer = self._buffer, []
        if rows:
            self.write(rows)

    def part_files(self) -> list[str]:
        """Every finished part file of the store."""
        try:
            folders = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        return [p for folder in sorted(folders) if "/prefix=" in folder for p in _parts(self.fs, folder)]

    def compact(self, min_files: int = 2) -> int:
        """Merge each partition holding at least ``min_files`` part files into one.

        Safe beside readers and writers: the merged file is written (atomically) before the
        files it replaces are removed, rows are immutable (keyed by content; duplicates are
        dropped), and files written meanwhile are not touched.

        Returns
        -------
        int
            How many fewer part files the store has.
        """
        try:
            folders = sorted(f for f in self.fs.ls(self.path, detail=False) if "/prefix=" in f)
        except FileNotFoundError:
            return 0
        return sum(self._compact_folder(folder, min_files) for folder in folders)

    def _compact_folder(self, folder: str, min_files: int) -> int:
        parts = _parts(self.fs, folder)
        if len(parts) < max(2, min_files):
            return 0
        tables, merged_parts = [], []
        for part in parts:
            try:
                tables.append(pq.read_table(part, filesystem=self.fs))
                merged_parts.append(part)
            except (pa.ArrowException, OSError):
                continue  # left in place; lookups skip it
        if len(tables) < 2:
            return 0
        merged = pa.concat_tables(tables)
        _, first = np.unique(merged.column("sha256").to_numpy(zero_copy_only=False), return_index=True)
        merged = merged.take(pa.array(np.sort(first)))
        _write_atomic(self.fs, merged, folder, f"part-{uuid.uuid4().hex}.parquet")
        for part in merged_parts:
            try:
                self.fs.rm(part)
            except FileNotFoundError:
                pass  # another process compacted it first: its rows are in both merged files
        return len(merged_parts) - 1

    def read_all(self, columns: list[str] | None = None) -> pa.Table:
        """The whole store as one table (for inspection and tests; a fit streams instead)."""
        files = self.part_files()
        if not files:
            return pa.table({"sha256": pa.array([], pa.string())})
        return pa.concat_tables([pq.read_table(f, filesystem=self.fs, columns=columns) for f in files])


class ParquetFitSet:
    """One fit's profiles and outcomes in row order: ``root/part-<00000>.parquet``, one per partition.

    Columns: ``features`` (fixed-size list of float64), ``failure`` (int8), ``label`` and
    ``score`` (null when the outcomes give only failures), ``record`` (JSON of the image's
    name and metadata). Implements the :class:`monitor.fitset.FitSet` protocol: a reader
    never holds more than one partition (plus the rows it was asked to keep).

    Write one with :meth:`writer`; open an existing one with ``ParquetFitSet(root)``.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.fspath(root)
        self.fs, self.path = url_to_fs(self.root)
        self.files = _parts(self.fs, self.path)
        sizes = [pq.ParquetFile(f, filesystem=self.fs).metadata.num_rows for f in self.files]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.rows_read = 0  # rows materialised by read/take (for tests: what a fit held)

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    def partitions(self) -> list[int]:
        return list(range(len(self.files)))

    @staticmethod
    def writer(root: str | os.PathLike, n_features: int, partition_rows: int = 65_536) -> FitSetWriter:
        """A writer that appends rows and flushes a partition every ``partition_rows``."""
        return FitSetWriter(root, n_features, partition_rows)

    def _table(self, key: int, rows: np.ndarray | None = None) -> FitPartition:
        table = pq.read_table(self.files[key], filesystem=self.fs)
        start = int(self.offsets[key])
        index = np.arange(start, start + table.num_rows, dtype=np.int64)
        if rows is not None:
            table = table.take(pa.array(rows - start))
            index = rows
        self.rows_read += table.num_rows
        flat = table.column("features").combine_chunks()
        width = flat.type.list_size
        X = flat.flatten().to_numpy().reshape(-1, width) if table.num_rows else np.empty((0, width))
        labels = table.column("label")
        return FitPartition(
            rows=index,
            profiles=X,
            failures=table.column("failure").to_numpy().astype(np.int64),
            labels=None if labels.null_count else labels.to_numpy().astype(np.int64),
            scores=None if table.column("score").null_count else table.column("score").to_numpy(),
            records=[json.loads(r) for r in table.column("record").to_pylist()],
        )

    def read(self, key: int) -> FitPartition:
        """Every row of partition ``key``."""
        return self._table(key)

    def take(self, rows: np.ndarray) -> FitPartition:
        """The given (sorted, global) rows, read one partition at a time."""
        rows = np.asarray(rows, dtype=np.int64)
        pieces = []
        for key in self.partitions():
            lo, hi = np.searchsorted(rows, self.offsets[key : key + 2])
            if hi > lo:
                pieces.append(self._table(key, rows[lo:hi]))
        return FitPartition.concat(pieces)

    @staticmethod
    def remove_root(root: str | os.PathLike) -> None:
        """Delete a fit set, finished or not (it is a temporary of one fit)."""
        fs, path = url_to_fs(os.fspath(root))
        if fs.exists(path):
            fs.rm(path, recursive=True)


class FitSetWriter:
    """Appends one fit's rows to a :class:`ParquetFitSet`, one partition file at a time."""

    def __init__(self, root: str | os.PathLike, n_features: int, partition_rows: int) -> None:
        self.root = os.fspath(root)
        self.fs, self.path = url_to_fs(self.root)
        self.n_features = n_features
        self.partition_rows = partition_rows
        self._rows: list[tuple[np.ndarray, int, int | None, float | None, str]] = []
        self._n_parts = 0

    def append(
        self,
        profile: np.ndarray,
        failure: int,
        record: dict[str, Any],
        label: int | None = None,
        score: float | None = None,
    ) -> None:
        self._rows.append((profile, failure, label, score, json.dumps(record)))
        if len(self._rows) >= self.partition_rows:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        X = np.asarray([r[0] for r in self._rows], dtype=np.float64).reshape(-1, self.n_features)
        table = pa.table(
            {
                "features": pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), self.n_features),
                "failure": pa.array([r[1] for r in self._rows], pa.int8()),
                "label": pa.array([r[2] for r in self._rows], pa.int8()),
                "score": pa.array([r[3] for r in self._rows], pa.float64()),
                "record": pa.array([r[4] for r in self._rows], pa.string()),
            }
        )
        _write_atomic(self.fs, table, self.path, f"part-{self._n_parts:05d}.parquet")
        self._n_parts += 1
        self._rows = []

    def close(self) -> ParquetFitSet:
        """Flush and open the finished set for reading."""
        self.flush()
        self.fs.makedirs(self.path, exist_ok=True)
        return ParquetFitSet(self.root)
