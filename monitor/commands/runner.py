"""How ``profile``, ``score``, ``drift`` (and ``fit``) spread images over cores or a Dask cluster.

``--jobs N`` runs N local worker processes (default: the CPUs this process may use,
counted as ``serve`` counts them); ``--scheduler ADDRESS|local`` profiles on
``dask.distributed`` workers instead. Either way results come back in input order.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import InvalidInputError

__all__ = ["add_parallel_arguments", "progress_enabled", "resolve_jobs", "stream_profiles"]


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """``--jobs``, ``--scheduler`` and ``--progress``, spelled the same on every command."""
    p.add_argument(
        "--jobs",
        default="auto",
        metavar="N",
        help="local worker processes; auto or -1 = the CPUs this process may use (affinity and cgroup "
        "quota, as `serve` counts them); 1 = this process only (default: auto)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="profile on a Dask cluster: a dask.distributed scheduler address (tcp://host:8786), "
        "or 'local' for a LocalCluster of --jobs worker processes on this machine",
    )
    p.add_argument(
        "--progress",
        action="store_true",
        help="show a progress bar even when stderr is not a terminal (it is shown on a terminal)",
    )


def resolve_jobs(value: str | int) -> int:
    """``auto``/-1 → :func:`monitor.settings.available_cpus`; otherwise a count >= 1."""
    from ..settings import available_cpus

    text = str(value).strip().lower()
    if text in ("auto", "-1"):
        return available_cpus()
    try:
        jobs = int(text)
    except ValueError:
        raise InvalidInputError(f"--jobs must be 'auto', -1 or a whole number >= 1, got {value!r}") from None
    if jobs < 1:
        raise InvalidInputError(f"--jobs must be 'auto', -1 or a whole number >= 1, got {value!r}")
    return jobs


def progress_enabled(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "progress", False)) or sys.stderr.isatty()


def stream_profiles(
    args: argparse.Namespace, sources: Sequence[str], spec: dict[str, Any], desc: str
) -> Iterator[Any]:
    """:class:`~monitor.parallel.ProfiledFile` of each source, in input order, with a progress bar.

    The workers (local processes or a Dask cluster) start before this returns, so the caller
    can load its model while they profile.
    """
    jobs = resolve_jobs(args.jobs)
    if args.scheduler:
        from ..distributed import DaskRunner

        runner = DaskRunner.connect(args.scheduler, n_workers=jobs)
        stream = runner.profile_stream(sources, spec, cache_dir=getattr(args, "cache_dir", None))
    else:
        from ..parallel import profile_stream

        runner = None
        # Fewer images than workers: starting processes would cost more than it saves.
        stream = profile_stream(sources, spec, jobs=max(1, min(jobs, len(sources) // 4)))
    return _with_progress(stream, runner, len(sources), desc, progress_enabled(args))


def _with_progress(stream: Iterator[Any], runner: Any, total: int, desc: str, show: bool) -> Iterator[Any]:
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="img", disable=not show, leave=False)
    try:
        for item in stream:
            bar.update(1)
            yield item
    finally:
        bar.close()
        stream.close()
        if runner is not None:
            runner.close()
