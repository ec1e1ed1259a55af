"""``cxr-monitor score`` and ``cxr-monitor drift``: score images, test a batch for drift."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..defaults import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, default_model_dir
from ..errors import InvalidInputError, MonitorError
from .output import add_command, expand_paths, no_images_message, print_json, untrusted_note

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


def _score_paths(args: argparse.Namespace, on_result: Callable[[Path, Any], None]) -> tuple[Any, list, int]:
    """Score every image of ``args.paths``; returns the engine, the scored images and an exit status."""
    from tqdm import tqdm

    from ..batch import default_cache_dir
    from ..engine import Engine

    engine = Engine.from_directory(args.model, wisdom_path=default_cache_dir() / "fftw-wisdom.txt")
    scores = _read_scores(args.scores) if getattr(args, "scores", None) else {}
    paths = expand_paths(args.paths)
    if not paths:
        raise InvalidInputError(no_images_message(args.paths))
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
    if not scored:  # every input failed: an error, not a partial success (as `client score`)
        status = EXIT_ERROR
    return engine, scored, status


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

    return _score_paths(args, emit)[2]


def _cmd_drift(args: argparse.Namespace) -> int:
    engine, scored, status = _score_paths(args, lambda p, s: None)
    if not scored:
        print("error: no image could be scored, so there is no batch to test for drift", file=sys.stderr)
        return status
    report = engine.batch_drift(scored)
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
        p.add_argument("--progress", action="store_true", help="show a progress bar")
        if name == "score":
            p.add_argument(
                "--scores", metavar="CSV", help="classifier scores: columns image (file name), score"
            )
        p.set_defaults(func=func)
