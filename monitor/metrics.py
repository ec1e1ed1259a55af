"""Every Prometheus metric of the sidecar, created on a registry passed in (never at import).

Names carry base units (``_seconds``, ``_bytes``, ``_ratio``), counters end in
``_total``, and no label holds an image or request id: labels are the gRPC method,
the status code name, the pipeline stage, the cluster index, the outcome and the
drift window, all bounded.

``kind`` (colour conversions) and ``field`` (out-of-scope images) take a fixed set of values,
pre-initialised to 0.

``method`` label values: ``Score``, ``ScoreStream``, ``ReportOutcome``,
``GetModelInfo`` (one per RPC) and ``ScoreStream/item`` (one per image of a
stream, so per-item errors are counted too; a stream of n images therefore adds
n + 1 to ``cxr_monitor_requests_total``).

The drift window gauges (``cxr_monitor_drift_*{window="count"|"time"}``) are
computed when the registry is collected (each scrape), from a snapshot function
the server provides, so they are exact at the moment they are read. The same gauges
per source (``cxr_monitor_source_drift_*{source, window}``) come from one window pair
per source: ``grpc`` for the gRPC API, and for the DICOM node the calling AE title
when it is allow-listed, else ``other`` (a bounded set).

:class:`DicomMetrics` holds the DICOM storage node's own counters (associations,
C-ECHO, C-STORE results, scoring failures after the reply, queue depth).
The per-component verdicts carry a ``component`` label (``cluster_mix``, ``novelty``,
``out_of_scope``, ``intensity``; also per source) and the per-feature statistics a ``feature``
label: the profile's feature names, a fixed set of the model (42 for spec 2.0), never image data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .colour import COLOUR_KINDS
from .scope import SCOPE_FIELDS
from .types import DriftReport, ScoredImage

__all__ = [
    "DICOM_STORE_RESULTS",
    "DRIFT_FEATURE_GAUGES",
    "DRIFT_GAUGES",
    "PREFIX",
    "RATIO_BUCKETS",
    "SHED_REASONS",
    "STORE_COUNTERS",
    "DicomMetrics",
    "MonitorMetrics",
    "WindowSnapshot",
]

PREFIX = "cxr_monitor_"
SHED_REASONS = ("in_flight", "deadline", "memory")
"""Why admission refused an image (the ``reason`` label of ``cxr_monitor_shed_requests_total``)."""

RATIO_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SIZE_BUCKETS = tuple(float(1024 * 4**i) for i in range(10))  # 1 KiB .. 256 MiB
_PIXEL_BUCKETS = tuple(float(s * s) for s in (64, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192))

#: Drift gauge name (without prefix) → (help, DriftReport-or-snapshot attribute).
DRIFT_GAUGES: dict[str, tuple[str, str]] = {
    "drift_psi": ("Population stability index of the window's cluster mix vs the reference.", "psi"),
    "drift_js_distance": (
        "Jensen-Shannon distance (base 2) of the cluster mix vs the reference.",
        "js_distance",
    ),
    "drift_chi2_p_value": ("Chi-square goodness-of-fit p-value of the cluster counts.", "chi2_p"),
    "drift_novelty_ratio": ("Share of novel images in the window.", "novelty_rate"),
    "drift_out_of_scope_ratio": (
        "Share of the window's images whose header says they are not a chest radiograph the model covers.",
        "out_of_scope_rate",
    ),
    "drift_estimated_failure_ratio": (
        "Mean label-free predicted failure probability in the window.",
        "estimated_failure_rate",
    ),
    "drift_realized_failure_ratio": (
        "Failure share among the window's images whose outcome was reported (NaN if none).",
        "realized_failure_rate",
    ),
    "drift_max_feature_shift": ("Largest |mean z| of a spectral feature in the window.", "max_feature_shift"),
    "drift_window_images": ("Images in the window.", "n_images"),
    "drift_detected": ("1 when the model's drift thresholds are crossed in the window, else 0.", "drift"),
}

#: Per-feature drift gauge name (without prefix) → (help, FeatureDrift attribute); labels window, feature.
DRIFT_FEATURE_GAUGES: dict[str, tuple[str, str]] = {
    "drift_feature_shift": (
        "Window mean of a profile feature in reference standard deviations (signed).",
        "shift",
    ),
    "drift_feature_rank_shift": (
        "Window mean normal score of a profile feature against the reference (its robust shift, in reference "
        "standard deviations for a normal feature; gated by feature_shift_min).",
        "rank_shift",
    ),
    "drift_feature_p_value": (
        "Two-sided p-value of the feature's shift (rank-based test against the model's reference).",
        "p_value",
    ),
    "drift_feature_q_value": (
        "Benjamini-Hochberg adjusted p-value of the feature's shift, over all features of the window.",
        "q_value",
    ),
    "drift_feature_detected": (
        "1 when the feature's shift passes the model's thresholds (q below feature_alpha and |rank_shift| above "
        "feature_shift_min), else 0.",
        "drifted",
    ),
}
_COMPONENT_GAUGE = (
    "drift_component_detected",
    "1 when a component of the drift verdict (cluster_mix, novelty, intensity, out_of_scope) fires in the window, else 0.",
)
_THRESHOLD_GAUGE = (
    "drift_threshold",
    "The model's drift thresholds (psi_min, chi2_alpha, novelty_rate_min, novelty_alpha, min_images, "
    "feature_alpha, feature_shift_min).",
)


#: ``result`` label values of ``cxr_monitor_dicom_stores_total``: queued for scoring, or why not.
DICOM_STORE_RESULTS = (
    "queued",
    "queue_full",
    "overloaded",
    "not_ready",
    "malformed",
    "no_pixel_data",
    "unsupported_image",
    "too_large",
    "internal",
)


@dataclass(frozen=True)
class WindowSnapshot:
    """A drift window at one instant: the core's report and the outcomes reported for its images."""

    report: DriftReport
    outcomes: int
    failures: int

    @property
    def realized_failure_rate(self) -> float:
        return self.failures / self.outcomes if self.outcomes else math.nan

    def value(self, attribute: str) -> float:
        if attribute == "realized_failure_rate":
            return self.realized_failure_rate
        return float(getattr(self.report, attribute))


class _DriftCollector(Collector):
    """Computes the window gauges from ``snapshot()`` at collection time.

    ``snapshot()`` maps a tuple of label values (one per ``labels``) to a window snapshot.
    """

    def __init__(
        self,
        snapshot: Callable[[], Mapping[tuple[str, ...], WindowSnapshot]],
        prefix: str = PREFIX,
        labels: tuple[str, ...] = ("window",),
    ) -> None:
        self._snapshot = snapshot
        self._prefix = prefix
        self._labels = list(labels)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Named without samples so registration checks names without computing drift.
        for name, (doc, _) in DRIFT_GAUGES.items():
            yield GaugeMetricFamily(self._prefix + name, doc, labels=self._labels)
        yield GaugeMetricFamily(
            self._prefix + _COMPONENT_GAUGE[0], _COMPONENT_GAUGE[1], labels=[*self._labels, "component"]
        )
        if self._prefix == PREFIX:
            for name, (doc, _) in DRIFT_FEATURE_GAUGES.items():
                yield GaugeMetricFamily(PREFIX + name, doc, labels=[*self._labels, "feature"])
            yield GaugeMetricFamily(PREFIX + _THRESHOLD_GAUGE[0], _THRESHOLD_GAUGE[1], labels=["threshold"])

    def collect(self) -> Iterable[GaugeMetricFamily]:
        windows = self._snapshot()
        for name, (doc, attribute) in DRIFT_GAUGES.items():
            family = GaugeMetricFamily(self._prefix + name, doc, labels=self._labels)
            for key, snap in windows.items():
                family.add_metric(list(key), snap.value(attribute))
            yield family
        family = GaugeMetricFamily(
            self._prefix + _COMPONENT_GAUGE[0], _COMPONENT_GAUGE[1], labels=[*self._labels, "component"]
        )
        for key, snap in windows.items():
            for component, fired in snap.report.components.items():
                family.add_metric([*key, component], float(fired))
        yield family
        if self._prefix != PREFIX:
            return  # per-feature statistics and thresholds for the main windows only (bounded series)
        for name, (doc, attribute) in DRIFT_FEATURE_GAUGES.items():
            family = GaugeMetricFamily(PREFIX + name, doc, labels=[*self._labels, "feature"])
            for key, snap in windows.items():
                for f in snap.report.feature_drift:
                    family.add_metric([*key, f.feature], float(getattr(f, attribute)))
            yield family
        family = GaugeMetricFamily(PREFIX + _THRESHOLD_GAUGE[0], _THRESHOLD_GAUGE[1], labels=["threshold"])
        # Every window of one model shares its thresholds: export them once.
        first = next(iter(windows.values()), None)
        if first is not None:
            for key, value in first.report.thresholds.items():
                family.add_metric([key], float(value))
        yield family


#: Outcome store counter name (without prefix and ``_total``) → (help, ``stats()`` key).
STORE_COUNTERS: dict[str, tuple[str, str]] = {
    "store_predictions_written": ("Scored requests committed to the outcome store.", "predictions"),
    "store_outcomes_written": ("Outcomes committed to the outcome store.", "outcomes"),
    "store_predictions_dropped": (
        "Scored requests not stored because the store's queue stayed full (their outcomes cannot be "
        "reported durably).",
        "dropped",
    ),
    "store_write_errors": ("Outcome store transactions that failed (each logged at ERROR).", "errors"),
    "store_pruned_rows": ("Rows deleted from the outcome store by the retention limits.", "pruned"),
}


class _StoreCollector(Collector):
    """The outcome store's counters, read from ``stats()`` at collection time."""

    def __init__(self, stats: Callable[[], Mapping[str, int]]) -> None:
        self._stats = stats

    def describe(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        for name, (doc, _) in STORE_COUNTERS.items():
            yield CounterMetricFamily(PREFIX + name, doc)
        yield GaugeMetricFamily(PREFIX + "store_queue_length", "Scored requests waiting to be stored.")

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._stats()
        for name, (doc, key) in STORE_COUNTERS.items():
            yield CounterMetricFamily(PREFIX + name, doc, value=stats[key])
        yield GaugeMetricFamily(PREFIX + "store_queue_length", "Scored requests waiting to be stored.",
                                value=stats["queued"])  # fmt: skip


class MonitorMetrics:
    """The sidecar's metrics on ``registry``.

    Parameters
    ----------
    registry : CollectorRegistry
        Where every metric is registered; tests pass a fresh one.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = {"registry": registry}
        p = PREFIX
        self.requests = Counter(p + "requests", "RPCs handled, by method and gRPC status code name.",
                                ["method", "code"], **r)  # fmt: skip
        self.request_duration = Histogram(
            p + "request_duration_seconds", "End-to-end handling time of an RPC on the server.", ["method"],
            buckets=_LATENCY_BUCKETS, **r,
        )  # fmt: skip
        self.stage_duration = Histogram(
            p + "stage_duration_seconds", "Time per pipeline stage: decode, profile, score.", ["stage"],
            buckets=_STAGE_BUCKETS, **r,
        )  # fmt: skip
        self.image_size = Histogram(p + "image_size_bytes", "Size of the image as received (encoded bytes "
                                    "or raw array bytes).", buckets=_SIZE_BUCKETS, **r)  # fmt: skip
        self.image_pixels = Histogram(p + "image_pixels", "Pixels (rows * columns) of decoded images.",
                                      buckets=_PIXEL_BUCKETS, **r)  # fmt: skip
        self.reliability = Histogram(p + "reliability_ratio", "Reliability (1 - failure probability) of "
                                     "scored images.", buckets=RATIO_BUCKETS, **r)  # fmt: skip
        self.failure_probability = Histogram(p + "failure_probability_ratio", "Failure probability of scored "
                                             "images.", buckets=RATIO_BUCKETS, **r)  # fmt: skip
        self.images_scored = Counter(p + "images_scored", "Images scored.", **r)
        self.cluster_assignments = Counter(p + "cluster_assignments", "Scored images by most likely cluster.",
                                           ["cluster"], **r)  # fmt: skip
        self.blind_spot_images = Counter(
            p + "blind_spot_images", "Scored images in a blind-spot cluster.", **r
        )
        self.novel_images = Counter(p + "novel_images", "Scored images flagged novel.", **r)
        self.out_of_scope_images = Counter(
            p + "out_of_scope_images",
            "Scored images whose header puts them out of the model's scope, by the first field that "
            "failed (modality, body_part, view_position).",
            ["field"],
            **r,
        )
        self.untrusted_images = Counter(
            p + "untrusted_images",
            "Scored images not trusted (novel or out of scope); their reliability is reported as the "
            "lower end of its interval (0).",
            **r,
        )
        self.colour_conversions = Counter(
            p + "colour_conversions",
            "Colour-coded images accepted as grey and converted to luminance, by what the conversion "
            "removed (noise, tint, overlay).",
            ["kind"],
            **r,
        )
        self.predicted_failures = Counter(
            p + "predicted_failures",
            "Sum of label-free cluster failure probabilities of scored images; "
            "rate(predicted) / rate(scored) is the fleet's estimated failure rate.",
            **r,
        )
        self.outcomes = Counter(p + "outcomes", "Outcomes reported through ReportOutcome, by the image's "
                                "cluster and outcome (failure|success).", ["cluster", "outcome"], **r)  # fmt: skip
        self.predicted_failures_with_outcome = Counter(
            p + "predicted_failures_with_outcome",
            "Sum of label-free predicted failure probabilities of images whose outcome was reported.",
            **r,
        )
        self.reference_cluster = Gauge(p + "reference_cluster_ratio", "Share of each cluster in the model's "
                                       "reference set (constant).", ["cluster"], **r)  # fmt: skip
        self.reference_failure = Gauge(
            p + "reference_failure_ratio",
            "Mean label-free predicted failure probability over the model's reference set (constant): "
            "the baseline for the estimated failure rate.",
            **r,
        )
        self.cluster_blind_spot = Gauge(
            p + "cluster_blind_spot",
            "1 if the cluster is a blind spot of the model (failure-rate interval above the global rate, "
            "BH-significant), else 0 (constant).",
            ["cluster"],
            **r,
        )
        self.info = Info("cxr_monitor", "The loaded model and server versions.", **r)
        for kind in COLOUR_KINDS:
            self.colour_conversions.labels(kind=kind)
        for name in SCOPE_FIELDS:
            self.out_of_scope_images.labels(field=name)
        self.inflight = Gauge(p + "inflight_requests", "RPCs being handled now (streams count once).", **r)
        self.model_loaded = Gauge(p + "model_loaded", "1 once the model is loaded and served, else 0.", **r)
        self.shed = Counter(p + "shed_requests", "Images refused at admission with RESOURCE_EXHAUSTED, by the "
                            "limit they hit: in_flight, deadline (cannot be served in time) or memory.",
                            ["reason"], **r)  # fmt: skip
        for reason in SHED_REASONS:
            self.shed.labels(reason=reason)
        self.model_reloads = Counter(p + "model_reloads", "Hot reloads (SIGHUP) by result: loaded, or refused "
                                     "(the old model kept serving).", ["result"], **r)  # fmt: skip
        for result in ("loaded", "refused"):
            self.model_reloads.labels(result=result)
        self.source_images = Counter(p + "source_images_scored", "Images scored, by source (grpc, or the "
                                     "DICOM calling AE title's label).", ["source"], **r)  # fmt: skip
        self.source_novel_images = Counter(p + "source_novel_images", "Scored images flagged novel, by "
                                           "source.", ["source"], **r)  # fmt: skip
        self.source_predicted_failures = Counter(
            p + "source_predicted_failures",
            "Sum of label-free cluster failure probabilities of scored images, by source.",
            ["source"],
            **r,
        )
        self._drift: _DriftCollector | None = None
        self._source_drift: _DriftCollector | None = None

    def set_model(
        self,
        *,
        model_id: str,
        spec_version: str,
        version: str,
        reference_mix: Iterable[float],
        reference_failure_rate: float = float("nan"),
        blind_spots: Iterable[bool] = (),
    ) -> None:
        """Describe the loaded model and pre-initialise every per-cluster series to 0.

        Called again after a hot reload: the constant per-cluster gauges are replaced (the new
        model may have fewer clusters); counters keep their series (join on ``model_id``).
        """
        self.reference_cluster.clear()
        self.cluster_blind_spot.clear()
        self.info.info({"model_id": model_id, "spec_version": spec_version, "version": version})
        self.reference_failure.set(float(reference_failure_rate))
        blind = list(blind_spots)
        for c, share in enumerate(reference_mix):
            label = str(c)
            self.reference_cluster.labels(cluster=label).set(float(share))
            self.cluster_blind_spot.labels(cluster=label).set(float(blind[c]) if c < len(blind) else 0.0)
            self.cluster_assignments.labels(cluster=label)
            for outcome in ("failure", "success"):
                self.outcomes.labels(cluster=label, outcome=outcome)
        self.model_loaded.set(1)

    def watch_windows(self, snapshot: Callable[[], Mapping[str, WindowSnapshot]]) -> None:
        """Export the drift window gauges from ``snapshot()`` (called on every collection)."""
        if self._drift is not None:
            self.registry.unregister(self._drift)
        self._drift = _DriftCollector(lambda: {(w,): snap for w, snap in snapshot().items()})
        self.registry.register(self._drift)

    def watch_store(self, stats: Callable[[], Mapping[str, int]]) -> None:
        """Export the outcome store's counters from ``stats()`` (called on every collection)."""
        self.registry.register(_StoreCollector(stats))

    def watch_source_windows(self, snapshot: Callable[[], Mapping[tuple[str, str], WindowSnapshot]]) -> None:
        """Export ``cxr_monitor_source_drift_*{source, window}`` from ``snapshot()`` (each collection)."""
        if self._source_drift is not None:
            self.registry.unregister(self._source_drift)
        self._source_drift = _DriftCollector(snapshot, PREFIX + "source_", ("source", "window"))
        self.registry.register(self._source_drift)

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method=method, code=code).inc()
        self.request_duration.labels(method=method).observe(seconds)

    def observe_shed(self, reason: str) -> None:
        self.shed.labels(reason=reason).inc()

    def observe_input(self, size_bytes: int) -> None:
        self.image_size.observe(size_bytes)

    def observe_scored(self, scored: ScoredImage, source: str = "grpc") -> None:
        """Count one scored image: stages, size, reliability, cluster, flags, predicted failures.

        ``source`` must come from a bounded set (see the module docstring).
        """
        for stage in ("decode", "profile", "score"):
            self.stage_duration.labels(stage=stage).observe(scored.timings[stage])
        r = scored.result
        self.image_pixels.observe(scored.meta.rows * scored.meta.columns)
        self.reliability.observe(r.reliability)
        self.failure_probability.observe(r.failure_probability)
        self.images_scored.inc()
        self.cluster_assignments.labels(cluster=str(r.cluster)).inc()
        if r.in_blind_spot:
            self.blind_spot_images.inc()
        if r.is_novel:
            self.novel_images.inc()
        if r.out_of_scope:
            self.out_of_scope_images.labels(field=r.scope_field).inc()
        if not r.trusted:
            self.untrusted_images.inc()
        if scored.meta.colour_conversion:
            self.colour_conversions.labels(kind=scored.meta.colour_conversion).inc()
        self.predicted_failures.inc(_finite(r.cluster_failure_probability))
        self.source_images.labels(source=source).inc()
        if r.is_novel:
            self.source_novel_images.labels(source=source).inc()
        self.source_predicted_failures.labels(source=source).inc(_finite(r.cluster_failure_probability))

    def observe_outcome(self, cluster: int, failure: bool, predicted_failure_probability: float) -> None:
        self.outcomes.labels(cluster=str(cluster), outcome="failure" if failure else "success").inc()
        self.predicted_failures_with_outcome.inc(_finite(predicted_failure_probability))


class DicomMetrics:
    """The DICOM storage node's metrics on ``registry`` (created only when the node is enabled).

    ``source`` labels are the node's bounded caller labels (allow-listed AE titles, ``other``).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = {"registry": registry}
        p = PREFIX + "dicom_"
        self.associations = Counter(
            p + "associations",
            "Association requests, by result: accepted, or rejected_calling_ae / rejected_called_ae / "
            "rejected_host (not on the allow-list).",
            ["result"],
            **r,
        )
        self.contexts_refused = Counter(
            p + "contexts_refused",
            "Presentation contexts refused at association, by reason: abstract_syntax (not a radiograph "
            "storage or verification SOP class) or transfer_syntax (one the loader cannot decode).",
            ["source", "reason"],
            **r,
        )
        self.echoes = Counter(p + "echoes", "C-ECHO requests answered.", ["source"], **r)
        self.stores = Counter(
            p + "stores",
            "C-STORE requests by result: queued (status 0x0000) or the reason of the failure status "
            "(queue_full, overloaded and not_ready 0xA700, no_pixel_data 0xA900, malformed / unsupported_image / "
            "too_large / internal 0xC000).",
            ["source", "result"],
            **r,
        )
        self.scoring_failures = Counter(
            p + "scoring_failures",
            "Queued instances that could not be scored after the C-STORE reply, by reason: malformed, "
            "no_pixel_data, unsupported_image, too_large, decode_timeout, decoder_crashed, internal.",
            ["source", "reason"],
            **r,
        )
        self.store_ack = Histogram(
            p + "store_ack_seconds",
            "Time from a received C-STORE dataset to its reply status (header check and queueing).",
            buckets=_STAGE_BUCKETS,
            **r,
        )
        self.queue_wait = Histogram(
            p + "queue_wait_seconds",
            "Time a received instance waited in the queue before scoring started.",
            buckets=_LATENCY_BUCKETS,
            **r,
        )
        self.queue_images = Gauge(p + "queue_images", "Received instances waiting to be scored.", **r)
        self.queue_capacity = Gauge(p + "queue_capacity_images", "Size of the scoring queue (constant).", **r)


def _finite(value: Any) -> float:
    v = float(value)
    return v if math.isfinite(v) and v >= 0 else 0.0
