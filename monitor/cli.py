"""The ``cxr-monitor`` command line.

Each subcommand is registered by a ``register(subparsers)`` function; the
network-facing ones (serve, client, health) and the report live in their own
modules and import grpc or matplotlib only when they run.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import InvalidInputError, MonitorError

__all__ = ["main", "default_model_dir", "expand_paths", "print_json"]

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3

log = logging.getLogger("cxr_monitor")


def default_model_dir() -> Path:
    """The bundled model: ``$CXR_MONITOR_MODEL`` or ``models/default`` beside the package."""
    env = os.environ.get("CXR_MONITOR_MODEL")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "models" / "default"


def print_json(obj: Any) -> None:
    """One JSON object on one line (NaN written as null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not np.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return clean(v.item())
        return v

    sys.stdout.write(json.dumps(clean(obj), separators=(",", ":")) + "\n")


def expand_paths(items: Sequence[str]) -> list[Path]:
    """Files as given; folders expanded to the images inside (recursive, sorted)."""
    from .imaging import iter_image_files

    out: list[Path] = []
    for item in items:
        p = Path(item)
        out.extend(iter_image_files(p) if p.is_dir() else [p])
    return out


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=100)


def _add(sub: Any, name: str, summary: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=textwrap.dedent(description).strip(),
        epilog=textwrap.dedent(epilog).strip() or None,
        formatter_class=_formatter,
    )


# ---------------------------------------------------------------- profile
def _cmd_profile(args: argparse.Namespace) -> int:
    from .imaging import load_image
    from .spectrum import SpectralProfiler

    profiler = SpectralProfiler(working_size=args.working_size)
    status = EXIT_OK
    for path in expand_paths(args.paths):
        try:
            features = profiler.profile_image(load_image(path))
        except MonitorError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = EXIT_PARTIAL
            continue
        named = dict(zip(profiler.feature_names, (float(v) for v in features), strict=True))
        if args.json:
            print_json({"image": str(path), "features": named})
        else:
            print(path)
            for name, value in named.items():
                print(f"  {name:36s} {value: .5f}")
    return status


# ---------------------------------------------------------------- fit
def _cmd_fit(args: argparse.Namespace) -> int:
    from .batch import default_cache_dir
    from .fitting import fit_folder

    clusters: str | int = args.clusters
    if clusters != "auto":
        try:
            clusters = int(clusters)
        except ValueError:
            raise InvalidInputError(
                f"--clusters must be 'auto' or an integer, got {args.clusters!r}"
            ) from None
    report = fit_folder(
        args.images,
        args.outcomes,
        args.out,
        threshold=args.threshold,
        n_clusters=clusters,
        k_max=args.k_max,
        min_cluster_size=args.min_cluster_size,
        seed=args.seed,
        jobs=args.jobs,
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
        strict=args.strict,
        progress=not args.json and sys.stderr.isatty() or args.progress,
    )
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
        _print_cluster_table(rates["clusters"])
    return EXIT_PARTIAL if report.errors else EXIT_OK


def _print_cluster_table(rows: list[dict]) -> None:
    print(
        f"{'cluster':>7} {'images':>6} {'fail':>5} {'rate':>6} {'95% interval':>15} {'lift':>5} {'q':>7}  blind spot"
    )
    for r in rows:
        print(
            f"{r['cluster']:>7} {r['n_images']:>6} {r['n_failures']:>5} {r['rate']:>6.3f} "
            f"[{r['lower']:.3f}, {r['upper']:.3f}] {r['lift']:>5.2f} {r['fisher_q']:>7.3g}  "
            f"{'YES' if r['blind_spot'] else ''}"
        )


# ---------------------------------------------------------------- score / drift
def _read_scores(path: str) -> dict[str, float]:
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"image", "score"} <= set(reader.fieldnames):
                raise InvalidInputError(f"{path}: the scores table needs columns 'image' and 'score'")
            return {r["image"]: float(r["score"]) for r in reader}
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read the scores table ({exc.strerror})") from exc
    except ValueError as exc:
        raise InvalidInputError(f"{path}: column 'score' must be numeric ({exc})") from exc


def _score_paths(args: argparse.Namespace, on_result: Callable[[Path, Any], None]) -> tuple[Any, list, int]:
    """Score every image of ``args.paths``; returns the engine, the scored images and an exit status."""
    from tqdm import tqdm

    from .batch import default_cache_dir
    from .engine import Engine

    engine = Engine.from_directory(args.model, wisdom_path=default_cache_dir() / "fftw-wisdom.txt")
    scores = _read_scores(args.scores) if getattr(args, "scores", None) else {}
    paths = expand_paths(args.paths)
    if not paths:
        raise InvalidInputError("no image files given")
    scored, status = [], EXIT_OK
    for path in tqdm(paths, desc="scoring", unit="img", disable=not args.progress, leave=False):
        s = scores.get(path.name, scores.get(str(path)))
        try:
            result = engine.score(path, classifier_score=s)
        except MonitorError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = EXIT_PARTIAL
            continue
        scored.append(result)
        on_result(path, result)
    return engine, scored, status


def _cmd_score(args: argparse.Namespace) -> int:
    def emit(path: Path, s: Any) -> None:
        r = s.result
        if args.json:
            print_json({"image": str(path), **r.to_dict(), "metadata": s.meta.to_dict()})
        else:
            lo, hi = r.failure_interval
            flags = " ".join(f for f, on in (("NOVEL", r.is_novel), ("BLIND-SPOT", r.in_blind_spot)) if on)
            top = ", ".join(f"{n} {z:+.1f}σ" for n, z in r.top_features)
            print(
                f"{path}: cluster {r.cluster}  reliability {r.reliability:.3f}  "
                f"failure p {r.failure_probability:.3f} [{lo:.3f}, {hi:.3f}]  novelty {r.novelty:.2f} {flags}"
            )
            print(f"    most deviating: {top}")

    return _score_paths(args, emit)[2]


def _cmd_drift(args: argparse.Namespace) -> int:
    engine, scored, status = _score_paths(args, lambda p, s: None)
    report = engine.batch_drift(scored)
    if args.json:
        print_json(report.to_dict())
    else:
        print(f"{report.n_images} images: {'DRIFT' if report.drift else 'no drift'}")
        for reason in report.reasons:
            print(f"  - {reason}")
        print(
            f"  PSI {report.psi:.3f}  JS distance {report.js_distance:.3f}  chi-square p {report.chi2_p:.3g}"
        )
        print(
            f"  novelty rate {report.novelty_rate:.3f}  estimated failure rate "
            f"{report.estimated_failure_rate:.3f} (reference {report.reference_failure_rate:.3f})"
        )
        print(
            "  most shifted features: " + ", ".join(f"{n} {z:+.2f}σ" for n, z in report.top_shifted_features)
        )
    return status


# ---------------------------------------------------------------- info
def _cmd_info(args: argparse.Namespace) -> int:
    from .artifact import load_model

    m = load_model(args.model)
    rates = m.rates.to_json()
    info = {
        "model": str(args.model),
        "model_id": m.model_id,
        "spec_version": m.profiler.spec()["spec_version"],
        "n_clusters": m.n_clusters,
        "card": m.card,
        "global_failure_rate": rates["global_rate"],
        "chi2_p": rates["chi2_p"],
        "cramers_v": rates["cramers_v"],
        "blind_spots": [r["cluster"] for r in rates["clusters"] if r["blind_spot"]],
        "clusters": rates["clusters"],
    }
    if args.json:
        print_json(info)
    else:
        print(f"model {m.model_id} ({args.model}), spectral profile spec {info['spec_version']}")
        task = m.card.get("task")
        if task:
            print(f"task: {task}")
        print(f"{m.n_clusters} clusters; global failure rate {rates['global_rate']:.3f}")
        _print_cluster_table(rates["clusters"])
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-monitor",
        formatter_class=_formatter,
        description=textwrap.dedent(
            """
            Spectral reliability monitor for chest X-ray classifiers.

            Each image is summarised by its spectral profile (how its energy spreads over
            spatial frequencies); profiles of a reference set are clustered, and the
            classifier's failure rate in each cluster tells how far to trust a new image
            that falls there. Offline: profile, fit, score, drift, report. Online: serve.
            """
        ).strip(),
        epilog=textwrap.dedent(
            """
            exit status:
              0  success
              1  partial success: some images could not be read (each is reported on stderr)
              2  usage error
              3  error: bad input table, invalid model, server error

            environment:
              CXR_MONITOR_MODEL    default model directory (default: the bundled models/default)
              CXR_MONITOR_*        every `serve` option (see `cxr-monitor serve --help`)

            Run `cxr-monitor COMMAND --help` for each command's options.
            """
        ).strip(),
    )
    parser.add_argument("--version", action="version", version=f"cxr-monitor {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _add(
        sub,
        "profile",
        "print the spectral profile of images",
        """
        Compute the spectral profile of each image: named features (log energy fraction
        in each radial frequency band, spectral slopes, directional ratios, periodic-peak
        and JPEG-blockiness measures). See docs/spectral-profile.md for their definition.
        """,
        "example:\n  cxr-monitor profile chest.dcm scans/ --json",
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files (DICOM, PNG, JPEG, WebP, TIFF) or folders"
    )
    p.add_argument("--json", action="store_true", help='one JSON object per image: {"image", "features"}')
    p.add_argument(
        "--working-size", type=int, default=512, help="working image side in pixels (default: 512)"
    )
    p.set_defaults(func=_cmd_profile)

    p = _add(
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
        "--jobs", type=int, default=1, help="parallel profiling processes; -1 = all cores (default: 1)"
    )
    p.add_argument("--cache-dir", default=None, help="profile cache (default: ~/.cache/cxr-monitor)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the profile cache")
    p.add_argument("--strict", action="store_true", help="abort if any image fails to load")
    p.add_argument("--progress", action="store_true", help="show a progress bar even when not on a terminal")
    p.add_argument("--json", action="store_true", help="print the fit summary as one JSON object")
    p.set_defaults(func=_cmd_fit)

    for name, summary, description, func in (
        (
            "score",
            "score the reliability of images",
            """
            For each image: its spectral cluster, soft memberships, predicted failure
            probability with its 95% interval, reliability (1 - failure probability),
            novelty (share of reference images more typical) and the features that
            deviate most from its cluster. With --scores, the classifier's own score is
            calibrated within the image's cluster and combined into the reliability.
            """,
            _cmd_score,
        ),
        (
            "drift",
            "test a batch of images for drift against the model's reference",
            """
            Compare the batch with the reference set: cluster-mix distance (PSI,
            Jensen-Shannon, chi-square p-value), novelty rate, label-free estimated
            failure rate and the most shifted features; `drift` is true when the
            thresholds stored in the model (printed under `thresholds`) are crossed.
            """,
            _cmd_drift,
        ),
    ):
        p = _add(
            sub,
            name,
            summary,
            description,
            f"example:\n  cxr-monitor {name} --model models/default scans/ --json",
        )
        p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
        p.add_argument(
            "--model", default=str(default_model_dir()), metavar="MODEL_DIR", help="model directory"
        )
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--progress", action="store_true", help="show a progress bar")
        if name == "score":
            p.add_argument(
                "--scores", metavar="CSV", help="classifier scores: columns image (file name), score"
            )
        p.set_defaults(func=func)

    p = _add(
        sub,
        "info",
        "describe a fitted model",
        "Print the model card and the per-cluster failure rates, blind spots marked.",
        "example:\n  cxr-monitor info --model models/default --json",
    )
    p.add_argument("--model", default=str(default_model_dir()), metavar="MODEL_DIR", help="model directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)

    for module in ("monitor.server.commands", "monitor.report.commands"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                continue
            raise
        mod.register(sub, _add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from threadpoolctl import threadpool_limits

    parser = build_parser()
    args = parser.parse_args(argv)
    # Parallelism comes from images (worker threads or processes), never from inside one
    # image's small matrix products: BLAS threads there only contend for the same 2 cores
    # (a 224 px profile took 8x longer under load with them).
    threadpool_limits(limits=1)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except MonitorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
