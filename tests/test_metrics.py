"""Tests for monitor.metrics and the server's drift windows (monitor.server.tracking), on fresh registries."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from monitor.defaults import default_model_dir
from monitor.engine import Engine
from monitor.metrics import (
    DRIFT_FEATURE_GAUGES,
    DRIFT_GAUGES,
    RATIO_BUCKETS,
    DicomMetrics,
    MonitorMetrics,
    WindowSnapshot,
)
from monitor.server.tracking import DriftWindows, OutcomeLog, Prediction
from monitor.types import DriftReport, FeatureDrift, ImageMeta, ScoredImage, ScoreResult

EXACT_NAMES = {
    "cxr_monitor_requests": "counter",
    "cxr_monitor_request_duration_seconds": "histogram",
    "cxr_monitor_stage_duration_seconds": "histogram",
    "cxr_monitor_image_size_bytes": "histogram",
    "cxr_monitor_image_pixels": "histogram",
    "cxr_monitor_reliability_ratio": "histogram",
    "cxr_monitor_failure_probability_ratio": "histogram",
    "cxr_monitor_images_scored": "counter",
    "cxr_monitor_cluster_assignments": "counter",
    "cxr_monitor_blind_spot_images": "counter",
    "cxr_monitor_novel_images": "counter",
    "cxr_monitor_predicted_failures": "counter",
    "cxr_monitor_outcomes": "counter",
    "cxr_monitor_predicted_failures_with_outcome": "counter",
    "cxr_monitor_reference_cluster_ratio": "gauge",
    "cxr_monitor_reference_failure_ratio": "gauge",
    "cxr_monitor_cluster_blind_spot": "gauge",
    "cxr_monitor": "info",
    "cxr_monitor_inflight_requests": "gauge",
    "cxr_monitor_model_loaded": "gauge",
    "cxr_monitor_shed_requests": "counter",
    "cxr_monitor_model_reloads": "counter",
    "cxr_monitor_drift_psi": "gauge",
    "cxr_monitor_drift_js_distance": "gauge",
    "cxr_monitor_drift_chi2_p_value": "gauge",
    "cxr_monitor_drift_novelty_ratio": "gauge",
    "cxr_monitor_drift_out_of_scope_ratio": "gauge",
    "cxr_monitor_out_of_scope_images": "counter",
    "cxr_monitor_untrusted_images": "counter",
    "cxr_monitor_colour_conversions": "counter",
    "cxr_monitor_drift_estimated_failure_ratio": "gauge",
    "cxr_monitor_drift_realized_failure_ratio": "gauge",
    "cxr_monitor_drift_max_feature_shift": "gauge",
    "cxr_monitor_drift_window_images": "gauge",
    "cxr_monitor_drift_detected": "gauge",
    "cxr_monitor_source_images_scored": "counter",
    "cxr_monitor_source_novel_images": "counter",
    "cxr_monitor_source_predicted_failures": "counter",
    "cxr_monitor_drift_component_detected": "gauge",
    "cxr_monitor_drift_feature_shift": "gauge",
    "cxr_monitor_drift_feature_rank_shift": "gauge",
    "cxr_monitor_drift_feature_p_value": "gauge",
    "cxr_monitor_drift_feature_q_value": "gauge",
    "cxr_monitor_drift_feature_detected": "gauge",
    "cxr_monitor_drift_threshold": "gauge",
}


def _report(n: int = 40, drift: bool = True) -> DriftReport:
    return DriftReport(
        n_images=n, drift=drift, psi=0.3, js_distance=0.2, chi2_p=1e-5, novelty_rate=0.1,
        estimated_failure_rate=0.4, reference_failure_rate=0.33, cluster_counts=(20, 10, 10),
        reference_mix=(0.4, 0.4, 0.2), top_shifted_features=(("jpeg_blockiness", 2.5),), max_feature_shift=2.5,
        thresholds={"feature_alpha": 1e-3, "feature_shift_min": 0.25},
        intensity_drift=drift, components={"cluster_mix": False, "novelty": False, "intensity": drift},
        feature_drift=(
            FeatureDrift("jpeg_blockiness", "spectral", 0.1, 0.5, 0.6, 0.6, False),
            FeatureDrift("intensity_mean_of_range", "intensity", -1.2, -8.0, 1e-15, 2e-15, drift, rank_shift=-1.1),
        ),
    )  # fmt: skip


def _scored(cluster: int = 1, novel: bool = False, blind: bool = False, p: float = 0.3) -> ScoredImage:
    result = ScoreResult(
        cluster=cluster, memberships=(0.0, 1.0, 0.0), failure_probability=p, failure_interval=(0.2, 0.4),
        reliability=1 - p, novelty=0.5, is_novel=novel, log_likelihood=-3.0, in_blind_spot=blind,
        cluster_failure_probability=p,
    )  # fmt: skip
    meta = ImageMeta(source="x", format="png", rows=1024, columns=1024)
    return ScoredImage(result, meta, np.zeros(42), {"decode": 0.01, "profile": 0.02, "score": 0.001})


@pytest.fixture
def metrics() -> MonitorMetrics:
    m = MonitorMetrics(CollectorRegistry())
    m.set_model(model_id="cxrm-test", spec_version="1.0", version="0.1.0", reference_mix=[0.5, 0.3, 0.2],
                reference_failure_rate=0.25, blind_spots=[False, True, False])  # fmt: skip
    m.watch_windows(lambda: {"count": WindowSnapshot(_report(), outcomes=4, failures=1),
                             "time": WindowSnapshot(_report(0, False), outcomes=0, failures=0)})  # fmt: skip
    return m


def test_exact_names_and_types(metrics: MonitorMetrics) -> None:
    families = {f.name: f.type for f in metrics.registry.collect()}
    assert families == EXACT_NAMES


def test_store_counters_are_read_at_scrape_and_set_model_replaces_cluster_gauges(
    metrics: MonitorMetrics,
) -> None:
    stats = {"predictions": 5, "outcomes": 2, "dropped": 0, "errors": 1, "pruned": 3, "queued": 4}
    metrics.watch_store(lambda: stats)
    value = metrics.registry.get_sample_value
    assert value("cxr_monitor_store_predictions_written_total") == 5
    assert value("cxr_monitor_store_write_errors_total") == 1
    stats["outcomes"] = 7
    assert value("cxr_monitor_store_outcomes_written_total") == 7
    assert value("cxr_monitor_store_queue_length") == 4
    # A reloaded model with fewer clusters: no constant gauge is left for the old cluster 2.
    metrics.set_model(model_id="cxrm-new", spec_version="1.0", version="0.1.0", reference_mix=[0.6, 0.4])
    assert value("cxr_monitor_reference_cluster_ratio", {"cluster": "2"}) is None
    assert value("cxr_monitor_reference_cluster_ratio", {"cluster": "0"}) == 0.6


def test_metrics_are_created_per_registry_not_at_import() -> None:
    a, b = (
        MonitorMetrics(CollectorRegistry()),
        MonitorMetrics(CollectorRegistry()),
    )  # no duplicate-series error
    a.images_scored.inc()
    assert a.registry.get_sample_value("cxr_monitor_images_scored_total") == 1
    assert b.registry.get_sample_value("cxr_monitor_images_scored_total") == 0


def test_model_series_are_preinitialised(metrics: MonitorMetrics) -> None:
    get = metrics.registry.get_sample_value
    for c in ("0", "1", "2"):
        assert get("cxr_monitor_cluster_assignments_total", {"cluster": c}) == 0
        for outcome in ("failure", "success"):
            assert get("cxr_monitor_outcomes_total", {"cluster": c, "outcome": outcome}) == 0
    assert get("cxr_monitor_reference_cluster_ratio", {"cluster": "1"}) == pytest.approx(0.3)
    assert get("cxr_monitor_reference_failure_ratio") == pytest.approx(0.25)
    assert [get("cxr_monitor_cluster_blind_spot", {"cluster": c}) for c in "012"] == [0, 1, 0]
    assert get("cxr_monitor_model_loaded") == 1
    assert get("cxr_monitor_info", {"model_id": "cxrm-test", "spec_version": "1.0", "version": "0.1.0"}) == 1


def test_observe_scored_moves_every_per_image_metric(metrics: MonitorMetrics) -> None:
    get = metrics.registry.get_sample_value
    metrics.observe_scored(_scored(cluster=1, novel=True, blind=True, p=0.3))
    metrics.observe_scored(_scored(cluster=2, p=0.6))
    assert get("cxr_monitor_images_scored_total") == 2
    assert get("cxr_monitor_cluster_assignments_total", {"cluster": "1"}) == 1
    assert get("cxr_monitor_novel_images_total") == 1 and get("cxr_monitor_blind_spot_images_total") == 1
    assert get("cxr_monitor_predicted_failures_total") == pytest.approx(0.9)
    assert get("cxr_monitor_stage_duration_seconds_count", {"stage": "profile"}) == 2
    assert get("cxr_monitor_image_pixels_sum") == 2 * 1024 * 1024
    assert get("cxr_monitor_failure_probability_ratio_bucket", {"le": "0.3"}) == 1
    assert get("cxr_monitor_reliability_ratio_bucket", {"le": "0.4"}) == 1


def test_ratio_buckets_are_005_steps() -> None:
    assert RATIO_BUCKETS[0] == 0.05 and RATIO_BUCKETS[-1] == 1.0 and len(RATIO_BUCKETS) == 20
    assert np.allclose(np.diff(RATIO_BUCKETS), 0.05)


def test_outcome_and_request_counters(metrics: MonitorMetrics) -> None:
    get = metrics.registry.get_sample_value
    metrics.observe_outcome(2, True, 0.25)
    metrics.observe_outcome(2, False, 0.5)
    metrics.observe_request("Score", "INVALID_ARGUMENT", 0.01)
    assert get("cxr_monitor_outcomes_total", {"cluster": "2", "outcome": "failure"}) == 1
    assert get("cxr_monitor_outcomes_total", {"cluster": "2", "outcome": "success"}) == 1
    assert get("cxr_monitor_predicted_failures_with_outcome_total") == pytest.approx(0.75)
    assert get("cxr_monitor_requests_total", {"method": "Score", "code": "INVALID_ARGUMENT"}) == 1
    assert get("cxr_monitor_request_duration_seconds_count", {"method": "Score"}) == 1


def test_drift_gauges_are_read_at_collection(metrics: MonitorMetrics) -> None:
    get = metrics.registry.get_sample_value
    per_window = {n.removeprefix("cxr_monitor_") for n in EXACT_NAMES if "drift" in n}
    per_window -= set(DRIFT_FEATURE_GAUGES) | {"drift_component_detected", "drift_threshold"}
    assert set(DRIFT_GAUGES) == per_window
    assert get("cxr_monitor_drift_psi", {"window": "count"}) == pytest.approx(0.3)
    assert get("cxr_monitor_drift_chi2_p_value", {"window": "count"}) == pytest.approx(1e-5)
    assert get("cxr_monitor_drift_detected", {"window": "count"}) == 1
    assert get("cxr_monitor_drift_detected", {"window": "time"}) == 0
    assert get("cxr_monitor_drift_window_images", {"window": "count"}) == 40
    assert get("cxr_monitor_drift_realized_failure_ratio", {"window": "count"}) == pytest.approx(0.25)
    assert math.isnan(get("cxr_monitor_drift_realized_failure_ratio", {"window": "time"}))
    assert b'cxr_monitor_drift_max_feature_shift{window="count"} 2.5' in generate_latest(metrics.registry)


# --------------------------------------------------------------------------- tracking


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_directory(default_model_dir())


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_drift_windows_count_and_time_bounds_with_outcomes(engine: Engine) -> None:
    clock = _Clock()
    windows = DriftWindows(engine, window_images=3, window_seconds=10.0, clock=clock)
    for i in range(5):
        windows.add(f"r{i}", _scored(cluster=i % 3, p=0.2))
        clock.now += 1
    windows.record_outcome("r0", True)  # already out of the count window
    windows.record_outcome("r4", True)
    windows.record_outcome("r3", False)
    snap = windows.snapshot()
    assert snap["count"].report.n_images == 3 and snap["time"].report.n_images == 5
    assert (snap["count"].outcomes, snap["count"].failures) == (2, 1)
    assert snap["time"].realized_failure_rate == pytest.approx(2 / 3)  # r0 is still in the time window
    assert snap["count"].report.estimated_failure_rate == pytest.approx(0.2)
    clock.now += 20  # everything ages out of the time window; the count window keeps its last 3
    snap = windows.snapshot()
    assert snap["time"].report.n_images == 0 and math.isnan(snap["time"].realized_failure_rate)
    assert snap["count"].report.n_images == 3


def test_outcome_log_is_a_bounded_lru() -> None:
    log = OutcomeLog(capacity=2, n_clusters=3)
    for rid in ("a", "b", "c"):
        log.remember(rid, Prediction(cluster=1, failure_probability=0.3, cluster_failure_probability=0.4,
                                     classifier_score=None))  # fmt: skip
    assert log.get("a") is None and len(log) == 2
    assert log.record("a", True) is None
    prediction, n, f = log.record("b", True)
    assert (prediction.cluster, n, f) == (1, 1, 1)
    with pytest.raises(KeyError):
        log.record("b", False)
    assert log.tallies()[1] == (1, 1, pytest.approx(0.4))


def test_out_of_scope_untrusted_and_colour_conversions_are_counted(metrics: MonitorMetrics) -> None:
    get = metrics.registry.get_sample_value
    for kind in ("noise", "tint", "overlay"):
        assert get("cxr_monitor_colour_conversions_total", {"kind": kind}) == 0.0
    for name in ("modality", "body_part", "view_position"):
        assert get("cxr_monitor_out_of_scope_images_total", {"field": name}) == 0.0
    base = _scored()
    outside = ScoredImage(
        replace(base.result, trusted=False, reliability=0.0, out_of_scope=True, scope_field="modality",
                scope_reasons=("(0008,0060) Modality 'US' is not ...",)),
        replace(base.meta, modality="US"), base.z_profile, base.timings,
    )  # fmt: skip
    tinted = ScoredImage(base.result, replace(base.meta, colour_conversion="tint", coloured_share=0.0),
                         base.z_profile, base.timings)  # fmt: skip
    for s in (base, outside, tinted):
        metrics.observe_scored(s)
    assert get("cxr_monitor_out_of_scope_images_total", {"field": "modality"}) == 1.0
    assert get("cxr_monitor_untrusted_images_total") == 1.0
    assert get("cxr_monitor_colour_conversions_total", {"kind": "tint"}) == 1.0
    # The reliability histogram holds what the response said: 0 for the untrusted image.
    assert get("cxr_monitor_reliability_ratio_bucket", {"le": "0.05"}) == 1.0
    assert get("cxr_monitor_drift_out_of_scope_ratio", {"window": "count"}) == 0.0


def test_per_source_counters_and_drift_gauges(metrics: MonitorMetrics) -> None:
    get = metrics.registry.get_sample_value
    metrics.observe_scored(_scored(cluster=1, novel=True, p=0.3), "CR_ROOM1")
    metrics.observe_scored(_scored(cluster=2, p=0.6))
    assert get("cxr_monitor_source_images_scored_total", {"source": "CR_ROOM1"}) == 1
    assert get("cxr_monitor_source_images_scored_total", {"source": "grpc"}) == 1
    assert get("cxr_monitor_source_novel_images_total", {"source": "CR_ROOM1"}) == 1
    assert get("cxr_monitor_source_predicted_failures_total", {"source": "grpc"}) == pytest.approx(0.6)
    assert get("cxr_monitor_images_scored_total") == 2  # the fleet-wide series are unchanged
    metrics.watch_source_windows(
        lambda: {("CR_ROOM1", "count"): WindowSnapshot(_report(7), outcomes=2, failures=1)}
    )
    labels = {"source": "CR_ROOM1", "window": "count"}
    assert get("cxr_monitor_source_drift_window_images", labels) == 7
    assert get("cxr_monitor_source_drift_realized_failure_ratio", labels) == 0.5
    assert get("cxr_monitor_drift_window_images", {"window": "count"}) == 40  # the global windows stay


def test_dicom_metrics_names() -> None:
    registry = CollectorRegistry()
    DicomMetrics(registry)
    names = {f.name for f in registry.collect()}
    assert names == {
        "cxr_monitor_dicom_associations", "cxr_monitor_dicom_contexts_refused", "cxr_monitor_dicom_echoes",
        "cxr_monitor_dicom_stores", "cxr_monitor_dicom_scoring_failures", "cxr_monitor_dicom_store_ack_seconds",
        "cxr_monitor_dicom_queue_wait_seconds", "cxr_monitor_dicom_queue_images",
        "cxr_monitor_dicom_queue_capacity_images",
    }  # fmt: skip


def test_per_component_and_per_feature_drift_gauges(metrics: MonitorMetrics) -> None:
    get = metrics.registry.get_sample_value
    assert get("cxr_monitor_drift_component_detected", {"window": "count", "component": "intensity"}) == 1
    assert get("cxr_monitor_drift_component_detected", {"window": "time", "component": "intensity"}) == 0
    assert get("cxr_monitor_drift_component_detected", {"window": "count", "component": "cluster_mix"}) == 0
    labels = {"window": "count", "feature": "intensity_mean_of_range"}
    assert get("cxr_monitor_drift_feature_shift", labels) == pytest.approx(-1.2)
    assert get("cxr_monitor_drift_feature_rank_shift", labels) == pytest.approx(-1.1)
    assert get("cxr_monitor_drift_feature_p_value", labels) == pytest.approx(1e-15)
    assert get("cxr_monitor_drift_feature_q_value", labels) == pytest.approx(2e-15)
    assert get("cxr_monitor_drift_feature_detected", labels) == 1
    assert get("cxr_monitor_drift_feature_detected", {"window": "count", "feature": "jpeg_blockiness"}) == 0
    assert get("cxr_monitor_drift_threshold", {"threshold": "feature_alpha"}) == pytest.approx(1e-3)
    assert get("cxr_monitor_drift_threshold", {"threshold": "feature_shift_min"}) == pytest.approx(0.25)
