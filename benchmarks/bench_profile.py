"""The core's speed targets (issue 2), measured side by side in one run.

1. Profiling a 1024x1024 image costs no more than decoding it plus one bare real FFT of the
   native-size image (ratio <= 1.0); a 2048x2048 16-bit DICOM likewise. Both profile specs are
   measured in the same loop: spec 1 (the spectral features only, ``spectral_profile``) and
   spec 2.0 (spectral + intensity, ``profile``), with each one's stages
   (``profile_timed``, via :func:`benchmarks.bench_intensity_cost.spec_costs`).
2. ``cxr-monitor fit --jobs 2`` on the 621 NIH images: < 30 s with a cold profile cache,
   < 3 s warm (a fresh temporary cache dir, the same command run twice).
3. Scoring keeps at most a few image-sized buffers alive: RSS and tracemalloc over 500
   ``Engine.score_bytes`` calls do not grow with the number of images scored.

Other engineers share the 2 cores, so every timing is a median of interleaved repeats and
carries the load average when it was taken. Run from the repository root:

    .venv/bin/python benchmarks/bench_profile.py [--repeats 15] [--score-calls 500]

Writes benchmarks/results/profile_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pyfftw
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_intensity_cost import spec_costs  # noqa: E402
from monitor.engine import Engine  # noqa: E402
from monitor.imaging import load_bytes  # noqa: E402
from monitor.spectrum import PROFILE_STAGES, SPEC_VERSION, SpectralProfiler  # noqa: E402

__all__ = ["dicom_16bit_bytes", "main", "png_bytes", "side_by_side"]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def png_bytes(pixels: np.ndarray, size: int, bits: int = 8) -> bytes:
    """Resize an 8-bit image to size x size (Lanczos) and encode it as an 8- or 16-bit PNG."""
    im = Image.fromarray(pixels.astype(np.uint8)).resize((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if bits == 16:
        arr = np.asarray(im, dtype=np.uint16) * 257  # spread 8 bits over the 16-bit range
        Image.fromarray(arr.astype(np.uint16)).save(buf, format="PNG")
    else:
        im.save(buf, format="PNG")
    return buf.getvalue()


def dicom_16bit_bytes(pixels: np.ndarray, size: int) -> bytes:
    """An uncompressed (Explicit VR Little Endian) 16-bit MONOCHROME2 CR DICOM of size x size."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage as CRImageStorage
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    im = Image.fromarray(pixels.astype(np.uint8)).resize((size, size), Image.Resampling.LANCZOS)
    arr = (np.asarray(im, dtype=np.uint16) * 257).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["cxr-monitor-bench", str(size)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.14, 0.14]
    ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _bare_fft(shape: tuple[int, int], effort: str = "FFTW_MEASURE", threads: int = 1) -> pyfftw.FFTW:
    src = pyfftw.empty_aligned(shape, dtype=np.float32)
    dst = pyfftw.empty_aligned((shape[0], shape[1] // 2 + 1), dtype=np.complex64)
    return pyfftw.FFTW(src, dst, axes=(0, 1), flags=(effort,), threads=threads)


def side_by_side(data: bytes, repeats: int, profiler: SpectralProfiler) -> dict[str, Any]:
    """Median decode, profile (spec 1 and spec 2.0), bare native FFTs (pyFFTW plan and numpy), interleaved.

    Each repeat runs every measurement once, in turn, so a burst of load from other users hits
    all of them alike; the ratio is computed per repeat and its median reported too.
    """
    image = load_bytes(data)
    img, bits = image.pixels, image.meta.bits_stored
    plan = _bare_fft(img.shape)
    last: dict[str, Any] = {}

    def decode() -> None:
        last["pixels"] = load_bytes(data).pixels

    def fft_pyfftw() -> None:
        plan.input_array[...] = last["pixels"]
        plan.execute()

    r = spec_costs(
        img,
        bits,
        profiler,
        repeats,
        extra={"decode": decode, "fft_pyfftw": fft_pyfftw, "fft_numpy": lambda: np.fft.rfft2(last["pixels"])},
    )
    t = {k: np.array(v) for k, v in r.pop("samples").items()}
    floor_w, floor_n = t["decode"] + t["fft_pyfftw"], t["decode"] + t["fft_numpy"]
    med = r["median_seconds"]
    return {
        **r,
        "bytes": len(data),
        "ratio_vs_pyfftw_floor": {s: float(np.median(t[s] / floor_w)) for s in ("spec1", "spec2")},
        "ratio_vs_numpy_floor": {s: float(np.median(t[s] / floor_n)) for s in ("spec1", "spec2")},
        "ratio_of_medians_pyfftw": {
            s: med[s] / (med["decode"] + med["fft_pyfftw"]) for s in ("spec1", "spec2")
        },
    }


def fit_cli(images: Path, outcomes: Path, threshold: float) -> dict[str, Any]:
    """Run `cxr-monitor fit --jobs 2` twice with one fresh cache dir: cold, then warm."""
    exe = Path(sys.executable).parent / "cxr-monitor"
    runs = []
    with tempfile.TemporaryDirectory(prefix="cxrm-bench-") as tmp:
        for label in ("cold", "warm"):
            cmd = [
                str(exe),
                "fit",
                "--images",
                str(images),
                "--outcomes",
                str(outcomes),
                "--out",
                str(Path(tmp) / "model"),
                "--threshold",
                repr(threshold),
                "--jobs",
                "2",
                "--cache-dir",
                str(Path(tmp) / "cache"),
                "--json",
            ]
            la = loadavg()
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            secs = time.perf_counter() - t0
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            # CPU time of the reaped process tree: what the fit costs independent of how many
            # other users share the cores (wall time / CPU time ~ 2 on an idle 2-core machine at best).
            cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
            if proc.returncode != 0:
                raise SystemExit(f"fit failed ({label}): {proc.stderr[-2000:]}")
            runs.append(
                {
                    "cache": label,
                    "seconds": secs,
                    "cpu_seconds": cpu,
                    "loadavg_before": la,
                    "loadavg_after": loadavg(),
                }
            )
    return {"command": "cxr-monitor fit --jobs 2 --cache-dir <fresh temp dir> (run twice)", "runs": runs}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def scoring_memory(model_dir: Path, blobs: list[bytes], calls: int) -> dict[str, Any]:
    """RSS and tracemalloc while scoring ``calls`` images one by one through Engine.score_bytes."""
    engine = Engine.from_directory(model_dir)
    for b in blobs[:5]:
        engine.score(b)  # plans, lru caches and lazy imports before the baseline
    gc.collect()
    rss, traced = [], []
    tracemalloc.start()
    base_traced = tracemalloc.get_traced_memory()[0]
    rss0 = _rss_bytes()
    for i in range(calls):
        engine.score(blobs[i % len(blobs)])
        if (i + 1) % 50 == 0:
            rss.append(_rss_bytes())
            traced.append(tracemalloc.get_traced_memory()[0] - base_traced)
    peak = tracemalloc.get_traced_memory()[1] - base_traced
    tracemalloc.stop()
    image_bytes = 1024 * 1024 * 4  # one float32 1024x1024 image
    return {
        "calls": calls,
        "checkpoints_every": 50,
        "rss_mib": [round(r / 2**20, 1) for r in rss],
        "rss_start_mib": round(rss0 / 2**20, 1),
        "rss_growth_first_to_last_checkpoint_mib": round((rss[-1] - rss[0]) / 2**20, 2),
        "traced_live_mib": [round(t / 2**20, 2) for t in traced],
        "traced_peak_mib": round(peak / 2**20, 1),
        "traced_peak_in_float32_1024_images": round(peak / image_bytes, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--score-calls", type=int, default=500)
    ap.add_argument("--skip-fit", action="store_true", help="skip the cold/warm CLI fit")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    nih = DATA / "nih"
    rows = list(csv.DictReader((nih / "labels.csv").open()))
    src = np.asarray(Image.open(nih / "images" / rows[0]["image"]).convert("L"))
    profiler = SpectralProfiler()
    res: dict[str, Any] = {"loadavg_start": loadavg(), "cpu_count": os.cpu_count()}
    cases = {
        "png8_1024": png_bytes(src, 1024),
        "webp8_1024_native_nih": (nih / "images" / rows[0]["image"]).read_bytes(),
        "dicom16_2048_uncompressed": dicom_16bit_bytes(src, 2048),
        "png16_2048": png_bytes(src, 2048, bits=16),
    }
    res["ratio"] = {}
    for name, blob in cases.items():
        r = side_by_side(blob, args.repeats, profiler)
        res["ratio"][name] = r
        print(f"[bench] {name}: ratio {r['ratio_vs_pyfftw_floor']} {r['median_seconds']}", file=sys.stderr)

    if not args.skip_fit:
        outcomes = ROOT / "models" / "default-outcomes.csv"
        sys.path.insert(0, str(ROOT))
        from benchmarks.evaluation import youden_threshold

        with outcomes.open() as fh:
            oc = list(csv.DictReader(fh))
        thr = youden_threshold(
            np.array([int(r["label"]) for r in oc]), np.array([float(r["score"]) for r in oc])
        )
        res["fit"] = fit_cli(nih / "images", outcomes, thr)
        print(f"[bench] fit: {[round(r['seconds'], 1) for r in res['fit']['runs']]}", file=sys.stderr)

    blobs = [(nih / "images" / r["image"]).read_bytes() for r in rows[:50]]
    res["scoring_memory"] = scoring_memory(ROOT / "models" / "default", blobs, args.score_calls)
    res["loadavg_end"] = loadavg()
    res["versions"] = {"pyfftw": pyfftw.__version__, "numpy": np.__version__, "profile_spec": SPEC_VERSION}
    (out_dir / "profile_speed.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out_dir / "profile_speed.md")
    print(json.dumps({k: v["ratio_vs_pyfftw_floor"] for k, v in res["ratio"].items()}))
    return 0


def write_markdown(res: dict[str, Any], path: Path) -> None:
    L = ["# Core speed targets (issue 2)\n"]
    a = L.append
    a(
        f"`python benchmarks/bench_profile.py`; 2-core machine shared with other engineers: load average "
        f"{res['loadavg_start']} at start, {res['loadavg_end']} at end. Medians of interleaved repeats.\n"
    )
    a("## Profile vs decode + one bare native real FFT (target: ratio ≤ 1.0)\n")
    a(
        "`ratio` = median over repeats of profile / (decode + bare FFT); the floor's FFT is a cached "
        "pyFFTW plan (FFTW_MEASURE, 1 thread, float32 → complex64) of the *native* image; the numpy "
        "column uses numpy.fft.rfft2 instead (a slower floor, so a lower ratio). Spec 1 = the spectral "
        "features only (`SpectralProfiler.spectral_profile`: the profile before spec 2.0); spec 2.0 = "
        "spectral + intensity (`SpectralProfiler.profile`); both measured in the same loop.\n"
    )
    a(
        "| image | shape | decode ms | profile ms (spec 1 / 2.0) | bare FFT ms (pyFFTW / numpy) | "
        "ratio, pyFFTW floor (spec 1 / 2.0) | ratio, numpy floor (spec 1 / 2.0) | met? | load |"
    )
    a("|---|---|---|---|---|---|---|---|---|")
    for name, r in res["ratio"].items():
        m = r["median_seconds"]
        rw, rn = r["ratio_vs_pyfftw_floor"], r["ratio_vs_numpy_floor"]
        a(
            f"| {name} | {r['shape'][0]}x{r['shape'][1]} | {1e3 * m['decode']:.1f} | "
            f"{1e3 * m['spec1']:.1f} / {1e3 * m['spec2']:.1f} | "
            f"{1e3 * m['fft_pyfftw']:.1f} / {1e3 * m['fft_numpy']:.1f} | {rw['spec1']:.2f} / {rw['spec2']:.2f} | "
            f"{rn['spec1']:.2f} / {rn['spec2']:.2f} | {'yes' if rw['spec2'] <= 1.0 else 'NO'} | {r['loadavg'][0]} |"
        )
    a("\n### Where the spec 2.0 profile's time goes (`SpectralProfiler.profile_timed`, ms, medians)\n")
    a(
        "The `intensity` stage is what spec 2.0 adds to spec 1. (The JSON also holds `intensity_seconds`, "
        "the difference of the two profiles' medians: under load it is mostly noise.)\n"
    )
    a("| image | " + " | ".join(PROFILE_STAGES) + " |")
    a("|---|" + "---|" * len(PROFILE_STAGES))
    for name, r in res["ratio"].items():
        st = r["stages_spec2"]
        a(f"| {name} | " + " | ".join(f"{1e3 * st[k]:.2f}" for k in PROFILE_STAGES) + " |")
    a("")
    if "fit" in res:
        a("## Fit on the 621 NIH images (targets: cold < 30 s, warm < 3 s)\n")
        a(f"`{res['fit']['command']}`\n")
        a(
            "`cpu s` = user + system CPU seconds of the CLI process and its reaped workers: the cost "
            "independent of how busy the shared cores are (on an idle 2-core machine the wall time can be "
            "as low as about cpu s / 2 for the parallel profiling part and cpu s for the serial rest).\n"
        )
        a("| cache | wall seconds | cpu s | target (wall) | met? | load before → after |")
        a("|---|---|---|---|---|---|")
        for r in res["fit"]["runs"]:
            target = 30.0 if r["cache"] == "cold" else 3.0
            a(
                f"| {r['cache']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | < {target:.0f} | "
                f"{'yes' if r['seconds'] < target else 'NO'} | "
                f"{r['loadavg_before'][0]} → {r['loadavg_after'][0]} |"
            )
        a("")
    s = res["scoring_memory"]
    a("## Scoring memory over repeated `Engine.score_bytes` calls\n")
    a(
        f"{s['calls']} calls on 50 NIH WebP images (1024x1024) in turn, after 5 warm-up calls. RSS at start "
        f"{s['rss_start_mib']} MiB; RSS every {s['checkpoints_every']} calls: {s['rss_mib']} MiB "
        f"(growth first → last checkpoint {s['rss_growth_first_to_last_checkpoint_mib']} MiB). tracemalloc live "
        f"(Python-allocated, incl. numpy) at each checkpoint: {s['traced_live_mib']} MiB; peak during a call "
        f"{s['traced_peak_mib']} MiB = {s['traced_peak_in_float32_1024_images']} float32 1024² images.\n"
    )
    path.write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    sys.exit(main())
