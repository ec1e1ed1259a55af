"""A synthetic archive with one known change, and the archive audit that must find it (issue 10, part 4).

The archive is built from the 621 NIH images of ../shared/data: each image is used once, assigned
at random (seeded) to a site and a month (with a random acquisition day); at one site, from one
month on, every image gets an acquisition change (:mod:`benchmarks.shifts`: a resampling to a
coarser detector, a new edge-enhancement post-processing curve, or a new display (gamma) curve)
and is written as a PNG; the other images are read in place. ``cxr-monitor audit`` then runs on
the manifest; it must name that site and month, and nothing else.

Four archives, each with its own seed, layout and (but for the last) change, none used to choose
the audit's settings (the defaults are conventions: FDR 0.01, PSI 0.1, 0.5 SD):

* ``resample``: 4 sites x 6 months, site C resampled (factor 2) from 2025-04;
* ``sharpen``: 5 sites x 5 months, site B edge-enhanced (unsharp amount 1.0) from 2025-03;
* ``gamma``: 2 sites x 6 months, site B's images through a new display curve, gamma 0.7
  (brighter mid-tones; the level issue 12 names, "strong" in :data:`benchmarks.shifts.LEVELS`),
  from 2025-03: a photometric change the spectral features do not see (they are invariant to
  ``a*x + b``); profile spec 2.0's intensity features should;
* ``none``: 4 sites x 6 months, no change (any change point found is a false alarm).

Two probes of the detection limit, not counted in the exit status:

* ``gamma_25_per_cell``: the photometric change as first designed, 4 sites x 6 months (25 images
  a cell: 50 before the change, 100 after), site D from 2025-03. The intensity features of one
  chest film differ from the next by about one reference SD and gamma 0.7 moves their means by
  0.6-0.9 SD, so 25 images a cell is near the limit: the audit's earlier Welch tests missed it,
  which is why ``gamma`` has 51 images a cell; the pooled-variance t the audit uses now finds it.
* ``gamma_moderate``: the ``gamma`` design with gamma 0.8.

    .venv/bin/python benchmarks/audit_demo.py [--jobs auto]

Writes benchmarks/results/audit_demo.{md,json} and audit_<archive>.html.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.shifts import LEVELS, apply_shift  # noqa: E402
from monitor.spectrum import SPEC_VERSION  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

__all__ = ["ARCHIVES", "build_archive", "main"]

ARCHIVES: dict[str, dict[str, Any]] = {
    "resample": {"sites": 4, "months": 6, "site": "C", "month": 4, "shift": ("resample", "mild"), "seed": 1},
    "sharpen": {
        "sites": 5,
        "months": 5,
        "site": "B",
        "month": 3,
        "shift": ("sharpen", "moderate"),
        "seed": 2,
    },
    "gamma": {"sites": 2, "months": 6, "site": "B", "month": 3, "shift": ("gamma", "strong"), "seed": 4},
    "none": {"sites": 4, "months": 6, "site": None, "month": None, "shift": None, "seed": 3},
    "gamma_25_per_cell": {
        "sites": 4,
        "months": 6,
        "site": "D",
        "month": 3,
        "shift": ("gamma", "strong"),
        "seed": 4,
        "probe": True,
    },
    "gamma_moderate": {
        "sites": 2,
        "months": 6,
        "site": "B",
        "month": 3,
        "shift": ("gamma", "moderate"),
        "seed": 4,
        "probe": True,
    },
}


def build_archive(
    data_dir: Path,
    out: Path,
    *,
    sites: int,
    months: int,
    site: str | None,
    month: int | None,
    shift: tuple[str, str] | None,
    seed: int,
    per_cell: int | None = None,
    year: int = 2025,
) -> Path:
    """Write ``out/manifest.csv`` (image, date, site, view) and the changed images; returns the manifest.

    Parameters
    ----------
    sites, months : int
        Sites are named A, B, C ...; months are ``year``-01 onward.
    site, month : str and int, optional
        Where and from when (1-based month) the change applies; ``None``: no change.
    shift : (kind, level), optional
        A shift of :mod:`benchmarks.shifts` at a named level.
    per_cell : int, optional
        Images per site and month (default: all 621 images spread evenly, the rest unused).
    """
    rows = list(csv.DictReader((data_dir / "nih" / "labels.csv").open()))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    names = [chr(ord("A") + i) for i in range(sites)]
    per_cell = per_cell or len(rows) // (sites * months)
    out.mkdir(parents=True, exist_ok=True)
    changed = out / "changed"
    changed.mkdir(exist_ok=True)
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "date", "site", "view"])
        i = 0
        for m in range(1, months + 1):
            for s in names:
                for _ in range(per_cell):
                    r = rows[order[i]]
                    i += 1
                    src = data_dir / "nih" / "images" / r["image"]
                    day = int(rng.integers(1, 29))
                    if shift is not None and s == site and month is not None and m >= month:
                        with Image.open(src) as im:
                            pixels = np.asarray(im.convert("L"), dtype=np.float32)
                        kind, level = shift
                        moved = apply_shift(pixels, kind, LEVELS[kind][level], seed=i)
                        path = changed / (Path(r["image"]).stem + ".png")
                        Image.fromarray(np.clip(np.rint(moved), 0, 255).astype(np.uint8)).save(path)
                    else:
                        path = src
                    w.writerow([str(path), f"{year}-{m:02d}-{day:02d}", s, r["view"]])
    return manifest


def run(name: str, jobs: str, workdir: Path) -> dict[str, Any]:
    from monitor.cli import main as cli

    spec = ARCHIVES[name]
    t0 = time.perf_counter()
    manifest = build_archive(
        DATA,
        workdir / name,
        sites=spec["sites"],
        months=spec["months"],
        site=spec["site"],
        month=spec["month"],
        shift=spec["shift"],
        seed=spec["seed"],
    )
    built = time.perf_counter() - t0
    out = workdir / f"{name}-audit"
    t0 = time.perf_counter()
    code = cli(
        [
            "audit",
            "--model",
            str(ROOT / "models" / "default"),
            "--manifest",
            str(manifest),
            "--by",
            "site",
            "--period",
            "month",
            "--out",
            str(out),
            "--jobs",
            jobs,
            "--json",
        ]
    )
    seconds = time.perf_counter() - t0
    audit = json.loads((out / "audit.json").read_text())
    shutil.copy(out / "audit.html", RESULTS / f"audit_{name}.html")
    expected = [] if spec["site"] is None else [{"site": spec["site"], "period": f"2025-{spec['month']:02d}"}]
    found = [{"site": c["group"]["site"], "period": c["period"]} for c in audit["change_points"]]
    return {
        "archive": name,
        "design": {k: v for k, v in spec.items()},
        "n_images": audit["n_images"],
        "profile_spec": SPEC_VERSION,
        "model_id": audit["model_id"],
        "exit_status": code,
        "build_seconds": built,
        "audit_seconds": seconds,
        "expected": expected,
        "found": found,
        "correct": found == expected,
        "change_points": audit["change_points"],
        "per_site_drift_verdicts": {
            g["group"]["site"]: [bool(r["drift"]["drift"]) for r in g["periods"]] for g in audit["groups"]
        },
    }


def write_md(results: list[dict[str, Any]]) -> str:
    lines = [
        "# Archive drift audit on synthetic archives (benchmarks/audit_demo.py)\n",
        "Built from the 621 NIH images (each used once; sites and months assigned at random, seeded); "
        "the audit ran with its default settings (FDR 0.01 over groups, PSI 0.1, novelty 0.05, "
        f"out-of-scope rate 0.02, 0.5 pooled SD, 20 images a side) and `models/default` "
        f"(profile spec {results[0]['profile_spec']}, model {results[0]['model_id']}).\n",
        "| archive | design | images | expected change | found | correct | audit s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d = r["design"]
        design = (
            ("probe of the detection limit: " if d.get("probe") else "")
            + f"{d['sites']} sites x {d['months']} months"
            + (
                f", {d['shift'][0]} ({d['shift'][1]}) at {d['site']} from month {d['month']}"
                if d["shift"]
                else ""
            )
        )
        exp = ", ".join(f"{e['site']} {e['period']}" for e in r["expected"]) or "none"
        got = ", ".join(f"{e['site']} {e['period']}" for e in r["found"]) or "none"
        lines.append(
            f"| {r['archive']} | {design} | {r['n_images']} | {exp} | {got} | "
            f"{'yes' if r['correct'] else ('missed (probe)' if d.get('probe') else 'NO')} | {r['audit_seconds']:.0f} |"
        )
    lines.append("")
    for r in results:
        for c in r["change_points"]:
            moved = ", ".join(f"{m['feature']} {m['shift_sd']:+.1f} SD" for m in c["moved_features"][:5])
            comps = ", ".join(k for k, v in c["components"].items() if v["significant"])
            lines.append(
                f"- {r['archive']}: site {c['group']['site']} from {c['period']} (q = {c['q_value']:.2g}; "
                f"{c['n_before']} images before, {c['n_after']} after); components: {comps or 'combined'}; "
                f"moved: {moved}"
            )
    lines.append(
        "\nTimelines: " + ", ".join(f"`audit_{r['archive']}.html`" for r in results) + " (self-contained)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="auto")
    ap.add_argument("--archives", default=",".join(ARCHIVES))
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(name, args.jobs, Path(tmp)) for name in args.archives.split(",")]
    (RESULTS / "audit_demo.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "audit_demo.md").write_text(write_md(results))
    print((RESULTS / "audit_demo.md").read_text())
    # A probe of the detection limit may miss; the designed archives may not.
    return 0 if all(r["correct"] for r in results if not r["design"].get("probe")) else 1


if __name__ == "__main__":
    sys.exit(main())
