"""The cxr-monitor command line, end to end on real images (in-process, through main())."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from monitor.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "default"


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def nih_subset(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """40 NIH images (linked into a folder) and an outcomes table with label+score+metadata."""
    rows = list(csv.DictReader((data_dir / "nih" / "labels.csv").open()))[:40]
    folder = tmp_path_factory.mktemp("nih40")
    images = folder / "images"
    images.mkdir()
    for r in rows:
        (images / r["image"]).symlink_to(data_dir / "nih" / "images" / r["image"])
    cols = [c for c in rows[0] if c.startswith("chexnet_")]
    outcomes = folder / "outcomes.csv"
    with outcomes.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "score", "view", "sex"])
        for r in rows:
            w.writerow(
                [
                    r["image"],
                    int(r["findings"] != "No Finding"),
                    max(float(r[c]) for c in cols),
                    r["view"],
                    r["sex"],
                ]
            )
    return images, outcomes


def test_help_reads_like_a_man_page(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("profile", "fit", "score", "drift", "info", "exit status", "CXR_MONITOR_MODEL"):
        assert word in out
    for command in ("profile", "fit", "score", "drift", "info"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "example" in capsys.readouterr().out


def test_profile_json(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dcm = data_dir / "dicom" / "cxr_pa_monochrome2_jpeg.dcm"
    assert main(["profile", str(dcm), "--json"]) == 0
    (obj,) = _json_lines(capsys.readouterr().out)
    assert obj["image"] == str(dcm)
    assert len(obj["features"]) == 42
    assert all(np.isfinite(v) for v in obj["features"].values())
    assert "spectral_slope_high" in obj["features"]


def test_profile_reports_bad_file_and_goes_on(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    good = data_dir / "dicom" / "cxr_pa_monochrome2_jpeg.dcm"
    assert main(["profile", str(bad), str(good), "--json"]) == 1
    captured = capsys.readouterr()
    assert len(_json_lines(captured.out)) == 1
    assert "notes.png" in captured.err and "error:" in captured.err


def test_score_default_model_json(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = [str(p) for p in sorted((data_dir / "dicom").glob("*.dcm"))]
    assert main(["score", "--model", str(DEFAULT_MODEL), *paths, "--json"]) == 0
    objs = _json_lines(capsys.readouterr().out)
    assert [o["image"] for o in objs] == paths
    for o in objs:
        for key in ("image", "cluster", "reliability", "failure_probability", "novelty", "is_novel"):
            assert key in o
        lo, hi = o["failure_interval"]
        assert 0 <= lo <= hi <= 1
        # Trusted: the point value; novel or out of scope: the lower end of its interval.
        assert o["reliability"] == pytest.approx(1 - o["failure_probability"] if o["trusted"] else 1 - hi)
        assert o["trusted"] == (not o["is_novel"] and not o["out_of_scope"])


def test_drift_on_kermany_against_nih_model(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kermany = sorted((data_dir / "kermany" / "test" / "NORMAL").glob("*.jpeg"))[:40]
    assert main(["drift", "--model", str(DEFAULT_MODEL), *map(str, kermany), "--json"]) == 0
    obj = _json_lines(capsys.readouterr().out)[0]
    expected = {"n_images", "drift", "psi", "js_distance", "chi2_p", "novelty_rate", "estimated_failure_rate"}
    assert expected | {"top_shifted_features", "thresholds"} <= set(obj)
    assert obj["n_images"] == 40
    assert obj["drift"] is True
    assert obj["novelty_rate"] > 0.5


def test_fit_then_score_with_classifier_scores(
    nih_subset: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, outcomes = nih_subset
    out = tmp_path / "model"
    cache = tmp_path / "cache"
    argv = ["fit", "--images", str(images), "--outcomes", str(outcomes), "--out", str(out)]
    argv += [
        "--clusters",
        "2",
        "--min-cluster-size",
        "3",
        "--threshold",
        "0.2",
        "--cache-dir",
        str(cache),
        "--json",
    ]
    assert main(argv) == 0
    first = _json_lines(capsys.readouterr().out)[0]
    assert first["n_fitted"] == 40 and first["n_skipped"] == 0 and first["cache_hits"] == 0
    assert first["n_clusters"] == 2
    assert sum(c["n_images"] for c in first["clusters"]) == 40

    # A refit reads every profile from the cache and gives the same model.
    assert main(argv) == 0
    second = _json_lines(capsys.readouterr().out)[0]
    assert second["cache_hits"] == 40
    assert second["model_id"] == first["model_id"]

    name = sorted(images.iterdir())[0].name
    scores = tmp_path / "scores.csv"
    scores.write_text(f"image,score\n{name},0.9\n")
    assert main(["score", "--model", str(out), str(images / name), "--scores", str(scores), "--json"]) == 0
    obj = _json_lines(capsys.readouterr().out)[0]
    assert obj["method"] == "calibrated_score"
    assert main(["info", "--model", str(out), "--json"]) == 0
    info = _json_lines(capsys.readouterr().out)[0]
    assert info["model_id"] == first["model_id"]


def test_fit_skips_missing_image_or_aborts_when_strict(
    nih_subset: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, outcomes = nih_subset
    table = outcomes.read_text().splitlines()
    table.append("missing.webp,1,0.5,PA,M")
    broken = tmp_path / "outcomes.csv"
    broken.write_text("\n".join(table) + "\n")
    argv = ["fit", "--images", str(images), "--outcomes", str(broken), "--out", str(tmp_path / "m")]
    argv += ["--clusters", "2", "--min-cluster-size", "3", "--no-cache"]
    assert main([*argv, "--json"]) == 1
    captured = capsys.readouterr()
    obj = _json_lines(captured.out)[0]
    assert obj["n_skipped"] == 1 and obj["skipped"][0]["image"].endswith("missing.webp")
    assert "missing.webp" in captured.err
    assert main([*argv, "--strict"]) == 3
    assert "1 of 41 images failed to load (--strict)" in capsys.readouterr().err


def test_fit_rejects_bad_outcomes_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "o.csv"
    table.write_text("file,failure\na.png,1\n")
    (tmp_path / "imgs").mkdir()
    assert (
        main(["fit", "--images", str(tmp_path / "imgs"), "--outcomes", str(table), "--out", str(tmp_path)])
        == 3
    )
    assert "no 'image' column (columns: file, failure)" in capsys.readouterr().err


def test_missing_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(tmp_path / "nope")]) == 3
    assert "model directory not found" in capsys.readouterr().err


def test_usage_error_exit_code() -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["fit"])
    assert exc.value.code == 2


def test_score_exit_status_partial_or_error(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression (issue 9, defect 8): every input failing was 'partial' (1), not an error (3)."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    good = data_dir / "nih" / "images" / "00000075_000.webp"
    assert main(["score", str(bad), str(good), "--json"]) == 1
    assert main(["score", str(bad), str(tmp_path / "missing.png")]) == 3
    assert main(["drift", str(bad)]) == 3
    err = capsys.readouterr().err
    assert "bad.png: not a readable image" in err and "no image could be scored" in err


@pytest.mark.parametrize("command", [["score"], ["drift"], ["client", "score"]])
def test_empty_folder_error_names_the_folder(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression (issue 9, defect 8): "no image files given" did not say where nothing was found."""
    empty = tmp_path / "scans"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert main([*command, str(empty)]) == 3
    err = capsys.readouterr().err
    assert f"no image files in {empty} (looked for .dcm, .dicom, " in err


def test_drift_names_a_brightness_change_as_intensity_drift(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 40 NIH images at 0.7 x their gain: invisible to the spectrum, seen by the intensity component.
    from PIL import Image

    paths = []
    for src in sorted((data_dir / "nih" / "images").glob("*.webp"))[:40]:
        with Image.open(src) as im:
            dark = (np.asarray(im.convert("L"), dtype=np.float32) * 0.7).round().astype(np.uint8)
        paths.append(tmp_path / f"{src.stem}.png")
        Image.fromarray(dark).save(paths[-1])
    assert main(["drift", "--model", str(DEFAULT_MODEL), *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "DRIFT" in out.splitlines()[0]
    assert "intensity distribution shifted: intensity_" in out
    assert "intensity DRIFT" in out
