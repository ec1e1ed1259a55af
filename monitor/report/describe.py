"""Plain-language descriptions of a fitted model's clusters: spectrum and metadata.

Everything here is numpy only (no matplotlib), so notebooks and the renderer share
one source for every number a report states.

Spectral descriptions start from the cluster's mean standardised profile
(``model.cluster_feature_mean``, in reference standard deviations, "z"), turn the
features that differ by at least ``min_z`` back into their own units and say what
usually causes such a difference. The reference is the whole fit set: its mean
profile is ``model.clusterer.mean_``. Log10 energy fractions are compared as
energies, ``10 ** (cluster - reference) - 1``, so "+40%" means the cluster's images
hold 40% more of their energy in that range than the fit set's average image
(geometric mean over images).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ..model import ReliabilityModel
from ..reliability import cramers_v

__all__ = [
    "ClusterDescription",
    "CompositionTable",
    "Finding",
    "FrequencyRange",
    "MetadataComposition",
    "band_centres",
    "check_cluster",
    "cluster_highlights",
    "cluster_raw_means",
    "describe_cluster",
    "frequency_ranges",
    "metadata_composition",
    "range_energy_stats",
]

DEFAULT_MIN_Z = 0.5
"""Smallest |cluster mean - reference mean| (in reference SDs) a description mentions."""

_BAND_PREFIX = "log_energy_band_"


@dataclass(frozen=True)
class FrequencyRange:
    """A range of radial frequency bands, in cycles per image, and what lives there."""

    key: str
    label: str
    low: float
    high: float
    content: str
    more: str  # likely cause of more energy here than the reference
    less: str  # likely cause of less


@dataclass(frozen=True)
class Finding:
    """One way a cluster differs from the reference.

    ``z`` is the difference in reference standard deviations (for a frequency
    range, the mean over its bands); ``change`` is the same difference in the
    feature's own units ("+42% energy", "slope -3.41 vs -3.12").
    """

    key: str
    z: float
    change: str
    meaning: str

    @property
    def text(self) -> str:
        return f"{self.change}: {self.meaning}"


@dataclass(frozen=True)
class ClusterDescription:
    """What distinguishes one cluster, in words and numbers."""

    cluster: int
    findings: tuple[Finding, ...]
    summary: str


def check_cluster(model: ReliabilityModel, cluster: int) -> int:
    """Validate a cluster index against the model; return it as int."""
    k = model.n_clusters
    if not isinstance(cluster, (int, np.integer)) or not 0 <= cluster < k:
        raise InvalidInputError(f"cluster must be an integer in [0, {k}), got {cluster!r}")
    return int(cluster)


def band_centres(model: ReliabilityModel) -> np.ndarray:
    """Geometric centre of each frequency band, cycles/image, shape (n_bands,)."""
    e = model.profiler.band_edges
    return np.sqrt(e[:-1] * e[1:])


def cluster_raw_means(model: ReliabilityModel) -> np.ndarray:
    """Mean profile of each cluster in feature units, shape (n_clusters, n_features).

    Undoes the standardisation of ``model.cluster_feature_mean``; equal to the mean
    of the fit profiles assigned to each cluster.
    """
    c = model.clusterer
    return c.mean_ + c.scale_ * np.asarray(model.cluster_feature_mean)


def _band_indices(model: ReliabilityModel) -> np.ndarray:
    names = model.feature_names
    return np.array([i for i, n in enumerate(names) if n.startswith(_BAND_PREFIX)], dtype=np.intp)


def frequency_ranges(model: ReliabilityModel) -> tuple[FrequencyRange, ...]:
    """Four band ranges, scaled to the profiler's working size (shown for 512 px).

    coarse < 4 cycles/image; large structures 4 to n/32 (16); medium detail n/32 to
    n/8 (64); fine detail >= n/8 up to Nyquist, n/2 (256). The n/8 split matches the
    "high" zone of the spectral slope and direction features.
    """
    n = model.profiler.working_size
    return (
        FrequencyRange(
            "coarse",
            "coarse-scale",
            0.0,
            4.0,
            "overall brightness layout",
            "large brightness gradients: exposure, collimation or body size",
            "flatter overall brightness layout",
        ),
        FrequencyRange(
            "large",
            "large-structure",
            4.0,
            n / 32,
            "lung fields, heart, diaphragm",
            "stronger large-scale contrast (anatomy or positioning)",
            "weaker large-scale contrast",
        ),
        FrequencyRange(
            "medium",
            "medium-detail",
            n / 32,
            n / 8,
            "ribs, vessels, lung texture",
            "more contrast in ribs, vessels and texture (processing or anatomy)",
            "less contrast in ribs, vessels and texture (smoothing or low dose)",
        ),
        FrequencyRange(
            "fine",
            "high-frequency",
            n / 8,
            n / 2 + 1,
            "fine detail, edges, noise",
            "edge enhancement or noise",
            "blur, lower resolution or heavy smoothing",
        ),
    )


def _range_bands(model: ReliabilityModel, rng: FrequencyRange) -> np.ndarray:
    """Feature indices of the bands whose centre falls in ``rng``."""
    centres = band_centres(model)
    bands = _band_indices(model)
    return bands[(centres >= rng.low) & (centres < rng.high)]


def _fit_labels(model: ReliabilityModel) -> np.ndarray | None:
    """Cluster of each fit profile (from the records, else predicted); None without profiles."""
    if model.fit_profiles is None:
        return None
    recs = model.fit_records or []
    if len(recs) == model.fit_profiles.shape[0] and all("cluster" in r for r in recs):
        return np.array([int(r["cluster"]) for r in recs])
    return model.clusterer.predict(model.fit_profiles)


def range_energy_stats(model: ReliabilityModel, cluster: int, rng: FrequencyRange) -> tuple[float, float]:
    """Energy change of ``cluster`` over the reference in ``rng``, and its size in SDs.

    With the fit profiles at hand, each image's energy in the range is the sum of its
    bands' energy fractions; the change compares the cluster's geometric-mean range
    energy with the fit set's (0.4 = +40%), and the z-score divides the difference of
    the log10 means by the fit set's SD of the log10 range energy. Without them
    (older models) the change is computed from the band means and z is the mean of
    the bands' z-scores.

    Returns
    -------
    change : float
    z : float
    """
    cluster = check_cluster(model, cluster)
    idx = _range_bands(model, rng)
    if idx.size == 0:
        return float("nan"), float("nan")
    labels = _fit_labels(model)
    if labels is not None and np.any(labels == cluster):
        log_e = np.log10(np.sum(10.0 ** model.fit_profiles[:, idx], axis=1))
        diff = float(log_e[labels == cluster].mean() - log_e.mean())
        sd = float(log_e.std())
        return 10.0**diff - 1.0, diff / sd if sd > 1e-12 else 0.0
    mine = cluster_raw_means(model)[cluster, idx]
    ref = model.clusterer.mean_[idx]
    z = float(np.mean(np.asarray(model.cluster_feature_mean)[cluster, idx]))
    return float(np.sum(10.0**mine) / np.sum(10.0**ref) - 1.0), z


def _pct(x: float) -> str:
    """Signed percentage; differences under 1% keep one decimal so they never read as 0."""
    v = 100.0 * x
    if abs(v) < 1:
        return f"{v:+.1f}%"
    return f"{v:+.0f}%"


def _ratio_pct(log10_diff: float) -> str:
    return _pct(10.0**log10_diff - 1.0)


def _scalar_finding(name: str, z: float, mine: float, ref: float) -> Finding | None:
    """Plain-language finding for a non-band feature (``None`` for unknown names)."""
    up = z > 0
    if name.startswith("spectral_slope_"):
        zone = "mid-frequency" if name.endswith("_mid") else "high-frequency"
        change = f"{'flatter' if up else 'steeper'} {zone} spectral slope ({mine:.2f} vs {ref:.2f})"
        meaning = (
            "energy falls off more slowly with frequency: sharpening, edge enhancement or noise"
            if up
            else "energy falls off faster with frequency: blur / lower resolution"
        )
        return Finding(name, z, change, meaning)
    if name.startswith("direction_x_over_y_"):
        zone = "mid" if name.endswith("_mid") else "high"
        change = f"horizontal/vertical energy ratio at {zone} frequencies {_ratio_pct(mine - ref)}"
        meaning = (
            "vertical lines or stripes (e.g. anti-scatter grid), or blur along the vertical direction"
            if up
            else "horizontal lines or stripes, or blur along the horizontal direction"
        )
        return Finding(name, z, change, meaning)
    if name == "direction_axes_over_diagonal_high":
        change = f"{_ratio_pct(mine - ref)} fine-detail energy along the image axes relative to diagonals"
        meaning = (
            "row/column patterns: grid lines, detector line artefacts or resampling"
            if up
            else "fewer row/column patterns than the reference"
        )
        return Finding(name, z, change, meaning)
    if name == "peak_to_band_mean_high":
        change = (
            f"{'stronger' if up else 'weaker'} periodic peak "
            f"({10**mine:.0f}x the band mean vs {10**ref:.0f}x in the reference)"
        )
        meaning = "grid lines or stripes" if up else "fewer periodic patterns (grid lines, stripes)"
        return Finding(name, z, change, meaning)
    if name == "jpeg_blockiness":
        change = (
            f"{'blockier' if up else 'less blocky'} (gradients at 8-pixel block borders "
            f"{10**mine:.2f}x those elsewhere, reference {10**ref:.2f}x)"
        )
        meaning = "JPEG compression" if up else "less JPEG compression than the reference"
        return Finding(name, z, change, meaning)
    if name.startswith("intensity_"):
        return _intensity_finding(name, z, mine, ref)
    return None


# name → (what it is, meaning when higher, meaning when lower); the spec's intensity component.
# The causes named are those that moved each feature in that direction when benchmarks/shifts.py's
# photometric shifts were applied to kermany/test (benchmarks/e2_acquisition_shifts.py): brightness
# (gain), contrast, gamma (display curve), window, equalisation and CLAHE. Equalisation and CLAHE
# move the quartile positions and the skewness toward those of a flat histogram, so the direction
# depends on the images' own histogram; both directions name them.
_EVENING = "histogram equalisation or CLAHE evening out the grey levels"
_INTENSITY_WORDS: dict[str, tuple[str, str, str]] = {
    "intensity_mean_of_range": (
        "mean grey level",
        "brighter images: brightness up (higher exposure or gain), a brighter window, "
        "or a brighter display curve (gamma below 1)",
        "darker images: brightness down (lower exposure or gain), a darker window, "
        "or a darker display curve (gamma above 1)",
    ),
    "intensity_std_of_range": (
        "grey-level spread",
        "more global contrast: a contrast increase, higher gain (brightness up), a narrower window "
        "or histogram equalisation",
        "less global contrast: a contrast decrease, lower gain (brightness down), a wider window "
        "or a flatter processing curve",
    ),
    "intensity_p01_of_range": (
        "darkest 1% level",
        "raised blacks: a contrast decrease, a lifted window or a brighter display curve (gamma below 1)",
        "deeper blacks: a contrast increase, a narrower window or histogram equalisation",
    ),
    "intensity_p99_of_range": (
        "brightest 1% level",
        "brighter highlights: brightness up (more exposure or gain), a contrast increase, "
        "or histogram equalisation / CLAHE stretching to the top of the range",
        "dimmer highlights: brightness down (less exposure or gain) or a contrast decrease",
    ),
    "intensity_quantile_position_25": (
        "lower-quartile position within the grey range",
        f"lifted shadows: a brighter display curve (gamma below 1), or {_EVENING}",
        f"darker shadows: a darker display curve (gamma above 1), a contrast increase that clips, or {_EVENING}",
    ),
    "intensity_quantile_position_50": (
        "median position within the grey range",
        f"brighter mid-tones: a brighter display curve (gamma below 1), or {_EVENING}",
        f"darker mid-tones: a darker display curve (gamma above 1), or {_EVENING}",
    ),
    "intensity_quantile_position_75": (
        "upper-quartile position within the grey range",
        f"brighter upper mid-tones: a brighter display curve (gamma below 1), or {_EVENING}",
        f"darker upper mid-tones: a darker display curve (gamma above 1), or {_EVENING}",
    ),
    "intensity_skewness": (
        "skewness of the grey levels",
        "grey levels piled toward the dark end with a bright tail: a darker display curve (gamma above 1), "
        f"a contrast increase, or {_EVENING}",
        f"grey levels piled toward the bright end with a dark tail: a brighter display curve (gamma below 1), "
        f"or {_EVENING}",
    ),
    "intensity_histogram_entropy": (
        "evenness of the grey-level histogram",
        "flatter histogram: histogram equalisation or CLAHE (adaptive local equalisation)",
        "more peaked histogram: clipping (brightness or contrast pushed past the range), "
        "a narrower window or a display curve (gamma) crowding the grey levels",
    ),
    "intensity_log_share_at_min": (
        "share of pixels at the darkest value",
        "clipping at the dark end: a contrast increase or a narrower window pushing pixels to black",
        "fewer pixels clipped to black",
    ),
    "intensity_log_share_at_max": (
        "share of pixels at the brightest value",
        "clipping at the bright end (saturation): brightness up (too much exposure or gain), "
        "a contrast increase, a narrower window or histogram equalisation",
        "fewer pixels saturated to white",
    ),
}


def _intensity_finding(name: str, z: float, mine: float, ref: float) -> Finding | None:
    words = _INTENSITY_WORDS.get(name)
    if words is None:
        return None
    what, higher, lower = words
    if name.startswith("intensity_log_share_"):
        change = f"{'more' if z > 0 else 'fewer'} pixels at the extreme ({10**mine:.2%} vs {10**ref:.2%})"
    elif name.endswith("_of_range"):
        change = f"{'higher' if z > 0 else 'lower'} {what} ({mine:.0%} of the stored range vs {ref:.0%})"
    else:
        change = f"{'higher' if z > 0 else 'lower'} {what} ({mine:.2f} vs {ref:.2f})"
    return Finding(name, z, change, higher if z > 0 else lower)


def describe_cluster(
    model: ReliabilityModel, cluster: int, min_z: float = DEFAULT_MIN_Z
) -> ClusterDescription:
    """What distinguishes ``cluster`` from the reference, strongest first.

    Parameters
    ----------
    model : ReliabilityModel
    cluster : int
    min_z : float, default=0.5
        Mention a feature (or frequency range) only when its cluster mean differs
        from the reference mean by at least this many reference SDs.

    Returns
    -------
    ClusterDescription
        ``findings`` sorted by decreasing |z|; ``summary`` one sentence.
    """
    cluster = check_cluster(model, cluster)
    z = np.asarray(model.cluster_feature_mean)[cluster]
    mine = cluster_raw_means(model)[cluster]
    ref = model.clusterer.mean_
    names = model.feature_names
    candidates: list[Finding] = []
    for rng in frequency_ranges(model):
        idx = _range_bands(model, rng)
        if idx.size == 0:
            continue
        change, rz = range_energy_stats(model, cluster, rng)
        lo, hi = rng.low, min(rng.high, model.profiler.working_size / 2)
        span = f"< {hi:.0f}" if lo == 0 else f"{lo:.0f}-{hi:.0f}"
        candidates.append(
            Finding(
                f"energy_{rng.key}",
                rz,
                f"{_pct(change)} {rng.label} energy ({span} cycles/image: {rng.content})",
                rng.more if rz > 0 else rng.less,
            )
        )
    for j, name in enumerate(names):
        if name.startswith(_BAND_PREFIX):
            continue
        f = _scalar_finding(name, float(z[j]), float(mine[j]), float(ref[j]))
        if f is not None:
            candidates.append(f)
    candidates.sort(key=lambda f: -abs(f.z))
    findings = tuple(f for f in candidates if abs(f.z) >= min_z)
    if findings:
        summary = "Differs from the reference mainly by " + "; ".join(
            f.change.split(" (")[0] for f in findings[:2]
        )
        summary += "."
    elif candidates:
        top = candidates[0]
        summary = (
            f"Close to the reference profile: no feature differs by {min_z:g} SD or more "
            f"(largest: {top.change.split(' (')[0]}, {top.z:+.2f} SD)."
        )
    else:
        summary = "No interpretable spectral features in this model."
    return ClusterDescription(cluster, findings, summary)


# --------------------------------------------------------------------------- metadata

# Friendlier names for columns written by `cxr-monitor fit` and common outcome tables.
_LABELS = {
    "view": "view",
    "sex": "sex",
    "age": "age band",
    "pixel_spacing_mm": "pixel spacing, mm (scanner proxy)",
    "img_pixel_spacing_mm": "pixel spacing from header, mm (scanner proxy)",
    "img_manufacturer": "manufacturer (DICOM)",
    "img_manufacturer_model_name": "scanner model (DICOM)",
    "img_view_position": "view position (DICOM)",
    "img_modality": "modality (DICOM)",
    "img_photometric_interpretation": "photometric interpretation",
    "img_transfer_syntax": "transfer syntax",
    "img_format": "file format",
    "img_bits_stored": "bits stored",
}
_RESERVED = frozenset({"image", "cluster", "failure", "img_source"})
_MISSING = frozenset({"", "nan", "none", "null", "na", "n/a"})
_AGE_BANDS = ((0, 20), (20, 40), (40, 60), (60, 80), (80, math.inf))


@dataclass(frozen=True)
class CompositionTable:
    """How one metadata column's values spread over the clusters.

    counts : ndarray of shape (n_categories, n_clusters), dtype=int
        Images of each category in each cluster (for ``multi-label`` columns an
        image counts once under each of its labels).
    cluster_sizes : ndarray of shape (n_clusters,)
        Images per cluster with a known value of this column (the denominators).
    failure_rate : ndarray of shape (n_categories,)
        Classifier failure rate among the fit images in each category.
    cramers_v : float or None
        Association of the column with the cluster (single-valued columns only).
    """

    column: str
    label: str
    kind: str  # "categorical", "binned" or "multi-label"
    categories: tuple[str, ...]
    counts: np.ndarray
    cluster_sizes: np.ndarray
    category_sizes: np.ndarray
    failure_rate: np.ndarray
    n_missing: int
    cramers_v: float | None

    def share(self) -> np.ndarray:
        """Share of each cluster's images in each category, shape (n_categories, n_clusters)."""
        return self.counts / np.maximum(self.cluster_sizes, 1)[None, :]

    def overall_share(self) -> np.ndarray:
        return self.category_sizes / max(int(self.cluster_sizes.sum()), 1)


@dataclass(frozen=True)
class MetadataComposition:
    """Composition tables plus what was left out and why."""

    tables: tuple[CompositionTable, ...]
    constant: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _label(column: str) -> str:
    return _LABELS.get(column, column.removeprefix("img_").replace("_", " "))


def _missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and not math.isfinite(v):
        return True
    return str(v).strip().lower() in _MISSING


def _as_float(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fmt_number(x: float) -> str:
    return f"{x:.4g}"


def _bin_labels_numeric(column: str, values: list[float]) -> tuple[list[str], list[str]]:
    """Labels for a many-valued numeric column: age in 20-year bands, else quartiles."""
    if "age" in column.lower().split("_") or column.lower() == "age":
        order = []
        labels = []
        for lo, hi in _AGE_BANDS:
            order.append(f"{lo}+" if hi == math.inf else f"{lo}-{hi - 1}")
        for v in values:
            for (lo, hi), name in zip(_AGE_BANDS, order, strict=True):
                if lo <= v < hi:
                    labels.append(name)
                    break
            else:
                labels.append("<0")
        return labels, order
    edges = np.unique(np.quantile(values, [0, 0.25, 0.5, 0.75, 1.0]))
    if edges.size < 2:
        return [_fmt_number(v) for v in values], [_fmt_number(edges[0])]
    integer = all(float(v).is_integer() for v in values)
    if integer:
        edges = np.unique(np.floor(edges))
    idx = np.clip(np.searchsorted(edges, values, side="left") - 1, 0, len(edges) - 2)
    order = []
    for j, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        if integer:
            lo = int(a) if j == 0 else int(a) + 1
            order.append(f"{lo}-{int(b)}" if lo < b else f"{int(b)}")
        else:
            order.append(f"{'[' if j == 0 else '('}{_fmt_number(a)}, {_fmt_number(b)}]")
    return [order[i] for i in idx], order


def metadata_composition(
    model: ReliabilityModel,
    max_columns: int = 8,
    max_categories: int = 8,
) -> MetadataComposition:
    """Composition of each cluster by the metadata columns of ``model.fit_records``.

    Any column is accepted, as models fitted from the CLI carry whatever columns
    the outcomes table had. Single-valued columns with at most ``max_categories``
    distinct values are shown as they are; numeric ones with more are binned (age
    in 20-year bands, others in quartiles); text columns whose values are
    ``|``-separated label lists become multi-label tables of their most common
    labels; other many-valued columns (identifiers, free text) are skipped.
    Columns are ordered by their association with the cluster (Cramér's V).

    Returns
    -------
    MetadataComposition
    """
    records = model.fit_records or []
    if not records:
        return MetadataComposition((), {}, {"(all)": "the model holds no fit records"})
    k = model.n_clusters
    clusters = np.array([int(r.get("cluster", -1)) for r in records])
    failures = np.array([int(r.get("failure", 0)) for r in records])
    columns: list[str] = []
    for r in records:
        for c in r:
            if c not in _RESERVED and c not in columns:
                columns.append(c)
    tables: list[CompositionTable] = []
    constant: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for col in columns:
        raw = [r.get(col) for r in records]
        known = [i for i, v in enumerate(raw) if not _missing(v)]
        if not known:
            skipped[col] = "no values"
            continue
        text = [str(raw[i]).strip() for i in known]
        distinct = set(text)
        if len(distinct) == 1:
            v = text[0]
            num = _as_float(v)
            constant[_label(col)] = _fmt_number(num) if num is not None else v
            continue
        numbers = [_as_float(v) for v in text]
        numeric = all(x is not None for x in numbers)
        kind = "categorical"
        multi: list[list[str]] | None = None
        if not numeric and any("|" in v for v in text):
            kind = "multi-label"
            multi = [[p.strip() for p in v.split("|") if p.strip()] for v in text]
            tally = Counter(p for parts in multi for p in parts)
            order = [v for v, _ in tally.most_common(max_categories)]
            labels = []
        elif len(distinct) <= max_categories:
            if numeric:
                labels = [_fmt_number(x) for x in numbers]
                order = [_fmt_number(x) for x in sorted({float(x) for x in numbers})]
                order = list(dict.fromkeys(order))
            else:
                labels = text
                order = [v for v, _ in Counter(text).most_common()]
        elif numeric:
            kind = "binned"
            labels, order = _bin_labels_numeric(col, [float(x) for x in numbers])
            order = [o for o in order if o in set(labels)]
        else:
            skipped[col] = f"{len(distinct)} distinct values"
            continue
        ci = clusters[known]
        fi = failures[known]
        ok = (ci >= 0) & (ci < k)
        cluster_sizes = np.bincount(ci[ok], minlength=k)
        counts = np.zeros((len(order), k), dtype=np.intp)
        fails = np.zeros(len(order))
        sizes = np.zeros(len(order), dtype=np.intp)
        pos = {v: j for j, v in enumerate(order)}
        for row in range(len(known)):
            if not ok[row]:
                continue
            cats = multi[row] if multi is not None else [labels[row]]
            for cat in set(cats):
                j = pos.get(cat)
                if j is None:
                    continue
                counts[j, ci[row]] += 1
                sizes[j] += 1
                fails[j] += fi[row]
        if kind != "multi-label" and len(order) > max_categories:
            # Keep the most common categories; the rest would make the table unreadable.
            keep = np.sort(np.argsort(-sizes, kind="stable")[:max_categories])
            order = [order[j] for j in keep]
            counts, sizes, fails = counts[keep], sizes[keep], fails[keep]
        v = cramers_v(counts) if kind != "multi-label" else None
        tables.append(
            CompositionTable(
                column=col,
                label=_label(col),
                kind=kind,
                categories=tuple(order),
                counts=counts,
                cluster_sizes=cluster_sizes,
                category_sizes=sizes,
                failure_rate=np.divide(fails, sizes, out=np.full(len(order), np.nan), where=sizes > 0),
                n_missing=len(records) - len(known),
                cramers_v=v,
            )
        )
    tables.sort(key=lambda t: (t.cramers_v is None, -(t.cramers_v or 0.0)))
    for t in tables[max_columns:]:
        skipped[t.column] = f"beyond the first {max_columns} columns"
    return MetadataComposition(tuple(tables[:max_columns]), constant, skipped)


def cluster_highlights(
    composition: MetadataComposition, cluster: int, min_ratio: float = 1.5, min_share: float = 0.15
) -> list[str]:
    """Categories over-represented in ``cluster`` (share at least ``min_ratio`` x overall)."""
    out: list[tuple[float, str]] = []
    for t in composition.tables:
        share = t.share()[:, cluster]
        overall = t.overall_share()
        for j, cat in enumerate(t.categories):
            if share[j] >= min_share and overall[j] > 0 and share[j] / overall[j] >= min_ratio:
                out.append(
                    (
                        share[j] / overall[j],
                        f"{t.label} = {cat}: {100 * share[j]:.0f}% of this cluster vs {100 * overall[j]:.0f}% overall",
                    )
                )
    out.sort(key=lambda x: -x[0])
    return [s for _, s in out]
