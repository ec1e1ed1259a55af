"""``cxr-monitor profile``: the named spectral features of images."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..defaults import EXIT_OK, EXIT_PARTIAL
from ..errors import InvalidInputError
from .output import add_command, expand_paths, print_json
from .runner import add_parallel_arguments, stream_profiles

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    from ..spectrum import SpectralProfiler

    profiler = SpectralProfiler(working_size=args.working_size)
    paths = [str(p) for p in expand_paths(args.paths)]
    if not paths:
        raise InvalidInputError("no image files given")
    status = EXIT_OK
    for item in stream_profiles(args, paths, profiler.spec(), desc="profiling"):
        if item.error is not None:
            print(f"error: {item.error}", file=sys.stderr)
            status = EXIT_PARTIAL
            continue
        path = item.source
        named = dict(zip(profiler.feature_names, (float(v) for v in item.profile), strict=True))
        if args.json:
            print_json({"image": str(path), "features": named})
        else:
            print(path)
            for name, value in named.items():
                print(f"  {name:36s} {value: .5f}")
    return status


def register(sub: Any) -> None:
    p = add_command(
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
    add_parallel_arguments(p)
    p.set_defaults(func=_run)
