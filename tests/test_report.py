"""Tests of monitor.report: content of the HTML/Markdown report, figures API, CLI.

Most tests use a small model fitted on synthetic profiles with three known
clusters: 0 the baseline, 1 with 50% more energy in every band at or above
64 cycles/image and a high failure rate (a blind spot), 2 blocky (JPEG) with a
stronger periodic peak.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monitor.artifact import load_model, save_model
from monitor.cli import main
from monitor.clustering import SpectralClusterer
from monitor.model import ReliabilityModel
from monitor.reliability import cramers_v
from monitor.report import describe_cluster, metadata_composition
from monitor.report.figures import (
    cluster_profile_figure,
    map_figure,
    profiles_figure,
    rates_figure,
    select_thumbnails,
    thumbnails_figure,
)
from monitor.report.files import write_report
from monitor.report.render import build_report, fmt_interval, fmt_p, fmt_rate, fmt_v
from monitor.report.to_html import render_html
from monitor.spectrum import SpectralProfiler

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZES = (120, 100, 80)


def _synthetic(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[dict], SpectralProfiler]:
    profiler = SpectralProfiler()
    names = profiler.feature_names
    e = profiler.band_edges
    centres = np.sqrt(e[:-1] * e[1:])
    rng = np.random.default_rng(seed)
    base = np.zeros(len(names))
    base[: len(centres)] = -0.4 - 1.3 * np.log10(centres)
    base[names.index("spectral_slope_mid")] = -3.0
    base[names.index("spectral_slope_high")] = -3.2
    base[names.index("peak_to_band_mean_high")] = 1.2
    groups, failures, records = [], [], []
    high = np.flatnonzero(centres >= 64)
    fail_rate = (0.2, 0.6, 0.2)
    for g, n in enumerate(SIZES):
        X = base + rng.normal(0, 0.05, size=(n, len(names)))
        if g == 1:
            X[:, high] += np.log10(1.5)
        if g == 2:
            X[:, names.index("jpeg_blockiness")] += 0.3
            X[:, names.index("peak_to_band_mean_high")] += 0.4
        groups.append(X)
        f = np.zeros(n, dtype=int)
        f[: int(round(fail_rate[g] * n))] = 1
        failures.append(f)
        for i in range(n):
            records.append(
                {
                    "image": f"g{g}_{i:03d}.png",
                    "view": "AP" if (g == 2 and i % 4) else "PA",
                    "sex": "F" if i % 2 else "M",
                    "age": str(20 + (i * 7) % 70),
                    "patient_id": f"P{g}{i:04d}",
                    "site": "" if i % 10 == 0 else ("A&B <north>" if g == 0 else "south"),
                    "findings": "Effusion|Mass" if i % 3 == 0 else ("No Finding" if i % 3 == 1 else "Mass"),
                    "img_format": "png",
                }
            )
    return np.vstack(groups), np.concatenate(failures), records, profiler


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    X, failures, records, profiler = _synthetic()
    model = ReliabilityModel.fit(
        X,
        failures,
        profiler=profiler,
        clusterer=SpectralClusterer(n_clusters=3, random_state=0),
        records=records,
        card={"task": "synthetic <task>", "data": "synthetic profiles"},
    )
    out = tmp_path_factory.mktemp("model")
    save_model(model, out)
    return out


@pytest.fixture(scope="module")
def model(model_dir: Path) -> ReliabilityModel:
    return load_model(model_dir)


@pytest.fixture(scope="module")
def html_text(model: ReliabilityModel, model_dir: Path) -> str:
    return render_html(build_report(model, model_path=model_dir))


def _section(html: str, anchor: str) -> str:
    start = html.index(f'id="{anchor}"')
    nxt = html.find("<h2", html.index("</h2>", start))
    return html[start : nxt if nxt > 0 else len(html)]


def test_synthetic_clusters_are_the_groups(model: ReliabilityModel) -> None:
    # The assertions below rely on cluster c being synthetic group c.
    truth = np.repeat(np.arange(3), SIZES)
    got = np.array([r["cluster"] for r in model.fit_records])
    assert (got == truth).mean() > 0.97
    assert list(model.rates.blind_spot_) == [False, True, False]


def test_describe_names_the_injected_differences(model: ReliabilityModel) -> None:
    d1 = describe_cluster(model, 1)
    top = d1.findings[0]
    assert top.key == "energy_fine"
    pct = float(re.match(r"([+-]\d+)% high-frequency energy", top.change).group(1))
    # +log10(1.5) in a third of the images: cluster minus fit-set mean = 2/3 * log10(1.5) -> +31%.
    assert 26 <= pct <= 36
    assert "edge enhancement or noise" in top.meaning
    d2 = describe_cluster(model, 2)
    keys = [f.key for f in d2.findings]
    assert "jpeg_blockiness" in keys and "peak_to_band_mean_high" in keys
    assert any("JPEG compression" in f.text for f in d2.findings)
    assert any("grid lines or stripes" in f.text for f in d2.findings)
    assert all(abs(f.z) >= 0.5 for f in d1.findings + d2.findings)
    with pytest.raises(Exception, match=r"cluster must be an integer in \[0, 3\)"):
        describe_cluster(model, 3)


def test_metadata_composition_handles_arbitrary_columns(model: ReliabilityModel) -> None:
    comp = metadata_composition(model)
    tables = {t.column: t for t in comp.tables}
    assert {"view", "sex", "age", "site", "findings"} <= set(tables)
    assert "patient_id" in comp.skipped  # identifiers: too many distinct values
    assert comp.constant == {"file format": "png"}
    view = tables["view"]
    assert view.cramers_v == pytest.approx(cramers_v(view.counts))
    assert view.counts.sum() == sum(SIZES)
    assert tables["site"].n_missing == sum((n + 9) // 10 for n in SIZES)
    assert tables["age"].kind == "binned" and set(tables["age"].categories) <= {
        "20-39",
        "40-59",
        "60-79",
        "80+",
    }
    findings = tables["findings"]
    assert findings.kind == "multi-label" and findings.cramers_v is None
    mass = findings.categories.index("Mass")
    assert findings.category_sizes[mass] == sum(1 for r in model.fit_records if "Mass" in r["findings"])
    # Ordered by association with the cluster: view (cluster 2 is mostly AP) before sex.
    order = [t.column for t in comp.tables]
    assert order.index("view") < order.index("sex")


def test_html_states_the_models_numbers(model: ReliabilityModel, html_text: str) -> None:
    r = model.rates
    for anchor in (
        "summary",
        "rates",
        "map",
        "spectra",
        "metadata",
        "cluster-0",
        "cluster-1",
        "cluster-2",
        "about",
    ):
        assert f'id="{anchor}"' in html_text
    summary = _section(html_text, "summary")
    assert f"{fmt_rate(r.global_rate_)} ({int(r.failures_.sum())} of {int(r.counts_.sum())})" in summary
    assert f"p = {fmt_p(r.chi2_p_)}" in summary and f"G-test p = {fmt_p(r.g_p_)}" in summary
    assert f"Cramér&#x27;s V = {fmt_v(r.cramers_v_)}" in summary
    assert model.model_id in summary and "Spectral profile spec" in summary
    assert "synthetic &lt;task&gt;" in summary  # card text is escaped
    assert "scikit-learn" in summary  # library versions
    assert "Scope (DICOM headers)" in summary and "modalities: CR, DR, DX, RG" in summary
    assert "not trusted" in summary
    rates = _section(html_text, "rates")
    rows = re.findall(r"<tr( class=\"\w+\")?>(.*?)</tr>", rates, flags=re.S)[1:]
    assert len(rows) == 3
    for c, (cls, row) in enumerate(rows):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        assert f"C{c}</a>" in cells[0]
        assert cells[1] == str(r.counts_[c]) and cells[3] == str(r.failures_[c])
        assert cells[5] == fmt_rate(r.rate_[c])
        assert cells[6] == fmt_interval(r.lower_[c], r.upper_[c])
        assert cells[8] == fmt_p(r.q_value_[c])
        assert (cells[9] == "blind spot") == bool(r.blind_spot_[c])
        assert (cls == ' class="blind"') == bool(r.blind_spot_[c])
    c1 = _section(html_text, "cluster-1")
    assert '<span class="badge blind">blind spot</span>' in c1
    assert fmt_interval(r.lower_[1], r.upper_[1]) in c1
    assert "high-frequency energy" in c1
    assert "badge blind" not in _section(html_text, "cluster-0")
    assert "Cluster 1 is a blind spot" in html_text


def test_html_is_self_contained(html_text: str) -> None:
    assert not re.search(r"https?://", html_text)
    assert "<script" not in html_text.lower() and "<link" not in html_text.lower()
    assert "@import" not in html_text and "url(" not in html_text
    srcs = re.findall(r'src="([^"]*)"', html_text)
    # rates, map, spectra + one spectrum per cluster (no thumbnails without --images)
    assert len(srcs) == 3 + 3
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_SIGNATURE)
    assert "A&amp;B &lt;north&gt;" in html_text and "<north>" not in html_text


def _write_png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size=(80, 70), dtype=np.uint8)).save(path)


def test_cli_report_with_some_images_missing(
    model: ReliabilityModel, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    typical, fails = select_thumbnails(model, 1, n=3)
    wanted = sorted(set(typical + fails))
    for k, i in enumerate(wanted[1:]):  # the first selected image is left missing
        _write_png(images / model.fit_records[i]["image"], k)
    out = tmp_path / "r.html"
    code = main(
        ["report", "--model", str(model_dir), "--out", str(out), "--images", str(images), "--thumbnails", "3"]
    )
    err = capsys.readouterr().err
    assert code == 1  # partial: report written, some thumbnails missing
    html = out.read_text()
    assert 'id="fig-cluster1-images"' in html and 'id="fig-cluster0-images"' in html
    missing_name = model.fit_records[wanted[0]]["image"]
    assert missing_name in err and missing_name in html
    assert "could not be loaded" in html
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 6 + 3


def test_cli_markdown_writes_referenced_pngs(
    model: ReliabilityModel, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sub" / "report.md"  # format from the suffix
    assert main(["report", "--model", str(model_dir), "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["blind_spots"], info["missing_images"]) == ("md", [1], 0)
    text = out.read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(refs) == 6 and all(ref.startswith("report_files/") for ref in refs)
    pngs = sorted((tmp_path / "sub" / "report_files").glob("*.png"))
    assert sorted(out.parent / ref for ref in refs) == pngs
    assert sorted(info["files"]) == sorted(str(p) for p in [out, *pngs])
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in pngs)
    r = model.rates
    assert f"| {fmt_rate(r.rate_[1])} | {fmt_interval(r.lower_[1], r.upper_[1])} |" in text
    assert "**BLIND SPOT**" in text and "## Cluster 1 — BLIND SPOT" in text
    assert "A&B <north>" in text


def test_cli_report_errors(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.html"
    assert main(["report", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 3
    assert re.search(r"error: .*nope: model directory not found", capsys.readouterr().err)
    assert not out.exists()
    assert (
        main(["report", "--model", str(model_dir), "--out", str(out), "--images", str(tmp_path / "none")])
        == 3
    )
    assert "none: image folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["report", "--model", str(model_dir), "--out", str(out), "--format", "pdf"])
    assert exc.value.code == 2


def test_report_without_fit_profiles(model: ReliabilityModel) -> None:
    from dataclasses import replace

    bare = replace(model, fit_profiles=None)
    html = render_html(build_report(bare))
    assert 'id="fig-map"' not in html and "holds no fit profiles" in html
    assert 'id="fig-rates"' in html


def test_figures_are_pyplot_free_and_cli_import_is_light(model_dir: Path) -> None:
    code = f"""
import sys
import monitor.cli, monitor.commands.report
monitor.cli.build_parser()
assert "matplotlib" not in sys.modules, "registering the command imported matplotlib"
from monitor.artifact import load_model
from monitor import report
m = load_model({str(model_dir)!r})
figs = [report.rates_figure(m), report.map_figure(m)]
figs[0].savefig(__import__("io").BytesIO(), format="png")
assert all(type(f).__name__ == "Figure" for f in figs)
assert "matplotlib.pyplot" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_figure_functions(model: ReliabilityModel, tmp_path: Path) -> None:
    fig = rates_figure(model)
    ax = fig.axes[0]
    bars = [p for p in ax.patches if p.get_height() > 0]
    assert [round(b.get_height(), 9) for b in bars] == [round(v, 9) for v in model.rates.rate_]
    assert [t.get_text() for t in ax.texts] == ["blind spot"]
    assert len(profiles_figure(model).axes) == 2 and len(cluster_profile_figure(model, 2).axes) == 3
    pts = map_figure(model).axes[0].collections
    assert sum(len(c.get_offsets()) for c in pts[:3]) == sum(SIZES)
    images = tmp_path / "img"
    images.mkdir()
    tf = thumbnails_figure(model, images, 0, n=2)  # nothing on disk: grey tiles, no exception
    assert sum(t.get_text() == "missing" for ax in tf.axes for t in ax.texts) == 4


def test_default_model_report(data_dir: Path, tmp_path: Path) -> None:
    from monitor.defaults import default_model_dir

    model = load_model(default_model_dir())
    result = write_report(
        model,
        tmp_path / "nih.html",
        images=data_dir / "nih" / "images",
        model_path="models/default",
        n_thumbnails=2,
    )
    html = result.path.read_text()
    assert result.missing_images == []
    r = model.rates
    assert fmt_rate(r.global_rate_) in _section(html, "summary")
    assert f"p = {fmt_p(r.chi2_p_)}" in html
    for c in range(model.n_clusters):
        assert fmt_interval(r.lower_[c], r.upper_[c]) in _section(html, f"cluster-{c}")
        assert f'id="fig-cluster{c}-images"' in html
    assert "pixel spacing, mm (scanner proxy)" in html and "view" in html
    assert not re.search(r"https?://", html)


def test_cluster_description_names_intensity_changes_in_plain_words() -> None:
    # Two groups told apart by the spectrum (JPEG); the second also darker and clipped at white.
    X, _, _, profiler = _synthetic(seed=3)
    names = profiler.feature_names
    X = X[: SIZES[0] + SIZES[2]].copy()
    X[:, names.index("intensity_mean_of_range")] = 0.55 + np.random.default_rng(1).normal(0, 0.02, len(X))
    X[:, names.index("intensity_log_share_at_max")] = -3.5
    second = np.arange(len(X)) >= SIZES[0]
    X[second, names.index("jpeg_blockiness")] += 0.3
    X[second, names.index("intensity_mean_of_range")] -= 0.15
    X[second, names.index("intensity_log_share_at_max")] += 1.5
    model = ReliabilityModel.fit(
        X,
        np.zeros(len(X), dtype=int),
        profiler=profiler,
        clusterer=SpectralClusterer(n_clusters=2, random_state=0),
    )
    dark = int(np.bincount(model.clusterer.predict(X[second]), minlength=2).argmax())
    findings = {f.key: f for f in describe_cluster(model, dark).findings}
    assert "darker images" in findings["intensity_mean_of_range"].meaning
    assert "of the stored range" in findings["intensity_mean_of_range"].change
    assert "clipping at the bright end" in findings["intensity_log_share_at_max"].meaning


# Plain words a reader should find for each photometric change (benchmarks/shifts.py, strong level).
_PHOTOMETRIC_WORDS = {
    "bright": "brightness",
    "dark": "brightness",
    "contrast_up": "contrast",
    "contrast_down": "contrast",
    "gamma": "gamma",
    "gamma_dark": "gamma",
    "equalize": "equalisation",
    "clahe": "CLAHE",
}


def _field_images(rng: np.random.Generator, n: int, smooth: float) -> list[np.ndarray]:
    """Smooth random 128x128 images with the same bright-heavy 8-bit grey-level distribution."""
    from scipy import ndimage, special

    out = []
    for _ in range(n):
        f = ndimage.gaussian_filter(rng.normal(size=(128, 128)), smooth, mode="wrap")
        u = 0.5 * (1 + special.erf((f - f.mean()) / (f.std() * np.sqrt(2))))
        out.append((10 + 230 * u**0.6).astype(np.float32))
    return out


@pytest.mark.parametrize("kind", sorted(_PHOTOMETRIC_WORDS))
def test_cluster_description_names_photometric_shifts(kind: str) -> None:
    # Two spectrally different groups with the same grey levels; the second then gets the
    # photometric shift. One of its cluster's three strongest intensity findings must name it.
    from benchmarks.shifts import apply_shift

    rng = np.random.default_rng(7)
    profiler = SpectralProfiler(working_size=128)
    clean = _field_images(rng, 20, smooth=1.5)
    shifted = [apply_shift(x, kind, "strong") for x in _field_images(rng, 20, smooth=5.0)]
    X = np.array([profiler.profile(x, bits_stored=8) for x in clean + shifted])
    model = ReliabilityModel.fit(
        X,
        np.zeros(len(X), dtype=int),
        profiler=profiler,
        clusterer=SpectralClusterer(n_clusters=2, random_state=0),
    )
    labels = model.clusterer.predict(X)
    cluster = int(np.bincount(labels[20:], minlength=2).argmax())
    assert np.mean(labels[20:] == cluster) == 1.0 and np.mean(labels[:20] == cluster) == 0.0
    intensity = [f for f in describe_cluster(model, cluster).findings if f.key.startswith("intensity_")]
    assert intensity, f"{kind}: no intensity finding"
    top = [f.text for f in intensity[:3]]
    assert any(_PHOTOMETRIC_WORDS[kind] in t for t in top), (kind, top)
