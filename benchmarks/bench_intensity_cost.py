"""What the intensity component costs: profile spec 2.0 vs its spectral part alone (spec 1), side by side.

:func:`spec_costs` is the one measurement of the two specs, stage by stage, through the public
API (``SpectralProfiler.profile``, ``spectral_profile`` and ``profile_timed``); ``bench_profile.py``
and ``e4_cost.py`` call it too. Interleaved repeats on the same decoded images (an NIH
1024 x 1024 WebP and the Philips 1955 x 1841 JPEG 2000 DICOM), medians; the floor "decode + one
bare native real FFT" of issue 2's speed target is measured in the same loop. It also measures
what timing the stages costs: ``profile_timed`` against ``profile`` in the same loop. Run from
the repository root::

    .venv/bin/python benchmarks/bench_intensity_cost.py [--repeats 30]

Writes benchmarks/results/intensity_cost.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from monitor.imaging import load_bytes  # noqa: E402
from monitor.spectrum import PROFILE_STAGES, SPEC_VERSION, SpectralProfiler  # noqa: E402

__all__ = ["main", "spec_costs", "write_markdown"]

DATA = ROOT.parent / "shared" / "data"


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def spec_costs(
    pixels: np.ndarray,
    bits_stored: int | None,
    profiler: SpectralProfiler,
    repeats: int,
    extra: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, Any]:
    """Spec 1 (spectral only) and spec 2.0 (spectral + intensity) profiles of one image, side by side.

    Each repeat runs, in turn: ``spectral_profile`` (spec 1), ``profile`` (spec 2.0), both again
    through ``profile_timed`` (per-stage seconds), and every callable of ``extra`` (e.g. the
    floor), so load from other users hits all of them alike.

    Returns
    -------
    dict
        ``median_seconds`` of ``spec1``, ``spec2``, ``spec1_timed``, ``spec2_timed`` and each
        ``extra`` key; ``stages_spec1`` / ``stages_spec2``: median seconds per stage of
        :data:`~monitor.spectrum.PROFILE_STAGES`; ``intensity_seconds`` = spec2 - spec1;
        ``ratio_spec2_to_spec1`` and ``ratio_timed_to_untimed`` (spec 2.0), medians of per-repeat
        ratios; ``samples``: the raw per-repeat seconds.
    """
    extra = extra or {}
    profiler.profile(pixels, bits_stored)  # plan outside the timings
    rec: dict[str, list[float]] = {k: [] for k in ("spec1", "spec2", "spec1_timed", "spec2_timed", *extra)}
    stages: dict[str, dict[str, list[float]]] = {"spec1": {}, "spec2": {}}
    for _ in range(repeats):
        rec["spec1"].append(_timed(lambda: profiler.spectral_profile(pixels)))  # noqa: B023
        rec["spec2"].append(_timed(lambda: profiler.profile(pixels, bits_stored)))  # noqa: B023
        for spec, spectral_only in (("spec1", True), ("spec2", False)):
            t0 = time.perf_counter()
            _, times = profiler.profile_timed(pixels, bits_stored, spectral_only=spectral_only)
            rec[f"{spec}_timed"].append(time.perf_counter() - t0)
            for name, secs in times.to_dict().items():
                stages[spec].setdefault(name, []).append(secs)
        for key, fn in extra.items():
            rec[key].append(_timed(fn))
    med = {k: float(np.median(v)) for k, v in rec.items()}
    s1, s2 = np.array(rec["spec1"]), np.array(rec["spec2"])
    return {
        "shape": list(pixels.shape),
        "repeats": repeats,
        "median_seconds": med,
        "stages_spec1": {k: float(np.median(stages["spec1"][k])) for k in PROFILE_STAGES},
        "stages_spec2": {k: float(np.median(stages["spec2"][k])) for k in PROFILE_STAGES},
        "intensity_seconds": med["spec2"] - med["spec1"],
        "ratio_spec2_to_spec1": float(np.median(s2 / s1)),
        "ratio_timed_to_untimed": float(np.median(np.array(rec["spec2_timed"]) / s2)),
        "samples": rec,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


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
        pix = image.pixels
        r = spec_costs(
            pix,
            image.meta.bits_stored,
            p,
            args.repeats,
            extra={"floor": lambda b=blob, x=pix: (load_bytes(b, name="x"), np.fft.rfft2(x))},
        )
        r.pop("samples")
        med = r["median_seconds"]
        rows.append(
            {
                "input": label,
                **r,
                "spectral_ms": 1e3 * med["spec1"],
                "v2_ms": 1e3 * med["spec2"],
                "intensity_ms": 1e3 * r["intensity_seconds"],
                "floor_ms": 1e3 * med["floor"],
                "ratio_spectral": med["spec1"] / med["floor"],
                "ratio_v2": med["spec2"] / med["floor"],
            }
        )
    meta = {
        "repeats": args.repeats,
        "spec_version": SPEC_VERSION,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "intensity_cost.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = write_markdown(meta, rows, args.out / "intensity_cost.md")
    print(text)
    return 0


def write_markdown(meta: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> str:
    """The table of ``intensity_cost.json`` as Markdown (written to ``path`` and returned)."""
    load_before, repeats = meta["loadavg_before"], meta["repeats"]
    L = [
        "# Cost of the intensity component: profile spec 1 (spectral only) vs spec 2.0",
        "",
        f"Medians of {repeats} interleaved repeats; load average {load_before:.1f} before, "
        f"{meta['loadavg_after']:.1f} after (shared 2-core machine: read the ratios, not the milliseconds). "
        "Floor = decode + one bare native `numpy.fft.rfft2` (issue 2's target: profile / floor <= 1.0). "
        "Spec 1 = `SpectralProfiler.spectral_profile` (the spectral features only, the whole profile "
        "before spec 2.0); spec 2.0 = `SpectralProfiler.profile`; `spec 2.0 / spec 1` = median of "
        "per-repeat ratios; the intensity stage (from `profile_timed`) is what spec 2.0 adds, and under "
        "load a steadier figure than the difference of the two medians (`intensity_ms` in the JSON). "
        "Regenerate: "
        "`python benchmarks/bench_intensity_cost.py`.",
        "",
        "| input | spec 1 ms | spec 2.0 ms | spec 2.0 / spec 1 | intensity stage ms | floor ms | "
        "spec 1 / floor | spec 2.0 / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        L.append(
            f"| {r['input']} | {r['spectral_ms']:.1f} | {r['v2_ms']:.1f} | {r['ratio_spec2_to_spec1']:.2f} | "
            f"{1e3 * r['stages_spec2']['intensity']:.2f} | {r['floor_ms']:.1f} | {r['ratio_spectral']:.2f} | "
            f"{r['ratio_v2']:.2f} |"
        )
    L += [
        "",
        "## By stage (`SpectralProfiler.profile_timed`, ms, medians)",
        "",
        "| input | spec | " + " | ".join(PROFILE_STAGES) + " | sum |",
        "|---|---|" + "---|" * (len(PROFILE_STAGES) + 1),
    ]
    for r in rows:
        for spec in ("spec1", "spec2"):
            st = r[f"stages_{spec}"]
            L.append(
                f"| {r['input']} | {'1' if spec == 'spec1' else '2.0'} | "
                + " | ".join(f"{1e3 * st[k]:.2f}" for k in PROFILE_STAGES)
                + f" | {1e3 * sum(st.values()):.2f} |"
            )
    L += [
        "",
        "What timing the stages costs: median over repeats of `profile_timed` / `profile` (spec 2.0) "
        + ", ".join(f"{r['input']} {r['ratio_timed_to_untimed']:.3f}" for r in rows)
        + " (the timed path reads the clock 8 times; the untimed path is the same code without the reads).",
    ]
    path.write_text("\n".join(L) + "\n")
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
