"""``cxr-monitor refit``: new failure rates (and optionally clusters) from a serving store."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..defaults import EXIT_OK, default_model_dir
from .output import add_command, print_json

__all__ = ["register"]


def _cmd_refit(args: argparse.Namespace) -> int:
    from ..artifact import load_model, save_model
    from ..refit import refit_from_store

    report = refit_from_store(load_model(args.model), args.from_store, refit_clusters=args.refit_clusters)
    save_model(report.model, args.out)
    d = {"model": str(args.out), **report.to_dict()}
    if args.json:
        print_json(d)
        return EXIT_OK
    what = "clusters and failure rates" if report.refit_clusters else "failure rates (clusters fixed)"
    print(
        f"refit {what} of {report.base_model_id} from {report.n_rows} stored outcomes "
        f"({report.n_failures} failures; scored by {', '.join(report.model_ids)}) -> {report.model.model_id}"
    )
    m = report.model
    for c in range(m.n_clusters):
        flag = "  BLIND SPOT" if m.rates.blind_spot_[c] else ""
        print(f"  cluster {c}: {int(m.rates.counts_[c]):6d} outcomes, failure rate {m.rates.rate_[c]:.3f}"
              f" [{m.rates.lower_[c]:.3f}, {m.rates.upper_[c]:.3f}]{flag}")  # fmt: skip
    print(f"saved to {args.out}", file=sys.stderr)
    return EXIT_OK


def register(sub: Any) -> None:
    """Add ``refit`` to the ``cxr-monitor`` subparsers."""
    p = add_command(
        sub,
        "refit",
        "re-estimate a model's failure rates from the outcomes a sidecar stored",
        """
        Read the outcome store of `cxr-monitor serve --store FILE` (spectral profiles
        of scored requests and the outcomes reported for them) and write a new model
        whose per-cluster failure rates, intervals and blind spots come from that
        production traffic; no image is read. Rows of every model that profiled with
        the same features as --model are used.

        By default the clusters of --model are kept; --refit-clusters fits them
        again with the same hyperparameters (the new model's drift reference is
        then the stored traffic). The score calibration is kept with fixed clusters
        and dropped with refit clusters (the store holds no true labels).

        The store may be read while the sidecar writes it. Serve the new model by
        pointing --model at it and sending the sidecar SIGHUP.
        """,
        """
        examples:
          cxr-monitor refit --from-store /var/lib/cxr-monitor/outcomes.sqlite --out models/refit
          cxr-monitor refit --from-store outcomes.sqlite --model models/default --out models/refit \\
              --refit-clusters --json
        """,
    )
    p.add_argument("--from-store", required=True, metavar="FILE", help="outcome store (serve --store)")
    p.add_argument("--model", default=str(default_model_dir()), metavar="MODEL_DIR",
                   help="the served model to refit (default: the bundled model)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="where to write the new model")
    p.add_argument("--refit-clusters", action="store_true", help="fit the clusters again too")
    p.add_argument("--json", action="store_true", help="print the refit summary as one JSON object")
    p.set_defaults(func=_cmd_refit)
