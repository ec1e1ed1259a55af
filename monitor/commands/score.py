"""``cxr-monitor score`` and ``cxr-monitor drift``: score images, test a batch for drift."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..defaults import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, default_model_dir
from ..errors import InvalidInputError
from .output import add_command, expand_paths, no_images_message, print_json, read_model_spec, untrusted_note
from .runner import add_parallel_arguments, stream_profiles

__all__ = ["register"]


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


def _score_paths(
    args: argparse.Namespace, on_engine: Callable[[Any], None], on_result: Callable[[Path, Any], None]
) -> int:
    """Score every image of ``args.paths``, in input order; returns an exit status.

    Profiles are computed by worker processes (or Dask workers) and scored here with the model;
    nothing per image is kept, so memory does not grow with the number of images. The workers
    start first, on the spec read from the model's card, and profile while this process loads
    the model (importing scikit-learn takes seconds).
    """
    scores = _read_scores(args.scores) if getattr(args, "scores", None) else {}
    paths = [str(p) for p in expand_paths(args.paths)]
    if not paths:
        raise InvalidInputError(no_images_message(args.paths))
    spec = read_model_spec(args.model)
    stream = stream_profiles(args, paths, spec, desc=args.command) if spec is not None else None
    engine = _engine(args)
    if stream is None or engine.model.profiler.spec() != spec:
        stream = stream_profiles(args, paths, engine.model.profiler.spec(), desc=args.command)
    on_engine(engine)
    status, n_scored = EXIT_OK, 0
    for item in stream:
        if item.error is not None:
            print(f"error: {item.error}", file=sys.stderr)
            status = EXIT_PARTIAL
            continue
        s = scores.get(Path(item.source).name, scores.get(item.source))
        result = engine.score_profile(item.profile, item.meta, s)
        on_result(Path(item.source), result)
        n_scored += 1
    if not n_scored:  # every input failed: an error, not a partial success (as `client score`)
        status = EXIT_ERROR
    return status


def _engine(args: argparse.Namespace) -> Any:
    from ..engine import Engine

    return Engine.from_directory(args.model)


def _cmd_score(args: argparse.Namespace) -> int:
    def emit(path: Path, s: Any) -> None:
        r = s.result
        if args.json:
            print_json({"image": str(path), **r.to_dict(), "metadata": s.meta.to_dict()})
        else:
            lo, hi = r.failure_interval
            marks = (("NOVEL", r.is_novel), ("OUT-OF-SCOPE", r.out_of_scope), ("BLIND-SPOT", r.in_blind_spot))
            flags = " ".join(f for f, on in marks if on)
            top = ", ".join(f"{n} {z:+.1f}σ" for n, z in r.top_features)
            print(
                f"{path}: cluster {r.cluster}  reliability {r.reliability:.3f}{untrusted_note(r)}  "
                f"failure p {r.failure_probability:.3f} [{lo:.3f}, {hi:.3f}]  novelty {r.novelty:.2f} {flags}"
            )
            for reason in r.scope_reasons:
                print(f"    out of scope: {reason}")
            if s.meta.colour_conversion:
                print(
                    f"    colour converted to luminance: {s.meta.colour_conversion} "
                    f"({s.meta.coloured_share:.1%} coloured pixels)"
                )
            print(f"    most deviating: {top}")

    return _score_paths(args, lambda engine: None, emit)


def _cmd_drift(args: argparse.Namespace) -> int:
    # Sufficient statistics only (counts and sums), so a drift test of millions of images
    # holds no per-image state.
    state: dict[str, Any] = {}

    def start(engine: Any) -> None:
        state["engine"], state["window"] = engine, engine.model.new_window()

    def add(path: Path, s: Any) -> None:
        r = s.result
        state["window"].add(r.cluster, r.is_novel, r.cluster_failure_probability, s.z_profile, r.scope_field)

    status = _score_paths(args, start, add)
    if state["window"].n == 0:
        print("error: no image could be scored, so there is no batch to test for drift", file=sys.stderr)
        return status
    report = state["engine"].model.drift(state["window"])
    if args.json:
        print_json(report.to_dict())
    else:
        print(f"{report.n_images} images: {'DRIFT' if report.drift else 'no drift'}")
        for reason in report.reasons:
            print(f"  - {reason}")
        print(
            "  components: "
            + ", ".join(f"{k} {'DRIFT' if v else 'ok'}" for k, v in report.components.items())
        )
        print(
            f"  PSI {report.psi:.3f}  JS distance {report.js_distance:.3f}  chi-square p {report.chi2_p:.3g}"
        )
        print(
            f"  novelty rate {report.novelty_rate:.3f}  out-of-scope rate {report.out_of_scope_rate:.3f}  "
            f"estimated failure rate {report.estimated_failure_rate:.3f} "
            f"(reference {report.reference_failure_rate:.3f})"
        )
        print(
            "  most shifted features: " + ", ".join(f"{n} {z:+.2f}σ" for n, z in report.top_shifted_features)
        )
    return status


def register(sub: Any) -> None:
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

            Read `trusted` with the reliability: a novel image, or a DICOM whose header
            says it is not a chest radiograph the model covers (out of scope: Modality,
            Body Part Examined or View Position outside the model's lists, see `info`),
            is not trusted; its interval is [0, 1] and its reliability the lower end of
            its interval (0), never a typical image's value.
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
        p = add_command(
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
        add_parallel_arguments(p)
        if name == "score":
            p.add_argument(
                "--scores", metavar="CSV", help="classifier scores: columns image (file name), score"
            )
        p.set_defaults(func=func)
