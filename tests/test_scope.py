"""Out-of-scope images and what reliability says about them (issue 12, item 5), and near-grey
colour exports through the whole path (item 4): engine, gRPC sidecar, CLI, metrics, drift.

The DICOM files a new user would try (an ultrasound frame, CT slices, a nuclear-medicine
whole-body image, an extremity CR) are written here with pydicom around chest pixels, so
only their headers say what they are: no download at test time.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_files import dicom_bytes as write_dicom_bytes
from prometheus_client import CollectorRegistry

from monitor.artifact import load_model, save_model
from monitor.cli import main
from monitor.client import ReliabilityClient
from monitor.defaults import default_model_dir
from monitor.drift import SlidingWindow, WindowStats, drift_report
from monitor.engine import Engine
from monitor.errors import InvalidInputError
from monitor.scope import ScopeRules, parse_allow_list
from monitor.server import build_server
from monitor.settings import Settings
from monitor.types import ImageMeta

REPO = Path(__file__).resolve().parents[1]
CHEST_DICOM = "cxr_pa_monochrome2_jpeg.dcm"

# What a new user tries (issue 12): modality, body part, view, rows x columns.
OUT_OF_SCOPE = {
    "ultrasound": ("US", "ABDOMEN", None, (768, 1024)),
    "ct-chest": ("CT", "CHEST", None, (512, 512)),
    "nm-whole-body": ("NM", "WHOLEBODY", "AP", (1024, 256)),
    "cr-hand": ("CR", "HAND", "PA", (1024, 768)),
    "cr-mammo-view": ("CR", "CHEST", "MLO", (1024, 1024)),
}
FIELD = {"ultrasound": "modality", "ct-chest": "modality", "nm-whole-body": "modality",
         "cr-hand": "body_part", "cr-mammo-view": "view_position"}  # fmt: skip


def dicom_bytes(pixels: np.ndarray, modality: str, body_part: str | None, view: str | None) -> bytes:
    """An uncompressed MONOCHROME2 DICOM of ``pixels`` (uint16) with the given header fields."""
    fields = {"BodyPartExamined": body_part, "ViewPosition": view}
    elements = {k: v for k, v in fields.items() if v is not None}
    return write_dicom_bytes(np.asarray(pixels, dtype=np.uint16), modality=modality, **elements)


def _phantom(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = 800 + 300 * np.sin(xx / 23.0) * np.cos(yy / 31.0) + rng.normal(0, 40, shape)
    return np.clip(img, 0, 4095).astype(np.uint16)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_directory(default_model_dir())


@pytest.fixture(scope="module")
def chest_pixels(data_dir: Path) -> np.ndarray:
    """A real chest radiograph's pixels: typical for the default model (not novel).

    The file is 8-bit and :func:`dicom_bytes` writes 16-bit DICOMs (Bits Stored 16), so the
    values are scaled to the full 16-bit range (x 257): the same image at that depth. Left in
    0..255 they would sit in the bottom 1/256 of the stored range, which the intensity level
    features of profile spec 2.0 rightly find novel.
    """
    return pydicom.dcmread(data_dir / "dicom" / CHEST_DICOM).pixel_array.astype(np.uint16) * np.uint16(257)


# --------------------------------------------------------------------------- rules


def test_parse_allow_list() -> None:
    assert parse_allow_list(" dx, cr ,CR") == ("CR", "DX")
    assert parse_allow_list("port  chest") == ("PORT CHEST",)
    assert parse_allow_list("*") is None and parse_allow_list(["CR", "*"]) is None
    with pytest.raises(InvalidInputError, match=r"at least one value"):
        parse_allow_list(" , ")


def test_rules_check_each_field_and_skip_absent_ones() -> None:
    rules = ScopeRules()
    meta = ImageMeta(source="x", format="dicom", rows=64, columns=64)
    assert rules.check(meta) == ()  # no header values: not judged
    assert rules.check(replace(meta, format="png")) == ()
    assert rules.check(replace(meta, modality="dx", body_part_examined="Chest", view_position="pa")) == ()
    reasons = rules.check(replace(meta, modality="US", body_part_examined="ABDOMEN", view_position="PA"))
    assert [f for f, _ in reasons] == ["modality", "body_part"]
    assert reasons[0][1] == (
        "(0008,0060) Modality 'US' is not a projection radiograph modality this model covers "
        "(allowed: CR, DR, DX, RG)"
    )
    assert "(0018,0015) Body Part Examined 'ABDOMEN' is not the chest" in reasons[1][1]
    assert rules.with_overrides(modalities="*").check(replace(meta, modality="US")) == ()
    narrowed = rules.with_overrides(modalities="DX")
    assert [f for f, _ in narrowed.check(replace(meta, modality="CR"))] == ["modality"]


def test_rules_learn_the_fit_sets_spelling_and_round_trip() -> None:
    records = [
        {"img_modality": "DX", "img_body_part_examined": "PORT CHEST", "img_view_position": "AP"},
        {"img_format": "png"},
    ]
    rules = ScopeRules.learn(records)
    assert "PORT CHEST" in rules.body_parts and "CHEST" in rules.body_parts
    assert rules.modalities == ScopeRules().modalities
    assert ScopeRules.from_json(rules.to_json()) == rules
    assert ScopeRules.from_json(None) == ScopeRules()  # models saved before scopes existed
    loose = rules.with_overrides(view_positions="*")
    assert loose.to_json()["view_positions"] is None
    assert ScopeRules.from_json(loose.to_json()) == loose


def test_model_keeps_its_scope_and_old_models_load_with_the_default(engine: Engine, tmp_path: Path) -> None:
    model = replace(engine.model, scope=ScopeRules().with_overrides(body_parts="CHEST,PORT CHEST"))
    save_model(model, tmp_path / "m")
    assert load_model(tmp_path / "m").scope.body_parts == ("CHEST", "PORT CHEST")
    assert engine.model.scope == ScopeRules()  # the bundled model predates scopes


# --------------------------------------------------------------------------- reliability semantics


def test_untrusted_reliability_is_the_lower_end_of_its_interval(engine: Engine) -> None:
    """No novel or out-of-scope image reports a reliability that reads like a typical image's."""
    profiles = engine.model.fit_profiles[:40]
    scope = [()] * 40
    scope[3] = (("modality", "(0008,0060) Modality 'US' is not ..."),)
    results = engine.model.score(profiles, scope_reasons=scope)
    assert any(r.trusted for r in results)
    for r in results:
        lo, hi = r.failure_interval
        if r.trusted:
            assert r.reliability == pytest.approx(1 - r.failure_probability)
            assert not r.is_novel and not r.out_of_scope
        else:
            assert (lo, hi) == (0.0, 1.0)
            assert r.reliability == 1 - hi == 0.0
    assert results[3].out_of_scope and not results[3].trusted and results[3].scope_field == "modality"
    with pytest.raises(InvalidInputError, match=r"expected 40 scope verdicts, got 1"):
        engine.model.score(profiles, scope_reasons=[()])


@pytest.mark.parametrize("kind", sorted(OUT_OF_SCOPE))
def test_engine_flags_out_of_scope_dicoms(engine: Engine, kind: str) -> None:
    modality, body_part, view, shape = OUT_OF_SCOPE[kind]
    scored = engine.score(dicom_bytes(_phantom(shape), modality, body_part, view), name=kind)
    r = scored.result
    assert r.out_of_scope and not r.trusted
    assert r.scope_field == FIELD[kind]
    assert r.reliability == 0.0 and r.failure_interval == (0.0, 1.0)
    assert r.scope_reasons and all(kind not in reason for reason in r.scope_reasons)  # no file names
    assert scored.meta.modality == modality and scored.meta.body_part_examined == body_part


def test_same_pixels_in_and_out_of_scope(engine: Engine, chest_pixels: np.ndarray) -> None:
    """The issue's ultrasound case: typical pixels (not novel) but a US header."""
    chest = engine.score(dicom_bytes(chest_pixels, "CR", "CHEST", "PA"), name="chest")
    us = engine.score(dicom_bytes(chest_pixels, "US", None, None), name="us")
    assert not chest.result.is_novel and chest.result.trusted
    assert chest.result.reliability == pytest.approx(1 - chest.result.failure_probability)
    assert not us.result.is_novel and us.result.out_of_scope and not us.result.trusted
    assert us.result.failure_probability == pytest.approx(chest.result.failure_probability)
    assert us.result.reliability == 0.0 < chest.result.reliability
    # A serve-time override puts it back in scope.
    loose = Engine(engine.model, scope_overrides={"modalities": "*"})
    assert loose.score(dicom_bytes(chest_pixels, "US", None, None)).result.trusted


# --------------------------------------------------------------------------- drift component


def test_drift_window_counts_out_of_scope_images(engine: Engine) -> None:
    model = engine.model
    window = SlidingWindow(model.n_clusters, len(model.feature_names), max_images=50)
    z = np.zeros(len(model.feature_names))
    for i in range(50):
        window.add(float(i), 0, False, 0.3, z, "modality" if i % 5 == 0 else "")
    report = model.drift(window.stats(50.0))
    assert report.out_of_scope_rate == pytest.approx(0.2)
    assert report.out_of_scope_counts == {"modality": 10}
    assert report.out_of_scope_drift and report.drift and not report.failure_estimate_trusted
    assert any(r.startswith("out-of-scope images 20.0% (headers say not a chest radiograph: modality 10)")
               for r in report.reasons)  # fmt: skip
    for i in range(50, 100):  # the out-of-scope images slide out
        window.add(float(i), 0, False, 0.3, z)
    later = model.drift(window.stats(100.0))
    assert later.out_of_scope_rate == 0.0 and later.out_of_scope_counts == {}
    empty = WindowStats(model.n_clusters, len(model.feature_names))
    assert drift_report(empty, model.reference_mix, 0.05, 0.3, model.feature_names).out_of_scope_rate == 0.0


# --------------------------------------------------------------------------- gRPC sidecar


@pytest.fixture(scope="module")
def sidecar(engine: Engine) -> Iterator[tuple]:
    registry = CollectorRegistry()
    settings = Settings(host="127.0.0.1", port=0, metrics_port=0, workers=2, window_images=50,
                        log_format="text", decode_processes=0)  # fmt: skip
    server, port = build_server(settings, engine, registry=registry)
    server.start()
    yield server, f"127.0.0.1:{port}", registry
    server.stop(1)


def test_grpc_out_of_scope_and_colour_conversion(sidecar: tuple) -> None:
    from benchmarks.colour_corpus import CASES, chest_phantom

    server, address, registry = sidecar
    get = registry.get_sample_value
    with ReliabilityClient(address, timeout=60) as client:
        info = client.model_info()
        assert list(info.scope.modalities) == ["CR", "DR", "DX", "RG"]
        assert info.drift_thresholds.out_of_scope_rate_min == pytest.approx(0.02)
        before = get("cxr_monitor_out_of_scope_images_total", {"field": "modality"})
        untrusted_before = get("cxr_monitor_untrusted_images_total")
        r = client.score(_encoded(dicom_bytes(_phantom((768, 1024)), "US", "ABDOMEN", None)))
        assert r.out_of_scope and not r.trusted and r.scope_field == "modality"
        assert r.reliability == 0.0 and (r.failure_interval.lower, r.failure_interval.upper) == (0.0, 1.0)
        assert list(r.scope_reasons)[0].startswith("(0008,0060) Modality 'US' is not")
        assert r.image.body_part_examined == "ABDOMEN"
        assert get("cxr_monitor_out_of_scope_images_total", {"field": "modality"}) == before + 1
        assert get("cxr_monitor_untrusted_images_total") >= untrusted_before + 1
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read()
        assert b'cxr_monitor_drift_out_of_scope_ratio{window="count"}' in text

        sepia = next(c for c in CASES if c.name.startswith("sepia tint JPEG"))
        conversions = get("cxr_monitor_colour_conversions_total", {"kind": "tint"})
        r = client.score(_encoded(sepia.build(chest_phantom(256), np.random.default_rng(0)), "sepia.jpg"))
        assert r.image.colour_conversion == "tint" and r.image.HasField("coloured_share")
        assert get("cxr_monitor_colour_conversions_total", {"kind": "tint"}) == conversions + 1
        heat = next(c for c in CASES if c.name.startswith("heat-map"))
        with pytest.raises(Exception, match=r"heat\.jpg\): colour image is not supported") as caught:
            client.score(_encoded(heat.build(chest_phantom(256), np.random.default_rng(0)), "heat.jpg"))
        assert caught.value.code().name == "INVALID_ARGUMENT"


def _encoded(data: bytes, name: str = "") -> object:
    from monitor.proto import monitor_pb2 as pb

    return pb.ScoreRequest(encoded=pb.EncodedImage(data=data, name=name))


def test_grpc_serve_time_scope_override(engine: Engine) -> None:
    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, workers=1, log_format="text",
                        decode_processes=0, scope_modalities="CR,DX,US")  # fmt: skip
    loose = Engine(engine.model, scope_overrides=settings.scope_overrides)
    server, port = build_server(settings, loose, registry=CollectorRegistry())
    server.start()
    try:
        with ReliabilityClient(f"127.0.0.1:{port}", timeout=60) as client:
            assert list(client.model_info().scope.modalities) == ["CR", "DX", "US"]
            r = client.score(_encoded(dicom_bytes(_phantom((768, 1024)), "US", "CHEST", None)))
            assert not r.out_of_scope and r.scope_field == ""
    finally:
        server.stop(1)


def test_settings_scope_overrides_from_environment() -> None:
    s = Settings.load(environ={"CXR_MONITOR_SCOPE_BODY_PARTS": "chest,port chest"})
    assert s.scope_overrides == {"body_parts": "chest,port chest"}
    with pytest.raises(InvalidInputError, match=r"scope_modalities needs at least one value"):
        Settings(scope_modalities=" , ")


# --------------------------------------------------------------------------- CLI


def test_cli_score_and_drift_report_untrusted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.colour_corpus import CASES, chest_phantom

    paths = []
    for kind, (modality, body_part, view, shape) in sorted(OUT_OF_SCOPE.items()):
        paths.append(tmp_path / f"{kind}.dcm")
        paths[-1].write_bytes(dicom_bytes(_phantom(shape), modality, body_part, view))
    arrow = next(c for c in CASES if c.name.startswith("red arrow"))
    paths.append(tmp_path / "arrow.jpg")
    paths[-1].write_bytes(arrow.build(chest_phantom(256), np.random.default_rng(0)))
    model = str(default_model_dir())
    assert main(["score", "--model", model, *map(str, paths), "--json"]) == 0
    objs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for o in objs[:-1]:
        assert o["out_of_scope"] and not o["trusted"] and o["reliability"] == 0.0
        assert o["scope_field"] == FIELD[Path(o["image"]).stem] and o["scope_reasons"]
    assert objs[-1]["metadata"]["colour_conversion"] == "overlay"
    assert objs[-1]["reliability"] == (1 - objs[-1]["failure_probability"] if objs[-1]["trusted"] else 0.0)

    assert main(["score", "--model", model, str(paths[0])]) == 0
    text = capsys.readouterr().out
    assert "reliability 0.000 (not trusted: " in text and "OUT-OF-SCOPE" in text
    assert "    out of scope: (0018,0015) Body Part Examined 'HAND' is not the chest" in text  # cr-hand first

    assert main(["drift", "--model", model, *map(str, paths), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out_of_scope_rate"] == pytest.approx(5 / 6)
    assert report["out_of_scope_counts"] == {"body_part": 1, "modality": 3, "view_position": 1}


def test_cli_fit_learns_and_overrides_scope(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rows = ["image,failure"]
    for i in range(24):
        name = f"img{i:02d}.dcm"
        (images / name).write_bytes(dicom_bytes(_phantom((128, 128), seed=i), "DX", "PORT CHEST", "AP"))
        rows.append(f"{name},{i % 3 == 0:d}")
    (tmp_path / "outcomes.csv").write_text("\n".join(rows) + "\n")
    base = ["fit", "--images", str(images), "--outcomes", str(tmp_path / "outcomes.csv"), "--clusters", "2",
            "--min-cluster-size", "2", "--no-cache", "--json"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "learned")]) == 0
    learned = json.loads(capsys.readouterr().out)["scope"]
    assert "PORT CHEST" in learned["body_parts"] and "CHEST" in learned["body_parts"]
    argv = [
        *base,
        "--out",
        str(tmp_path / "narrow"),
        "--scope-modalities",
        "DX",
        "--scope-view-positions",
        "*",
    ]
    assert main(argv) == 0
    narrow = json.loads(capsys.readouterr().out)["scope"]
    assert narrow["modalities"] == ["DX"] and narrow["view_positions"] is None
    assert main(["info", "--model", str(tmp_path / "narrow")]) == 0
    assert "modalities      DX" in capsys.readouterr().out
    cr = tmp_path / "cr.dcm"
    cr.write_bytes(dicom_bytes(_phantom((128, 128)), "CR", "CHEST", "PA"))
    assert main(["score", "--model", str(tmp_path / "narrow"), str(cr), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scope_field"] == "modality"
