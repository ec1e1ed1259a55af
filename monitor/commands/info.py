"""``cxr-monitor info``: describe a fitted model."""

from __future__ import annotations

import argparse
from typing import Any

from ..defaults import EXIT_OK, default_model_dir
from .output import add_command, print_cluster_table, print_json, print_scope

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    from ..artifact import load_model

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
        "scope": m.scope.to_json(),
    }
    if args.json:
        print_json(info)
    else:
        print(f"model {m.model_id} ({args.model}), spectral profile spec {info['spec_version']}")
        task = m.card.get("task")
        if task:
            print(f"task: {task}")
        print(f"{m.n_clusters} clusters; global failure rate {rates['global_rate']:.3f}")
        print_cluster_table(rates["clusters"])
        print_scope(m.scope.to_json())
    return EXIT_OK


def register(sub: Any) -> None:
    p = add_command(
        sub,
        "info",
        "describe a fitted model",
        "Print the model card and the per-cluster failure rates, blind spots marked.",
        "example:\n  cxr-monitor info --model models/default --json",
    )
    p.add_argument("--model", default=str(default_model_dir()), metavar="MODEL_DIR", help="model directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run)
