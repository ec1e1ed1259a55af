"""Small frozen records passed between the steps load → profile → score → drift."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["DriftReport", "FeatureDrift", "ImageMeta", "LoadedImage", "ScoreResult", "ScoredImage"]


@dataclass(frozen=True)
class ImageMeta:
    """Where an image came from and how it was acquired (``None`` where unknown).

    ``rows``/``columns`` are the native size before any resampling. ``colour_conversion`` says
    what converting a colour-coded image to its luminance removed (``"noise"``, ``"tint"`` or
    ``"overlay"``; ``None`` when the image was grey), ``coloured_share`` the share of its pixels
    that carried colour beyond noise and tint (see :mod:`monitor.colour`).
    """

    source: str
    format: str
    rows: int
    columns: int
    bits_stored: int | None = None
    photometric_interpretation: str | None = None
    transfer_syntax: str | None = None
    modality: str | None = None
    manufacturer: str | None = None
    manufacturer_model_name: str | None = None
    view_position: str | None = None
    pixel_spacing_mm: float | None = None
    body_part_examined: str | None = None
    colour_conversion: str | None = None
    coloured_share: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoadedImage:
    """A decoded radiograph.

    pixels : ndarray of shape (rows, columns), dtype=float32
        Modality values (rescale applied), one polarity: bright = dense (bone).
    """

    pixels: np.ndarray
    meta: ImageMeta


@dataclass(frozen=True)
class ScoreResult:
    """Reliability of one image under a fitted model.

    ``trusted`` is False when the image is novel or out of scope (its header says it is not a
    chest radiograph; ``scope_reasons`` say why, ``scope_field`` names the first field that
    failed). The measured failure rates then do not apply: the failure interval is [0, 1] and
    ``reliability`` is the lower end of the reliability interval, ``1 - failure_interval[1]``
    (0), never the point value a typical image gets. ``failure_probability`` stays the
    extrapolated point estimate, for ranking and drift estimates.
    """

    cluster: int
    memberships: tuple[float, ...]
    failure_probability: float
    failure_interval: tuple[float, float]
    reliability: float
    novelty: float
    is_novel: bool
    log_likelihood: float
    in_blind_spot: bool
    top_features: tuple[tuple[str, float], ...] = field(default=())
    cluster_failure_probability: float = float("nan")
    method: str = "cluster"
    trusted: bool = True
    out_of_scope: bool = False
    scope_field: str = ""
    scope_reasons: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scope_reasons"] = list(self.scope_reasons)
        d["memberships"] = list(self.memberships)
        d["failure_interval"] = list(self.failure_interval)
        d["top_features"] = [{"feature": n, "z": z} for n, z in self.top_features]
        return d


@dataclass(frozen=True)
class FeatureDrift:
    """One profile feature in a window: its mean shift and test against the reference.

    ``shift`` is the window mean in reference standard deviations; ``rank_shift`` the window
    mean normal score (the robust shift the test and ``feature_shift_min`` use, in reference
    SDs for a normally distributed feature; see :class:`monitor.drift.ReferenceRanks`);
    ``q_value`` the Benjamini–Hochberg adjusted ``p_value`` over all features of the report.
    """

    feature: str
    component: str  # "spectral" or "intensity"
    shift: float
    statistic: float
    p_value: float
    q_value: float
    drifted: bool
    rank_shift: float = float("nan")


@dataclass(frozen=True)
class DriftReport:
    """A batch or window of images compared with the model's reference."""

    n_images: int
    drift: bool
    psi: float
    js_distance: float
    chi2_p: float
    novelty_rate: float
    estimated_failure_rate: float
    reference_failure_rate: float
    cluster_counts: tuple[int, ...]
    reference_mix: tuple[float, ...]
    top_shifted_features: tuple[tuple[str, float], ...]
    max_feature_shift: float
    thresholds: dict[str, float]
    reasons: tuple[str, ...] = ()
    mix_drift: bool = False
    novelty_drift: bool = False
    novelty_p: float = 1.0
    # False when so many images are novel that the cluster failure rates are extrapolated.
    failure_estimate_trusted: bool = True
    # Images whose header says they are not chest radiographs (reference: none), by field.
    out_of_scope_rate: float = 0.0
    out_of_scope_drift: bool = False
    out_of_scope_counts: dict[str, int] = field(default_factory=dict)
    intensity_drift: bool = False
    # Verdict per component: "cluster_mix", "novelty", "intensity", "out_of_scope".
    components: dict[str, bool] = field(default_factory=dict)
    feature_drift: tuple[FeatureDrift, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["feature_drift"] = [asdict(f) for f in self.feature_drift]
        d["cluster_counts"] = list(self.cluster_counts)
        d["reference_mix"] = list(self.reference_mix)
        d["top_shifted_features"] = [{"feature": n, "z": z} for n, z in self.top_shifted_features]
        d["reasons"] = list(self.reasons)
        return d


@dataclass(frozen=True)
class ScoredImage:
    """One image through the whole path, as the server and CLI need it.

    z_profile : ndarray of shape (n_features,)
        The profile in reference standard deviations (feeds drift windows).
    timings : seconds spent in ``decode``, ``profile`` and ``score``.
    profile : ndarray of shape (n_features,), dtype=float64, optional
        The raw spectral profile (what the outcome store keeps for refitting).
    """

    result: ScoreResult
    meta: ImageMeta
    z_profile: np.ndarray
    timings: dict[str, float]
    profile: np.ndarray | None = None
