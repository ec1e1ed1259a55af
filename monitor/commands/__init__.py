"""The ``cxr-monitor`` subcommands, one module each; :mod:`monitor.cli` registers them in order.

Each module has ``register(subparsers)`` and imports only downward (:mod:`.output`, the
core), never :mod:`monitor.cli`. grpc, matplotlib and scikit-learn are imported inside the
command functions, so ``--help`` and the offline commands stay light.
"""

from __future__ import annotations

from . import audit, client, fit, info, profile, refit, report, score, serve

__all__ = ["COMMANDS"]

COMMANDS = (profile, fit, refit, score, audit, info, report, serve, client)
"""In the order ``cxr-monitor --help`` lists them."""
