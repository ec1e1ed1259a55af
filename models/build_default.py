"""Rebuild models/default exactly: the NIH ChestX-ray14 subset with real CheXNet outputs.

Task: abnormal (any of the 14 findings) versus `No Finding`. The classifier's score
for "abnormal" is the largest of its 14 finding probabilities; its decision
threshold is the one that maximises Youden's J (sensitivity + specificity - 1) on
these 621 images, so the decision is as good as this score allows. A failure is a
wrong decision. Run from the repository root:

    python models/build_default.py [--data ../shared/data/nih] [--jobs 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from monitor.fitting import fit_folder
from monitor.reliability import youden_threshold

HERE = Path(__file__).resolve().parent
TASK = "abnormal (any NIH finding) vs No Finding; score = max of the 14 CheXNet probabilities"


def write_outcomes(labels_csv: Path, out_csv: Path) -> float:
    """Write the outcomes table; return the Youden threshold of the scores *as written*.

    The threshold is computed from the rounded scores in the table so that the fit,
    which reads the table, takes exactly the decisions the threshold was chosen for.
    """
    rows = list(csv.DictReader(labels_csv.open()))
    finding_cols = [c for c in rows[0] if c.startswith("chexnet_")]
    keep = ["view", "sex", "age", "pixel_spacing_mm", "original_width", "original_height", "findings"]
    with out_csv.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["image", "label", "score", *keep])
        for r in rows:
            score = max(float(r[c]) for c in finding_cols)
            w.writerow(
                [r["image"], int(r["findings"] != "No Finding"), f"{score:.8g}", *(r[k] for k in keep)]
            )
    written = list(csv.DictReader(out_csv.open()))
    labels = np.array([int(r["label"]) for r in written])
    scores = np.array([float(r["score"]) for r in written])
    return youden_threshold(labels, scores)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "nih"))
    ap.add_argument("--out", default=str(HERE / "default"))
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    data = Path(args.data)
    outcomes = HERE / "default-outcomes.csv"
    threshold = write_outcomes(data / "labels.csv", outcomes)
    report = fit_folder(
        data / "images",
        outcomes,
        args.out,
        threshold=threshold,
        seed=0,
        jobs=args.jobs,
        cache_dir=None,
        strict=True,
        progress=True,
        card={
            "name": "default",
            "task": TASK,
            "threshold_rule": "Youden's J on the fit set",
            "failure": "the thresholded decision differs from the NIH label",
            "data": "NIH ChestX-ray14, 621 test-split images (one per patient), 1024x1024",
            "classifier": "DenseNet-121 CheXNet reproduction (J. Zech), real out-of-sample outputs",
        },
    )
    rates = report.model.rates.to_json()
    print(
        json.dumps(
            {
                "model_id": report.model.model_id,
                "threshold": threshold,
                "global_rate": rates["global_rate"],
                "chi2_p": rates["chi2_p"],
                "cramers_v": rates["cramers_v"],
                "seconds": round(report.seconds, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
