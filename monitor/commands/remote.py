"""Options shared by every command that talks to a running sidecar, spelled the same everywhere."""

from __future__ import annotations

import argparse

from ..defaults import DEFAULT_ADDRESS

__all__ = ["add_connection_options"]


def add_connection_options(
    p: argparse.ArgumentParser, default: str | None = DEFAULT_ADDRESS, default_text: str = DEFAULT_ADDRESS
) -> None:
    """``--address`` and ``--timeout``."""
    p.add_argument("--address", default=default, metavar="HOST:PORT",
                   help=f"sidecar address (default: {default_text})")  # fmt: skip
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="deadline of each call")
