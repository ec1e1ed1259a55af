"""Assemble a report of a fitted model: every number, description and figure, once.

:func:`build_report` computes everything (numbers, descriptions, figures as PNG bytes)
into a :class:`Report`; :mod:`.to_html` and :mod:`.to_markdown` only lay it out, so both
formats state the same numbers with the same formatting (:func:`fmt_rate`,
:func:`fmt_interval`, :func:`fmt_p`, :func:`fmt_v`) and the same table cells (the
``_cluster_cells`` / ``_composition_cells`` helpers here); :mod:`.files` writes them.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ..model import ReliabilityModel
from . import figures as _fig
from .describe import (
    ClusterDescription,
    MetadataComposition,
    cluster_highlights,
    cluster_raw_means,
    describe_cluster,
    metadata_composition,
)

__all__ = [
    "FORMATS",
    "Report",
    "ReportFigure",
    "build_report",
    "fmt_interval",
    "fmt_p",
    "fmt_rate",
    "fmt_v",
]

FORMATS = ("html", "md")
_MAX_FINDINGS = 5  # bullets per cluster; the full feature table follows in the section


# --------------------------------------------------------------------------- formatting


def fmt_rate(x: float) -> str:
    """A rate as a percentage with one decimal: 0.33172 → '33.2%'."""
    return f"{100 * x:.1f}%"


def fmt_interval(lo: float, hi: float) -> str:
    """A 95% interval of rates: '[28.4%, 40.5%]'."""
    return f"[{fmt_rate(lo)}, {fmt_rate(hi)}]"


def fmt_p(p: float) -> str:
    """A p- or q-value with three significant digits: '0.0828', '1.2e-07'."""
    return f"{p:.3g}"


def fmt_v(v: float) -> str:
    """Cramér's V with three decimals."""
    return f"{v:.3f}"


def _v_words(v: float) -> str:
    # Cohen's conventions for a 2-column table (df* = 1): 0.1 small, 0.3 medium, 0.5 large.
    if v < 0.1:
        return "negligible"
    if v < 0.3:
        return "small"
    if v < 0.5:
        return "medium"
    return "large"


# --------------------------------------------------------------------------- the report


@dataclass
class ReportFigure:
    """One figure: a short key (file name in Markdown), alt text, a caption and PNG bytes."""

    key: str
    alt: str
    caption: str
    png: bytes


@dataclass
class ClusterSection:
    cluster: int
    stats: dict[str, Any]  # one row of model.rates.to_json()["clusters"]
    share: float
    status: str  # "blind spot", "below global" or ""
    description: ClusterDescription
    highlights: list[str]
    features: list[tuple[str, float, float, float]]  # name, cluster mean, reference mean, z
    profile: ReportFigure
    thumbnails: ReportFigure | None = None
    thumbnail_note: str = ""


@dataclass
class Report:
    """Everything a rendered report states; built by :func:`build_report`."""

    title: str
    model_id: str
    summary: list[tuple[str, str]]
    interpretation: list[str]
    cluster_rows: list[dict[str, Any]]
    statuses: list[str]
    overview: list[ReportFigure]
    composition: MetadataComposition
    clusters: list[ClusterSection]
    versions: dict[str, str]
    notes: list[str] = field(default_factory=list)
    missing_images: list[tuple[str, str]] = field(default_factory=list)
    generated: str = ""


def _status(row: dict[str, Any], global_rate: float) -> str:
    if row["blind_spot"]:
        return "blind spot"
    if row["upper"] < global_rate:
        return "below global"
    return ""


def _summary_rows(
    model: ReliabilityModel, rates: dict[str, Any], model_path: str | None
) -> list[tuple[str, str]]:
    card = model.card or {}
    fit = card.get("fit_data") or {}
    n = int(model.rates.counts_.sum())
    n_fail = int(model.rates.failures_.sum())
    rows: list[tuple[str, str]] = [("Model id", model.model_id)]
    if model_path:
        rows.append(("Model directory", str(model_path)))
    rows.append(("Spectral profile spec", str(model.profiler.spec()["spec_version"])))
    if card.get("data"):
        rows.append(("Data", str(card["data"])))
    listed = fit.get("n_listed")
    fitted = f"{n} images, {n_fail} classifier failures"
    if listed is not None and int(listed) != n:
        fitted += f" ({int(listed) - n} of {int(listed)} listed images could not be loaded)"
    rows.append(("Fit set", fitted))
    rows.append(("Task", str(card.get("task", "not recorded in the model card"))))
    if card.get("classifier"):
        rows.append(("Classifier", str(card["classifier"])))
    if card.get("failure"):
        rows.append(("Failure means", str(card["failure"])))
    threshold = fit.get("threshold")
    rule = card.get("threshold_rule")
    if rule or threshold is not None:
        text = str(rule) if rule else "given at fit time"
        if threshold is not None:
            text += f" (threshold {float(threshold):.4g})"
        rows.append(("Threshold rule", text))
    elif fit.get("outcome_columns") == "failure":
        rows.append(("Threshold rule", "none: failures given directly in the outcomes table"))
    rows.append(("Global failure rate", f"{fmt_rate(rates['global_rate'])} ({n_fail} of {n})"))
    k = model.n_clusters
    bic = getattr(model.clusterer, "bic_", {}) or {}
    chosen = f"{k}"
    if len(bic) > 1:
        chosen += f" (chosen by BIC among {min(bic)}-{max(bic)})"
    rows.append(("Clusters", chosen))
    rows.append(
        (
            "Cluster vs failure",
            f"chi-square {rates['chi2']:.2f}, p = {fmt_p(rates['chi2_p'])}; G-test p = {fmt_p(rates['g_test_p'])}; "
            f"Cramér's V = {fmt_v(rates['cramers_v'])}",
        )
    )
    blind = [r["cluster"] for r in rates["clusters"] if r["blind_spot"]]
    rows.append(("Blind spots", ", ".join(f"cluster {c}" for c in blind) if blind else "none"))
    scope = model.scope.to_json()
    rows.append(
        (
            "Scope (DICOM headers)",
            "; ".join(
                f"{name.replace('_', ' ')}: {'any' if values is None else ', '.join(values)}"
                for name, values in scope.items()
            )
            + ". Images outside it, and novel images, are scored as not trusted.",
        )
    )
    versions = card.get("versions") or {}
    if versions:
        rows.append(("Fitted with", ", ".join(f"{a} {b}" for a, b in versions.items())))
    return rows


def _interpretation(rates: dict[str, Any], statuses: list[str]) -> list[str]:
    out = []
    p, v = rates["chi2_p"], rates["cramers_v"]
    if p < 0.05:
        out.append(
            f"Failure rates differ between clusters more than chance explains (chi-square p = {fmt_p(p)}); "
            f"the association is {_v_words(v)} (Cramér's V = {fmt_v(v)})."
        )
    else:
        out.append(
            f"The clusters' failure rates do not differ significantly (chi-square p = {fmt_p(p)} ≥ 0.05; "
            f"Cramér's V = {fmt_v(v)}, {_v_words(v)}): treat per-cluster differences as indicative only."
        )
    g = fmt_rate(rates["global_rate"])
    for r, s in zip(rates["clusters"], statuses, strict=True):
        if s == "blind spot":
            out.append(
                f"Cluster {r['cluster']} is a blind spot: its failure rate {fmt_rate(r['rate'])} has a 95% "
                f"interval {fmt_interval(r['lower'], r['upper'])} wholly above the global {g}."
            )
        elif s == "below global":
            out.append(
                f"Cluster {r['cluster']} is safer than average: its 95% interval "
                f"{fmt_interval(r['lower'], r['upper'])} lies wholly below the global {g}."
            )
    if not any(s == "blind spot" for s in statuses):
        out.append(f"No blind spot: no cluster's 95% interval lies wholly above the global {g}.")
    return out


def _figure(key: str, alt: str, caption: str, make: Callable[[], Any], dpi: int = 110) -> ReportFigure:
    return ReportFigure(key, alt, caption, _fig.figure_to_png(make(), dpi=dpi))


def build_report(
    model: ReliabilityModel,
    images: str | os.PathLike | None = None,
    *,
    model_path: str | os.PathLike | None = None,
    n_thumbnails: int = 8,
    title: str | None = None,
) -> Report:
    """Compute every number, description and figure of the report.

    Parameters
    ----------
    model : ReliabilityModel
    images : path, optional
        Folder holding the fit images (as named in ``model.fit_records``); when
        given, each cluster gets a grid of thumbnails. Missing files are noted.
    model_path : path, optional
        Shown in the summary.
    n_thumbnails : int, default=8
        Thumbnails per row (nearest the centre; failures).

    Raises
    ------
    InvalidInputError
        ``images`` is not a folder, or ``n_thumbnails`` is not positive.
    """
    if n_thumbnails < 1:
        raise InvalidInputError(f"n_thumbnails must be >= 1, got {n_thumbnails}")
    if images is not None and not Path(images).is_dir():
        raise InvalidInputError(f"{images}: image folder not found")
    rates = model.rates.to_json()
    statuses = [_status(r, rates["global_rate"]) for r in rates["clusters"]]
    k = model.n_clusters
    n_total = max(int(model.rates.counts_.sum()), 1)
    notes: list[str] = []
    overview = [
        _figure(
            "rates",
            "Bar chart of the failure rate of each cluster",
            "Estimated failure rate of each cluster (Beta posterior, shrunk toward the global rate in "
            "proportion to the cluster's size) with its 95% credible interval; dashed line: global failure "
            "rate. Red bars are blind spots: the whole interval lies above the global rate.",
            lambda: _fig.rates_figure(model),
        )
    ]
    has_profiles = model.fit_profiles is not None
    if has_profiles:
        overview.append(
            _figure(
                "map",
                "Scatter plot of the fit images on the first two principal components",
                "Every fit image placed by the first two principal components of its standardised spectral "
                "profile, coloured by cluster; x = the classifier was wrong. Labels mark cluster centres. "
                "Clusters may separate along components not shown.",
                lambda: _fig.map_figure(model),
            )
        )
    else:
        notes.append("The model holds no fit profiles: the map and the thumbnails are left out.")
    overview.append(
        _figure(
            "spectra",
            "Mean spectrum of each cluster and its energy change per frequency band",
            "Left: mean log10 energy fraction per radial frequency band (geometric band centre, log scale) for "
            "each cluster and for the reference (all fit images). Right: the same as energy change against "
            "the reference (10^difference - 1).",
            lambda: _fig.profiles_figure(model),
        )
    )
    composition = metadata_composition(model)
    ref = model.clusterer.mean_
    raw = cluster_raw_means(model)
    names = model.feature_names
    sections: list[ClusterSection] = []
    missing: list[tuple[str, str]] = []
    for c in range(k):
        row = rates["clusters"][c]
        z = np.asarray(model.cluster_feature_mean)[c]
        section = ClusterSection(
            cluster=c,
            stats=row,
            share=row["n_images"] / n_total,
            status=statuses[c],
            description=describe_cluster(model, c),
            highlights=cluster_highlights(composition, c),
            features=[(names[j], float(raw[c, j]), float(ref[j]), float(z[j])) for j in range(len(names))],
            profile=_figure(
                f"cluster{c}-spectrum",
                f"Spectrum of cluster {c} against the reference",
                "Left: mean spectrum against the reference. Middle: energy change per band, shaded: 95% "
                "interval of the cluster mean. Right: the other features as cluster minus reference in "
                "reference standard deviations (dotted: ±0.5 SD, the threshold for the description).",
                lambda c=c: _fig.cluster_profile_figure(model, c),
            ),
        )
        if images is not None and has_profiles:
            try:
                thumbs = _fig.load_thumbnails(model, images, c, n_thumbnails)
            except InvalidInputError as exc:
                section.thumbnail_note = f"No thumbnails: {exc}"
            else:
                missing.extend(thumbs.missing)
                section.thumbnails = _figure(
                    f"cluster{c}-images",
                    f"Thumbnails of cluster {c}",
                    "Top: the images nearest the cluster centre (Mahalanobis distance in PCA space). Bottom: "
                    "its failures nearest the centre. Red frame: the classifier was wrong.",
                    lambda c=c, t=thumbs: _fig.thumbnails_figure(
                        model, images, c, n_thumbnails, thumbnails=t
                    ),
                )
                if thumbs.missing:
                    section.thumbnail_note = (
                        f"{len(thumbs.missing)} of the selected images could not be loaded and are shown as "
                        "grey tiles."
                    )
        sections.append(section)
    if images is None:
        notes.append("Thumbnails are left out: run with --images DIR (the fit image folder) to include them.")
    if missing:
        notes.append(f"{len(missing)} selected images could not be loaded from {images}.")
    if composition.constant:
        notes.append(
            "Same for every fit image: "
            + "; ".join(f"{col} = {val}" for col, val in composition.constant.items())
            + "."
        )
    if composition.skipped:
        notes.append(
            "Metadata columns not tabulated: "
            + "; ".join(f"{col} ({why})" for col, why in composition.skipped.items())
            + "."
        )
    versions = {str(a): str(b) for a, b in (model.card.get("versions") or {}).items()}
    return Report(
        title=title or f"Failure modes of {model.card.get('name', 'model')} {model.model_id}",
        model_id=model.model_id,
        summary=_summary_rows(model, rates, str(model_path) if model_path else None),
        interpretation=_interpretation(rates, statuses),
        cluster_rows=rates["clusters"],
        statuses=statuses,
        overview=overview,
        composition=composition,
        clusters=sections,
        versions=versions,
        notes=notes,
        missing_images=missing,
        generated=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )


# --------------------------------------------------------------------------- shared pieces

_CLUSTER_HEADER = (
    "cluster",
    "images",
    "share",
    "failures",
    "observed",
    "rate",
    "95% interval",
    "lift",
    "Fisher q",
    "",
)


def _cluster_cells(r: dict[str, Any], share: float, status: str) -> list[str]:
    observed = r["raw_rate"]
    return [
        f"C{r['cluster']}",
        str(r["n_images"]),
        f"{100 * share:.1f}%",
        str(r["n_failures"]),
        fmt_rate(observed) if observed is not None else "–",
        fmt_rate(r["rate"]),
        fmt_interval(r["lower"], r["upper"]),
        f"{r['lift']:.2f}",
        fmt_p(r["fisher_q"]),
        status,
    ]


def _composition_cells(t: Any, k: int) -> tuple[list[str], list[list[str]]]:
    header = [t.label, *(f"C{c}" for c in range(k)), "all", "failure rate"]
    share, overall = t.share(), t.overall_share()
    rows = []
    for j, cat in enumerate(t.categories):
        cells = [str(cat)]
        cells += [f"{100 * share[j, c]:.0f}% ({int(t.counts[j, c])})" for c in range(k)]
        cells.append(f"{100 * overall[j]:.0f}% ({int(t.category_sizes[j])})")
        fr = t.failure_rate[j]
        cells.append(fmt_rate(fr) if np.isfinite(fr) else "–")
        rows.append(cells)
    return header, rows


def _composition_caption(t: Any) -> str:
    parts = []
    if t.kind == "multi-label":
        parts.append("several labels per image: each share is of the cluster's images carrying the label")
    elif t.kind == "binned":
        parts.append("numeric, grouped into bands")
    if t.cramers_v is not None:
        parts.append(f"Cramér's V with cluster = {fmt_v(t.cramers_v)}")
    if t.n_missing:
        parts.append(f"{t.n_missing} images without a value")
    return "; ".join(parts)


_HOW_TO_READ = [
    "Each image is summarised by its spectral profile: how its signal energy spreads over spatial "
    "frequencies (24 radial bands, in cycles per image), plus slopes, directional ratios, a periodic-peak "
    "and a JPEG-blockiness measure (docs/spectral-profile.md).",
    "The fit set's profiles are grouped into clusters (Gaussian mixture on principal components). A "
    "cluster's failure rate is how often the classifier was wrong on its images, shrunk toward the global "
    "rate when the cluster is small; new images that land in a cluster inherit its rate.",
    "A blind spot is a cluster whose whole 95% interval lies above the global failure rate. Fisher q is "
    "the Benjamini-Hochberg adjusted p-value of the cluster against the rest.",
    "A new image is trusted when it is not novel and its DICOM header (if any) puts it in the model's "
    "scope (modality, body part, view). For an untrusted image the rates above do not apply: its failure "
    "interval is [0, 1] and its reliability is reported as the lower end of its interval (0), never a "
    "typical image's value.",
    "The reference is the whole fit set. Energy changes compare geometric-mean energies: +40% means the "
    "cluster's images hold 40% more of their energy in that range than the fit set's average image. SD = "
    "standard deviation of the feature over the fit set.",
]
