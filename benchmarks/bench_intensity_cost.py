"""What the intensity component costs: profile v2 vs its spectral part alone, side by side.

Interleaved repeats on the same decoded images (an NIH 1024 x 1024 WebP and the Philips
1955 x 1841 JPEG 2000 DICOM), medians; the floor "decode + one bare native real FFT" of
issue 2's speed target is measured in the same loop. Run from the repository root::

    .venv/bin/python benchmarks/bench_intensity_cost.py [--repeats 30]

Writes benchmarks/results/intensity_cost.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from monitor.imaging import load_bytes  # noqa: E402
from monitor.spectrum import SpectralProfiler  # noqa: E402

DATA = ROOT.parent.parent / "shared" / "data"


def _timed(fn) -> float:  # noqa: ANN001 - any callable
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    nih = sorted((args.data / "nih" / "images").glob("*.webp"))[0]
    inputs = {
        "NIH 1024x1024 WebP": nih,
        "J2K DICOM 1955x1841": args.data / "dicom" / "cxr_pa_cr_philips_j2k.dcm",
    }
    p = SpectralProfiler()
    rows = []
    load_before = os.getloadavg()[0]
    for label, path in inputs.items():
        blob = path.read_bytes()
        image = load_bytes(blob, name=path.name)
        pix, bits = image.pixels, image.meta.bits_stored
        p.profile(pix, bits)  # plan outside the timings
        t = {"spectral": [], "v2": [], "floor": []}
        for _ in range(args.repeats):
            t["spectral"].append(_timed(lambda: p.spectral_profile(pix)))  # noqa: B023
            t["v2"].append(_timed(lambda: p.profile(pix, bits)))  # noqa: B023
            t["floor"].append(_timed(lambda: (load_bytes(blob, name="x"), np.fft.rfft2(pix))))  # noqa: B023
        med = {k: float(np.median(v)) for k, v in t.items()}
        rows.append(
            {
                "input": label,
                "spectral_ms": 1e3 * med["spectral"],
                "v2_ms": 1e3 * med["v2"],
                "intensity_ms": 1e3 * (med["v2"] - med["spectral"]),
                "floor_ms": 1e3 * med["floor"],
                "ratio_spectral": med["spectral"] / med["floor"],
                "ratio_v2": med["v2"] / med["floor"],
            }
        )
    meta = {"repeats": args.repeats, "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "intensity_cost.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    L = [
        "# Cost of the intensity component (profile spec 2.0)",
        "",
        f"Medians of {args.repeats} interleaved repeats; load average {load_before:.1f} before, "
        f"{meta['loadavg_after']:.1f} after (shared 2-core machine: read the ratios, not the milliseconds). "
        "Floor = decode + one bare native `numpy.fft.rfft2` (issue 2's target: profile / floor <= 1.0). "
        "Regenerate: `python benchmarks/bench_intensity_cost.py`.",
        "",
        "| input | spectral only (v1) ms | v2 profile ms | intensity component ms | floor ms | "
        "v1 / floor | v2 / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        L.append(
            f"| {r['input']} | {r['spectral_ms']:.1f} | {r['v2_ms']:.1f} | {r['intensity_ms']:.1f} | "
            f"{r['floor_ms']:.1f} | {r['ratio_spectral']:.2f} | {r['ratio_v2']:.2f} |"
        )
    (args.out / "intensity_cost.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
