"""The offline fit from files: outcomes table + image folder → saved model.

The outcomes CSV has a column ``image`` (a path relative to the image folder) and
either ``failure`` (0/1) or ``label`` (0/1) and ``score`` (classifier probability,
positive when ``score >= threshold``). Every other column is kept as metadata.
"""

from __future__ import annotations

import csv
import os
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import save_model
from .batch import iter_profiled_files
from .clustering import SpectralClusterer
from .defaults import DEFAULT_MAX_FIT_PROFILES
from .errors import InvalidInputError
from .model import ReliabilityModel
from .spectrum import DEFAULT_WORKING_SIZE, SpectralProfiler

__all__ = ["FitReport", "Outcomes", "fit_folder", "read_outcomes"]


@dataclass
class Outcomes:
    """The parsed outcomes table (one entry per row, in file order)."""

    images: list[str]
    failures: np.ndarray
    labels: np.ndarray | None
    scores: np.ndarray | None
    threshold: float | None
    metadata: list[dict[str, str]]


def _parse_01(value: str, column: str, row: int, path: Path) -> int:
    v = value.strip().lower()
    if v in ("1", "1.0", "true"):
        return 1
    if v in ("0", "0.0", "false"):
        return 0
    raise InvalidInputError(f"{path}: row {row}: column {column!r} must be 0 or 1, got {value!r}")


def read_outcomes(path: str | os.PathLike, threshold: float | None = None) -> Outcomes:
    """Read and validate an outcomes CSV (see the module docstring)."""
    path = Path(path)
    try:
        # utf-8-sig: spreadsheet programs write a byte-order mark before the header.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            rows = list(reader)
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read the outcomes table ({exc.strerror})") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: not a readable CSV ({exc})") from exc
    if "image" not in columns:
        raise InvalidInputError(f"{path}: no 'image' column (columns: {', '.join(columns) or 'none'})")
    has_failure = "failure" in columns
    has_label_score = "label" in columns and "score" in columns
    if not has_failure and not has_label_score:
        raise InvalidInputError(f"{path}: needs a 'failure' column, or 'label' and 'score' columns")
    if not rows:
        raise InvalidInputError(f"{path}: the outcomes table has no rows")
    for i, r in enumerate(rows, start=2):
        missing = [c for c in columns if r.get(c) is None]
        if missing:
            raise InvalidInputError(
                f"{path}: row {i}: {len(columns) - len(missing)} fields for {len(columns)} columns "
                f"(no value for {', '.join(repr(c) for c in missing)})"
            )
    images, seen = [], set()
    for i, r in enumerate(rows, start=2):
        name = (r.get("image") or "").strip()
        if not name:
            raise InvalidInputError(f"{path}: row {i}: empty 'image'")
        if name in seen:
            raise InvalidInputError(f"{path}: row {i}: image {name!r} is listed twice")
        seen.add(name)
        images.append(name)
    labels = scores = None
    if has_label_score:
        labels = np.array([_parse_01(r["label"], "label", i, path) for i, r in enumerate(rows, start=2)])
        try:
            scores = np.array([float(r["score"]) for r in rows])
        except ValueError as exc:
            raise InvalidInputError(f"{path}: column 'score' must be numeric ({exc})") from exc
        if not np.all((scores >= 0) & (scores <= 1)):
            raise InvalidInputError(f"{path}: column 'score' must hold probabilities in [0, 1]")
        threshold = 0.5 if threshold is None else threshold
    if has_failure:
        failures = np.array(
            [_parse_01(r["failure"], "failure", i, path) for i, r in enumerate(rows, start=2)]
        )
    else:
        failures = ((scores >= threshold).astype(int) != labels).astype(int)
    reserved = {"image", "failure", "label", "score"}
    metadata = [{k: v for k, v in r.items() if k not in reserved and k is not None} for r in rows]
    return Outcomes(images, failures, labels, scores, threshold if has_label_score else None, metadata)


@dataclass
class FitReport:
    """What :func:`fit_folder` did."""

    model: ReliabilityModel
    out: Path
    n_listed: int
    n_fitted: int
    errors: list[tuple[str, str]] = field(default_factory=list)
    cache_hits: int = 0
    seconds: float = 0.0


def fit_folder(
    images: str | os.PathLike,
    outcomes: str | os.PathLike,
    out: str | os.PathLike,
    *,
    threshold: float | None = None,
    n_clusters: str | int = "auto",
    k_max: int = 10,
    min_cluster_size: float = 0.03,
    seed: int = 0,
    jobs: int = 1,
    cache_dir: str | os.PathLike | None = None,
    strict: bool = False,
    progress: bool = False,
    card: dict[str, Any] | None = None,
    working_size: int | None = None,
    scope_overrides: Mapping[str, str] | None = None,
    runner: Any = None,
    max_fit_profiles: int | None = DEFAULT_MAX_FIT_PROFILES,
) -> FitReport:
    """Profile the listed images, fit a :class:`ReliabilityModel` and save it to ``out``.

    The profiles stream, as they arrive, into a Parquet fit set
    (:class:`monitor.profilestore.ParquetFitSet`) that
    :meth:`ReliabilityModel.fit_streamed` reads partition by partition, so memory is bounded
    by ``max_fit_profiles`` rather than the number of images (the outcomes table itself is
    read whole). The model's scope (header allow-lists) is learned from the fitted images'
    headers (:meth:`ScopeRules.learn`); ``scope_overrides`` replaces lists by field
    (``modalities``, ``body_parts``, ``view_positions``), each as text such as ``"CR,DX"`` or ``"*"``.

    Parameters
    ----------
    images : path or URL
        Folder of the images; an fsspec URL (``s3://bucket/refset``) with a ``runner``.
    cache_dir : path or URL, optional
        The profile cache directory (:class:`monitor.profilestore.ParquetProfileStore`),
        shared by local and ``runner`` fits; ``None``: no cache.
    runner : object, optional
        Profiles on other machines instead of local processes: anything with
        ``profile_stream(sources, spec, cache_dir=...)`` yielding
        :class:`~monitor.parallel.ProfiledFile` in input order and ``map(function, keys)``,
        such as :class:`monitor.distributed.DaskRunner`. Images are then named by
        ``images + "/" + image``. With a ``cache_dir`` (which its workers must reach), the fit
        set is written under ``<cache_dir>/fits/`` and its partitions assigned on the workers.
    max_fit_profiles : int, optional
        Cluster a seeded sample of this many profiles when there are more, then assign all
        (see :meth:`ReliabilityModel.fit_streamed`); ``None``: always cluster every profile.

    Raises
    ------
    InvalidInputError
        Bad outcomes table; with ``strict``, any image that fails to load.
    """
    t0 = time.perf_counter()
    is_url = runner is not None and "://" in os.fspath(images)
    if not is_url:
        images = Path(images)
        if not images.is_dir():
            raise InvalidInputError(f"{images}: image folder not found")
    table = read_outcomes(outcomes, threshold)
    wisdom = Path(cache_dir) / "fftw-wisdom.txt" if cache_dir is not None and runner is None else None
    profiler = SpectralProfiler(working_size=working_size or DEFAULT_WORKING_SIZE, wisdom_path=wisdom)
    if runner is None:
        stream = iter_profiled_files(
            [images / name for name in table.images],
            profiler,
            jobs=jobs,
            cache_dir=cache_dir,
            progress=progress,
        )
    else:
        base = os.fspath(images).rstrip("/")
        stream = runner.profile_stream(
            [f"{base}/{name}" for name in table.images], profiler.spec(), cache_dir=cache_dir
        )
    # The fit set streams to Parquet as profiles arrive, so the client holds one partition at a
    # time; with a runner and a shared cache directory its workers can read it too.
    shared = runner is not None and cache_dir is not None
    root = (
        f"{os.fspath(cache_dir).rstrip('/')}/fits/{uuid.uuid4().hex}"
        if shared
        else tempfile.mkdtemp(prefix="cxr-monitor-fit-")
    )
    from .profilestore import ParquetFitSet  # pyarrow: only when fitting

    writer = ParquetFitSet.writer(root, len(profiler.feature_names))
    try:
        errors, hits, n_failures = _write_fit_set(stream, table, writer)
        fit_set = writer.close()
        if errors and strict:
            listing = "; ".join(reason for _, reason in errors[:5])
            raise InvalidInputError(
                f"{len(errors)} of {len(table.images)} images failed to load (--strict): {listing}"
            )
        n_fitted = fit_set.n_rows
        summary = {
            "n_listed": len(table.images),
            "n_fitted": n_fitted,
            "n_failed_to_load": len(errors),
            "n_failures": n_failures,
            "failure_rate": n_failures / n_fitted if n_fitted else float("nan"),
            "threshold": table.threshold,
            "outcome_columns": "label+score" if table.labels is not None else "failure",
        }
        model = ReliabilityModel.fit_streamed(
            fit_set,
            profiler=profiler,
            clusterer=SpectralClusterer(
                n_clusters=n_clusters,
                k_range=(2, k_max),
                min_cluster_size=min_cluster_size,
                random_state=seed,
            ),
            threshold=table.threshold,
            card={**(card or {}), "fit_data": summary, "seed": seed},
            max_fit_profiles=max_fit_profiles,
            map_partitions=runner.map if shared else None,
        )
    finally:
        ParquetFitSet.remove_root(root)
    model.scope = model.scope.with_overrides(**(scope_overrides or {}))
    save_model(model, out)
    return FitReport(model, Path(out), len(table.images), n_fitted, errors, hits, time.perf_counter() - t0)


def _write_fit_set(stream: Any, table: Outcomes, writer: Any) -> tuple[list[tuple[str, str]], int, int]:
    """Append each profiled image, with its outcome and record, to the fit set in input order.

    Returns the (image, reason) of each image that failed, the cache hits and the failures.
    """
    errors: list[tuple[str, str]] = []
    hits = n_failures = 0
    for item in stream:
        if item.error is not None:
            errors.append((item.source, item.error))
            continue
        i = item.index
        meta = item.meta.to_dict()
        meta.pop("source", None)
        record = {
            "image": table.images[i],
            **table.metadata[i],
            **{f"img_{k}": v for k, v in meta.items() if v is not None},
        }
        failure = int(table.failures[i])
        writer.append(
            item.profile,
            failure,
            record,
            label=None if table.labels is None else int(table.labels[i]),
            score=None if table.scores is None else float(table.scores[i]),
        )
        hits += item.cached
        n_failures += failure
    return errors, hits, n_failures
