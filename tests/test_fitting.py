"""Tests for monitor.fitting: the outcomes table and the offline fit from a folder of real radiographs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from monitor.artifact import load_model
from monitor.errors import InvalidInputError
from monitor.fitting import fit_folder, read_outcomes


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- read_outcomes


def test_failure_column(tmp_path: Path) -> None:
    table = read_outcomes(
        _csv(tmp_path / "o.csv", "image,failure,site\na.png,1,x\nb.png,0,y\nc.png,true,z\n")
    )
    assert table.images == ["a.png", "b.png", "c.png"]
    assert table.failures.tolist() == [1, 0, 1]
    assert table.labels is None and table.scores is None and table.threshold is None
    assert table.metadata == [{"site": "x"}, {"site": "y"}, {"site": "z"}]


@pytest.mark.parametrize(("threshold", "expected_t"), [(None, 0.5), (0.3, 0.3), (0.9, 0.9)])
def test_label_and_score(tmp_path: Path, threshold: float | None, expected_t: float) -> None:
    labels = [1, 1, 0, 0, 1, 0]
    scores = [0.95, 0.4, 0.6, 0.1, 0.5, 0.3]
    rows = "".join(f"i{k}.png,{y},{s}\n" for k, (y, s) in enumerate(zip(labels, scores, strict=True)))
    table = read_outcomes(_csv(tmp_path / "o.csv", "image,label,score\n" + rows), threshold=threshold)
    assert table.threshold == expected_t
    assert table.labels.tolist() == labels
    np.testing.assert_array_equal(table.scores, scores)
    expected = [int((s >= expected_t) != y) for y, s in zip(labels, scores, strict=True)]
    assert table.failures.tolist() == expected


def test_failure_column_wins_over_label_and_score(tmp_path: Path) -> None:
    table = read_outcomes(_csv(tmp_path / "o.csv", "image,failure,label,score\na.png,0,1,0.1\n"))
    assert table.failures.tolist() == [0]
    assert table.labels.tolist() == [1] and table.threshold == 0.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,failure\na.png,1\n", r"no 'image' column \(columns: name, failure\)"),
        ("", r"no 'image' column \(columns: none\)"),
        ("image,label\na.png,1\n", r"needs a 'failure' column, or 'label' and 'score' columns"),
        ("image,score\na.png,0.4\n", r"needs a 'failure' column, or 'label' and 'score' columns"),
        ("image,failure\n", r"the outcomes table has no rows"),
        ("image,failure\na.png,1\nb.png,2\n", r"row 3: column 'failure' must be 0 or 1, got '2'"),
        ("image,failure\na.png,yes\n", r"row 2: column 'failure' must be 0 or 1, got 'yes'"),
        ("image,label,score\na.png,0.5,0.2\n", r"row 2: column 'label' must be 0 or 1, got '0.5'"),
        ("image,failure\na.png,1\nb.png,0\na.png,0\n", r"row 4: image 'a.png' is listed twice"),
        ("image,failure\n,1\n", r"row 2: empty 'image'"),
        ("image,label,score\na.png,1,1.2\n", r"column 'score' must hold probabilities in \[0, 1\]"),
        ("image,label,score\na.png,1,-0.1\n", r"column 'score' must hold probabilities in \[0, 1\]"),
        ("image,label,score\na.png,1,high\n", r"column 'score' must be numeric"),
    ],
)
def test_outcomes_validation(tmp_path: Path, text: str, message: str) -> None:
    path = _csv(tmp_path / "outcomes.csv", text)
    with pytest.raises(InvalidInputError, match=message) as info:
        read_outcomes(path)
    assert str(path) in str(info.value)


def test_nan_score_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"column 'score' must hold probabilities in \[0, 1\]"):
        read_outcomes(_csv(tmp_path / "o.csv", "image,label,score\na.png,1,nan\n"))


def test_missing_table(tmp_path: Path) -> None:
    with pytest.raises(
        InvalidInputError, match=r"cannot read the outcomes table \(No such file or directory\)"
    ):
        read_outcomes(tmp_path / "absent.csv")


# --------------------------------------------------------------------------- fit_folder on real images

N_IMAGES = 60


@pytest.fixture(scope="module")
def nih_outcomes(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    """The first 60 NIH images with real CheXNet outcomes, plus one row whose image does not exist."""
    rows = list(csv.DictReader((data_dir / "nih" / "labels.csv").open()))[:N_IMAGES]
    finding_cols = [c for c in rows[0] if c.startswith("chexnet_")]
    out = tmp_path_factory.mktemp("fit") / "outcomes.csv"
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "score", "view", "sex"])
        for r in rows:
            score = max(float(r[c]) for c in finding_cols)
            w.writerow([r["image"], int(r["findings"] != "No Finding"), f"{score:.6f}", r["view"], r["sex"]])
        w.writerow(["does_not_exist.webp", 1, "0.9", "PA", "F"])
    return data_dir / "nih" / "images", out, rows


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_fit_folder_skips_and_reports_missing_image(nih_outcomes, cache_dir: Path, tmp_path: Path) -> None:
    images, outcomes, rows = nih_outcomes
    report = fit_folder(
        images,
        outcomes,
        tmp_path / "model",
        threshold=0.2,
        n_clusters=2,
        working_size=256,
        cache_dir=cache_dir,
    )
    assert report.n_listed == N_IMAGES + 1
    assert report.n_fitted == N_IMAGES
    assert len(report.errors) == 1
    path, reason = report.errors[0]
    assert path.endswith("does_not_exist.webp")
    assert reason.endswith("cannot read (No such file or directory)")
    model = report.model
    assert model.n_clusters == 2
    assert model.profiler.working_size == 256
    assert model.calibrator is not None and model.calibrator.threshold == 0.2
    summary = model.card["fit_data"]
    assert summary["n_listed"] == N_IMAGES + 1 and summary["n_failed_to_load"] == 1
    table = read_outcomes(outcomes, threshold=0.2)
    assert summary["n_failures"] == int(table.failures[:N_IMAGES].sum())
    assert summary["outcome_columns"] == "label+score" and summary["threshold"] == 0.2
    assert int(model.rates.failures_.sum()) == summary["n_failures"]
    records = model.fit_records
    assert [r["image"] for r in records] == [r["image"] for r in rows]
    assert records[0]["view"] == rows[0]["view"] and records[0]["sex"] == rows[0]["sex"]
    assert records[0]["img_format"] == "webp" and records[0]["img_rows"] == 1024
    assert {"cluster", "failure"} <= set(records[0])
    # What was saved is what was fitted.
    back = load_model(tmp_path / "model")
    assert back.model_id == model.model_id
    assert back.score(model.fit_profiles[:5]) == model.score(model.fit_profiles[:5])


def test_fit_folder_strict_refuses_missing_image(nih_outcomes, cache_dir: Path, tmp_path: Path) -> None:
    images, outcomes, _ = nih_outcomes
    with pytest.raises(
        InvalidInputError, match=r"1 of 61 images failed to load \(--strict\): .*does_not_exist"
    ):
        fit_folder(
            images, outcomes, tmp_path / "m", n_clusters=2, working_size=256, cache_dir=cache_dir, strict=True
        )
    assert not (tmp_path / "m").exists()


def test_fit_folder_reuses_the_cache(nih_outcomes, cache_dir: Path, tmp_path: Path) -> None:
    images, outcomes, _ = nih_outcomes
    first = fit_folder(images, outcomes, tmp_path / "a", n_clusters=2, working_size=256, cache_dir=cache_dir)
    second = fit_folder(images, outcomes, tmp_path / "b", n_clusters=2, working_size=256, cache_dir=cache_dir)
    assert second.cache_hits == N_IMAGES
    assert second.model.model_id == first.model.model_id
    assert (tmp_path / "a" / "arrays.npz").read_bytes() == (tmp_path / "b" / "arrays.npz").read_bytes()


def test_fit_folder_needs_the_folder(tmp_path: Path) -> None:
    outcomes = _csv(tmp_path / "o.csv", "image,failure\na.png,1\n")
    with pytest.raises(InvalidInputError, match=r"nowhere: image folder not found"):
        fit_folder(tmp_path / "nowhere", outcomes, tmp_path / "m")


def test_fit_folder_small_working_size(nih_outcomes, cache_dir: Path, tmp_path: Path) -> None:
    images, outcomes, _ = nih_outcomes
    report = fit_folder(images, outcomes, tmp_path / "m", n_clusters=2, working_size=128, cache_dir=cache_dir)
    assert report.model.profiler.working_size == 128


def test_short_row_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"row 2: .*'failure'"):
        read_outcomes(_csv(tmp_path / "o.csv", "image,failure\na.png\n"))


def test_utf8_bom_table(tmp_path: Path) -> None:
    path = tmp_path / "o.csv"
    path.write_bytes(b"\xef\xbb\xbfimage,failure\na.png,1\n")
    assert read_outcomes(path).images == ["a.png"]
