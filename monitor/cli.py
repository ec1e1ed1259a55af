"""The ``cxr-monitor`` command line: the top-level parser and ``main``.

Each subcommand lives in its own module of :mod:`monitor.commands` and is registered here.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Sequence

from . import __version__
from .commands import COMMANDS
from .commands.output import formatter
from .defaults import EXIT_ERROR, EXIT_OK
from .errors import MonitorError
from .server.logs import configure_logging

__all__ = ["build_parser", "main"]

log = logging.getLogger("cxr_monitor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-monitor",
        formatter_class=formatter,
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
              3  error: no image could be read, bad input table, invalid model, server error

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
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from threadpoolctl import threadpool_limits

    parser = build_parser()
    args = parser.parse_args(argv)
    # Parallelism comes from images (worker threads or processes), never from inside one
    # image's small matrix products: BLAS threads there only contend for the same 2 cores
    # (a 224 px profile took 8x longer under load with them).
    threadpool_limits(limits=1)
    # Warnings (pydicom, numpy) go through the log too: one line each, not the pair pydicom
    # emits (a log record and a warning with the same text) nor the warning's source line.
    # Like basicConfig, nothing changes when the host program (or pytest) already logs somewhere.
    if not logging.getLogger().handlers:
        configure_logging(
            "text", "DEBUG" if args.verbose else "WARNING", text_format="%(levelname)s %(name)s: %(message)s"
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
