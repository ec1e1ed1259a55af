"""``cxr-monitor audit``: drift of an image archive per group and period, and when it changed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..defaults import (
    DEFAULT_AUDIT_ALPHA,
    DEFAULT_AUDIT_MIN_EFFECT,
    DEFAULT_AUDIT_MIN_SEGMENT_IMAGES,
    EXIT_OK,
    EXIT_PARTIAL,
    default_model_dir,
)
from ..errors import InvalidInputError
from .output import add_command, print_json, read_model_spec
from .runner import add_parallel_arguments, stream_profiles

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    from ..artifact import load_model
    from ..audit import read_manifest, run_audit
    from ..report.timeline import render_audit_html

    by = [c.strip() for c in args.by.split(",") if c.strip()]
    if not by:
        raise InvalidInputError("--by needs at least one manifest column, e.g. --by site,scanner")
    rows = read_manifest(
        args.manifest, by, period=args.period, date_column=args.date_column, image_column=args.image_column
    )
    sources = [r.source for r in rows]
    # Workers start on the spec from the model's card while this process loads the model.
    spec = read_model_spec(args.model)
    profiled = stream_profiles(args, sources, spec, desc="auditing") if spec is not None else None
    model = load_model(args.model)
    if profiled is None or model.profiler.spec() != spec:
        profiled = stream_profiles(args, sources, model.profiler.spec(), desc="auditing")
    result = run_audit(
        rows,
        profiled,
        model,
        by=by,
        period=args.period,
        alpha=args.alpha,
        min_effect=args.min_effect,
        min_segment_images=args.min_segment_images,
    )
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        audit = result.to_dict()
        text = json.dumps(audit, indent=1, allow_nan=False, default=_finite)
        (out / "audit.json").write_text(text)
        (out / "audit.html").write_text(render_audit_html(json.loads(text)))
    except OSError as exc:
        raise InvalidInputError(f"{out}: cannot write the audit ({exc.strerror})") from exc
    for _, reason in result.errors:
        print(f"error: {reason}", file=sys.stderr)
    n_out_of_scope = audit["n_out_of_scope"]
    summary = {
        "out": str(out),
        "n_images": result.n_images,
        "n_out_of_scope": n_out_of_scope,
        "n_unreadable": len(result.errors),
        "n_groups": len(result.cells),
        "change_points": [
            {"group": dict(zip(by, c.group, strict=True)), "period": c.period, "q_value": c.q_value}
            for c in result.changes
        ],
    }
    if args.json:
        print_json(summary)
    else:
        print(
            f"{result.n_images} images in {len(result.cells)} groups; audit written to {out}/audit.{{json,html}}"
        )
        if n_out_of_scope:
            print(f"{n_out_of_scope} images out of the model's scope by their DICOM header (see the audit)")
        if not result.changes:
            print("no change over time in any group")
        for c in result.changes:
            moved = ", ".join(f"{n} {s:+.1f} SD" for n, s in c.moved_features[:3])
            group = ", ".join(f"{k}={v}" for k, v in zip(by, c.group, strict=True))
            print(f"CHANGE {group} from {c.period} (q {c.q_value:.2g}): {moved}")
    return EXIT_PARTIAL if result.errors else EXIT_OK


def _finite(obj: Any) -> Any:
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def register(sub: Any) -> None:
    p = add_command(
        sub,
        "audit",
        "audit an image archive for drift per group and period, and find when it changed",
        """
        Score every image of a manifest (a CSV with the image path or URL and columns such as
        acquisition date, site, scanner, view) and, for each group (--by) and period: the image
        count, the drift verdict against the model's reference with its statistics (cluster-mix
        PSI and chi-square, novelty rate, intensity and out-of-scope components, estimated failure
        rate), the cluster mix, the out-of-scope images (a DICOM header outside the model's
        modality, body part or view allow-lists; counted by the field that failed and, as in
        drift, still counted in the other components) and the most shifted features. Then, per
        group, the change points over time: when the group's own images changed (binary
        segmentation of its periods; chi-square test of the cluster mix, Fisher's exact tests of
        the novelty and out-of-scope rates, pooled-variance t tests of the spectral and
        intensity feature means; corrected for components, candidate splits and, by Benjamini-Hochberg, groups),
        and which features moved. Writes OUT/audit.json and a self-contained OUT/audit.html
        timeline. Relative image paths are read from the manifest's folder.
        """,
        "example:\n  cxr-monitor audit --model models/mine --manifest archive.csv --by site,scanner "
        "--period month --out audit/",
    )
    p.add_argument("--model", default=str(default_model_dir()), metavar="MODEL_DIR", help="model directory")
    p.add_argument("--manifest", required=True, metavar="CSV", help="one row per image (see above)")
    p.add_argument("--by", required=True, metavar="COLUMNS", help="comma-separated group columns")
    p.add_argument(
        "--period",
        default="month",
        choices=("day", "week", "month", "quarter", "year", "all"),
        help="time bucket of the date column (default: month)",
    )
    p.add_argument(
        "--date-column", default="date", metavar="NAME", help="acquisition date column (default: date)"
    )
    p.add_argument(
        "--image-column", default="image", metavar="NAME", help="image path/URL column (default: image)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where audit.json and audit.html go")
    p.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_AUDIT_ALPHA,
        help=f"false discovery rate over groups (default: {DEFAULT_AUDIT_ALPHA})",
    )
    p.add_argument(
        "--min-effect",
        type=float,
        default=DEFAULT_AUDIT_MIN_EFFECT,
        metavar="SD",
        help=f"smallest feature-mean change, in pooled SD, that counts (default: {DEFAULT_AUDIT_MIN_EFFECT})",
    )
    p.add_argument(
        "--min-segment-images",
        type=int,
        default=DEFAULT_AUDIT_MIN_SEGMENT_IMAGES,
        metavar="N",
        help=f"images needed on each side of a change (default: {DEFAULT_AUDIT_MIN_SEGMENT_IMAGES})",
    )
    p.add_argument("--json", action="store_true", help="print a summary as one JSON object")
    add_parallel_arguments(p)
    p.set_defaults(func=_run)
