"""Measure the colour rule of monitor.colour on the code-built corpus (benchmarks/colour_corpus.py).

For every corpus case, built on a synthetic chest phantom and on real NIH radiographs (chosen
with a fixed seed; none of them was used to choose the constants), it records the share of
coloured pixels at several chroma noise levels, the largest channel difference, and the
verdict of the rule as shipped. The margins: the largest coloured share of an image that is
grey in substance against the smallest of a genuinely coloured one.

    .venv/bin/python benchmarks/colour_tolerance.py [--nih N] [--data ../shared/data]

Writes benchmarks/results/colour_tolerance.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.colour_corpus import CASES, chest_phantom  # noqa: E402
from monitor import __version__  # noqa: E402
from monitor.colour import MAX_COLOURED_SHARE, NOISE_LEVEL, assess_colour  # noqa: E402
from monitor.errors import UnsupportedImageError  # noqa: E402
from monitor.imaging import load_bytes  # noqa: E402

LEVELS = (8.0, 12.0, 16.0)
RESULTS = Path(__file__).resolve().parent / "results"


def _bases(data: Path, n_nih: int, seed: int) -> list[tuple[str, np.ndarray]]:
    bases = [("phantom 512", chest_phantom(512)), ("phantom 1024", chest_phantom(1024, seed=1))]
    images = sorted((data / "nih" / "images").glob("*.webp"))
    if n_nih and images:
        pick = np.random.default_rng(seed).choice(len(images), size=min(n_nih, len(images)), replace=False)
        for i in sorted(pick):
            with Image.open(images[i]) as im:
                bases.append((f"nih {images[i].name}", np.asarray(im.convert("L"))))
    return bases


def measure(data: Path, n_nih: int, seed: int) -> dict:
    rows = []
    for base_name, grey in _bases(data, n_nih, seed):
        rng = np.random.default_rng(seed)
        for case in CASES:
            encoded = case.build(grey, rng)
            with Image.open(io.BytesIO(encoded)) as im:
                rgb = np.asarray(im.convert("RGB"))
            diff = np.abs(rgb.astype(np.int16) - rgb[..., :1].astype(np.int16)).max(axis=2)
            shares = {str(level): assess_colour(rgb, noise_level=level).coloured_share for level in LEVELS}
            try:
                meta = load_bytes(encoded, name=case.name).meta
                verdict = meta.colour_conversion or "grey"
            except UnsupportedImageError:
                verdict = "rejected"
            rows.append(
                {
                    "base": base_name,
                    "case": case.name,
                    "grey_in_substance": case.grey_in_substance,
                    "max_channel_difference": int(diff.max()),
                    "mean_channel_difference": float(diff.mean()),
                    "coloured_share": shares,
                    "verdict": verdict,
                    "correct": (verdict != "rejected") == case.grey_in_substance,
                }
            )
    return {
        "noise_level": NOISE_LEVEL,
        "max_coloured_share": MAX_COLOURED_SHARE,
        "levels": LEVELS,
        "seed": seed,
        "versions": {
            "cxr-spectral-monitor": __version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pillow": Image.__version__,
        },  # fmt: skip
        "rows": rows,
    }


def _margins(rows: list[dict], level: str) -> tuple[float, float]:
    grey = max(r["coloured_share"][level] for r in rows if r["grey_in_substance"])
    colour = min(r["coloured_share"][level] for r in rows if not r["grey_in_substance"])
    return grey, colour


def to_markdown(result: dict) -> str:
    rows = result["rows"]
    n_bases = len({r["base"] for r in rows})
    wrong = [r for r in rows if not r["correct"]]
    out = [
        "# Colour tolerance: near-grey exports vs genuinely coloured images",
        "",
        f"Rule as shipped: a pixel is coloured when its chroma is more than {result['noise_level']:g} "
        f"8-bit levels from the image's tint; an image with at most {result['max_coloured_share']:.0%} "
        "coloured pixels is converted to luminance, above that it is refused. "
        f"{len(CASES)} cases x {n_bases} base images (2 synthetic phantoms, the rest real NIH "
        f"radiographs picked with seed {result['seed']}). Produced by `benchmarks/colour_tolerance.py`.",
        "",
        f"**Verdicts: {len(rows) - len(wrong)} of {len(rows)} correct.**"
        + (
            ""
            if not wrong
            else " Wrong: " + "; ".join(f"{r['case']} on {r['base']} ({r['verdict']})" for r in wrong)
        ),
        "",
        "## Margins by noise level",
        "",
        "Largest coloured share among images grey in substance, smallest among genuinely coloured ones",
        "(the share limit must fall between them).",
        "",
        "| noise level (8-bit chroma levels) | max share, grey in substance | min share, coloured | ratio |",
        "|---:|---:|---:|---:|",
    ]
    for level in result["levels"]:
        g, c = _margins(rows, str(level))
        out.append(f"| {level:g} | {g:.2%} | {c:.2%} | {c / g if g else float('inf'):.1f} |")
    out += [
        "",
        f"## Each case (noise level {result['noise_level']:g}): range over the base images",
        "",
        "| case | expected | max channel diff | coloured share (min-max) | verdicts |",
        "|---|---|---:|---:|---|",
    ]
    level = str(result["noise_level"])
    for case in CASES:
        rs = [r for r in rows if r["case"] == case.name]
        shares = [r["coloured_share"][level] for r in rs]
        verdicts = sorted({r["verdict"] for r in rs})
        out.append(
            f"| {case.name} | {'grey' if case.grey_in_substance else 'coloured'} | "
            f"{max(r['max_channel_difference'] for r in rs)} | {min(shares):.2%} - {max(shares):.2%} | "
            f"{', '.join(verdicts)} |"
        )
    out += ["", f"Versions: {json.dumps(result['versions'])}.", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    )
    parser.add_argument("--nih", type=int, default=12, help="real NIH radiographs used as bases (default 12)")
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    result = measure(args.data.resolve(), args.nih, args.seed)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "colour_tolerance.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "colour_tolerance.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
