"""``cxr-monitor profile``: the named spectral features of images."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..defaults import EXIT_OK, EXIT_PARTIAL
from ..errors import MonitorError
from .output import add_command, expand_paths, print_json

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    from ..imaging import load_image
    from ..spectrum import SpectralProfiler

    profiler = SpectralProfiler(working_size=args.working_size)
    status = EXIT_OK
    for path in expand_paths(args.paths):
        try:
            features = profiler.profile_image(load_image(path))
        except MonitorError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = EXIT_PARTIAL
            continue
        named = dict(zip(profiler.feature_names, (float(v) for v in features), strict=True))
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
    p.set_defaults(func=_run)
