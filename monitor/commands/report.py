"""``cxr-monitor report``: write an HTML or Markdown report of a fitted model.

Registered by :mod:`monitor.cli`; matplotlib is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..defaults import EXIT_OK, EXIT_PARTIAL, default_model_dir
from .output import add_command, print_json

__all__ = ["register"]


def _cmd_report(args: argparse.Namespace) -> int:
    from ..artifact import load_model
    from ..report.files import write_report

    fmt = args.format or ("md" if Path(args.out).suffix.lower() in (".md", ".markdown") else "html")
    model = load_model(args.model)
    result = write_report(
        model, args.out, fmt=fmt, images=args.images, model_path=args.model, n_thumbnails=args.thumbnails
    )
    missing = result.missing_images
    for name, reason in missing:
        print(
            f"missing image: {reason}" if name in reason else f"missing image {name}: {reason}",
            file=sys.stderr,
        )
    if args.json:
        print_json(
            {
                "report": str(result.path),
                "format": fmt,
                "files": [str(p) for p in result.files],
                "model_id": model.model_id,
                "n_clusters": model.n_clusters,
                "blind_spots": [int(c) for c in range(model.n_clusters) if model.rates.blind_spot_[c]],
                "missing_images": len(missing),
                "seconds": round(result.seconds, 3),
            }
        )
    else:
        extra = f", {len(result.files) - 1} figure files" if fmt == "md" else ""
        note = f"; {len(missing)} images could not be loaded" if missing else ""
        print(
            f"report of model {model.model_id} written to {result.path}{extra} in {result.seconds:.1f} s{note}"
        )
    return EXIT_PARTIAL if missing else EXIT_OK


def register(sub: Any) -> None:
    """Add the ``report`` subcommand to the CLI's subparsers."""
    p = add_command(
        sub,
        "report",
        "write an HTML (or Markdown) report of a fitted model's failure modes",
        """
        Describe a fitted model for people: the fit summary (data, task, threshold rule,
        global failure rate, chi-square / G-test p-value and Cramér's V of cluster vs
        failure, versions); a bar chart of each cluster's failure rate with its 95%
        interval, blind spots in red; each cluster's mean spectrum against the reference
        with a plain-language reading of what sets it apart (e.g. "+40% high-frequency
        energy: edge enhancement or noise"); the metadata composition of each cluster;
        a 2-D map of the fit images; and, with --images, thumbnails of each cluster's
        most typical images and of its failures.

        HTML (the default) is one self-contained file: figures embedded as PNG data
        URIs, inline CSS, no scripts, nothing fetched from the network. Markdown
        (--format md, or an --out ending in .md) writes its figures into
        <out stem>_files/ next to it.

        Exit status 1 when some thumbnails could not be loaded (each is named on
        stderr; the report is still written and says which).
        """,
        "examples:\n"
        "  cxr-monitor report --model models/default --out report.html --images ../shared/data/nih/images\n"
        "  cxr-monitor report --model models/mine --out docs/model.md --format md",
    )
    p.add_argument("--model", default=str(default_model_dir()), metavar="MODEL_DIR", help="model directory")
    p.add_argument("--out", required=True, metavar="FILE", help="report file to write (.html or .md)")
    p.add_argument(
        "--images", default=None, metavar="DIR", help="folder of the fit images, for thumbnails (optional)"
    )
    p.add_argument(
        "--format",
        choices=("html", "md"),
        default=None,
        help="html or md (default: from --out's suffix, else html)",
    )
    p.add_argument("--thumbnails", type=int, default=8, metavar="N", help="thumbnails per row (default: 8)")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary of what was written")
    p.set_defaults(func=_cmd_report)
