"""``cxr-monitor fit``: fit a model on reference images and the classifier's outcomes."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..defaults import DEFAULT_MAX_FIT_PROFILES, EXIT_OK, EXIT_PARTIAL
from ..errors import InvalidInputError
from .output import add_command, print_cluster_table, print_json, print_scope
from .runner import add_parallel_arguments, progress_enabled, resolve_jobs

__all__ = ["register"]


def _fit(args: argparse.Namespace, clusters: str | int, runner: Any) -> Any:
    from ..batch import default_cache_dir
    from ..fitting import fit_folder

    return fit_folder(
        args.images,
        args.outcomes,
        args.out,
        threshold=args.threshold,
        n_clusters=clusters,
        k_max=args.k_max,
        min_cluster_size=args.min_cluster_size,
        seed=args.seed,
        jobs=resolve_jobs(args.jobs),
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
        strict=args.strict,
        progress=args.progress or (not args.json and progress_enabled(args)),
        runner=runner,
        max_fit_profiles=args.max_fit_profiles or None,
        scope_overrides=_scope_overrides(args),
    )


def _run(args: argparse.Namespace) -> int:
    clusters: str | int = args.clusters
    if clusters != "auto":
        try:
            clusters = int(clusters)
        except ValueError:
            raise InvalidInputError(
                f"--clusters must be 'auto' or an integer, got {args.clusters!r}"
            ) from None
    runner = None
    if args.scheduler:
        from ..distributed import DaskRunner

        runner = DaskRunner.connect(args.scheduler, n_workers=resolve_jobs(args.jobs))
    try:
        report = _fit(args, clusters, runner)
    finally:
        if runner is not None:
            runner.close()
    m = report.model
    rates = m.rates.to_json()
    for _, reason in report.errors:
        print(f"skipped: {reason}", file=sys.stderr)
    if args.json:
        print_json(
            {
                "model": str(report.out),
                "model_id": m.model_id,
                "n_listed": report.n_listed,
                "n_fitted": report.n_fitted,
                "n_skipped": len(report.errors),
                "skipped": [{"image": p, "reason": r} for p, r in report.errors],
                "cache_hits": report.cache_hits,
                "seconds": report.seconds,
                "n_clusters": m.n_clusters,
                "global_failure_rate": rates["global_rate"],
                "chi2_p": rates["chi2_p"],
                "g_test_p": rates["g_test_p"],
                "cramers_v": rates["cramers_v"],
                "clusters": rates["clusters"],
                "scope": m.scope.to_json(),
            }
        )
    else:
        print(f"model {m.model_id} saved to {report.out}")
        print(
            f"{report.n_fitted} of {report.n_listed} images fitted ({len(report.errors)} skipped, "
            f"{report.cache_hits} profiles from cache) in {report.seconds:.1f} s"
        )
        print(
            f"{m.n_clusters} clusters; global failure rate {rates['global_rate']:.3f}; "
            f"chi-square p {rates['chi2_p']:.3g}, G-test p {rates['g_test_p']:.3g}, "
            f"Cramér's V {rates['cramers_v']:.3f}"
        )
        print_cluster_table(rates["clusters"])
        print_scope(m.scope.to_json())
    return EXIT_PARTIAL if report.errors else EXIT_OK


def _scope_overrides(args: argparse.Namespace) -> dict[str, str]:
    given = {
        "modalities": args.scope_modalities,
        "body_parts": args.scope_body_parts,
        "view_positions": args.scope_view_positions,
    }
    return {k: v for k, v in given.items() if v is not None}


def register(sub: Any) -> None:
    p = add_command(
        sub,
        "fit",
        "fit a model on reference images and the classifier's outcomes",
        """
        Profile every image listed in the outcomes table, cluster the profiles, estimate
        the classifier's failure rate in each cluster, and save a model directory.

        The outcomes CSV has a column `image` (path relative to --images) and either
        `failure` (0/1: the classifier was wrong) or `label` (0/1) and `score` (the
        classifier's probability; positive when score >= --threshold). Other columns
        (view, sex, scanner...) are kept as metadata for slice comparisons.
        Images that fail to load are reported and skipped (exit status 1), or abort
        the fit with --strict.
        """,
        "example:\n  cxr-monitor fit --images data/nih/images --outcomes outcomes.csv --out models/mine",
    )
    p.add_argument("--images", required=True, metavar="DIR", help="folder holding the images")
    p.add_argument("--outcomes", required=True, metavar="CSV", help="outcomes table (see above)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="where to write the model")
    p.add_argument(
        "--threshold", type=float, default=None, help="decision threshold for label+score (default 0.5)"
    )
    p.add_argument(
        "--clusters", default="auto", help="'auto' (BIC over 2..--k-max) or a number (default: auto)"
    )
    p.add_argument(
        "--max-fit-profiles",
        type=int,
        default=DEFAULT_MAX_FIT_PROFILES,
        metavar="N",
        help="above N profiles, fit the clusters on a seeded sample of N, then assign every profile "
        "partition by partition (on the Dask workers with --scheduler and a shared --cache-dir): time "
        f"and memory bounded by N; 0 = never sample (default: {DEFAULT_MAX_FIT_PROFILES})",
    )
    p.add_argument("--k-max", type=int, default=10, help="largest cluster count tried by auto (default: 10)")
    p.add_argument(
        "--min-cluster-size",
        type=float,
        default=0.03,
        help="fraction (<1) or count of images (default: 0.03)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="random seed; equal seeds give equal models (default: 0)"
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="profile cache: a Parquet dataset under it, shared by local and --scheduler runs (default: "
        "~/.cache/cxr-monitor); with --scheduler a path or fsspec URL every worker can reach",
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the profile cache")
    p.add_argument("--strict", action="store_true", help="abort if any image fails to load")
    add_parallel_arguments(p)
    p.add_argument("--json", action="store_true", help="print the fit summary as one JSON object")
    for flag, what, default in (
        ("--scope-modalities", "(0008,0060) Modality", "CR, DR, DX, RG"),
        ("--scope-body-parts", "(0018,0015) Body Part Examined", "CHEST, LUNG, THORAX"),
        ("--scope-view-positions", "(0018,5101) View Position", "AP, PA, LL, RL, LAT, LATERAL..."),
    ):
        p.add_argument(
            flag,
            default=None,
            metavar="LIST",
            help=f"comma-separated {what} values the model covers, or * for any "
            f"(default: {default} plus the fit set's)",
        )
    p.set_defaults(func=_run)
