"""Assemble a report of a fitted model as one self-contained HTML file or as Markdown.

:func:`build_report` computes everything once (numbers, descriptions, figures as
PNG bytes) into a :class:`Report`; :func:`render_html` and :func:`render_markdown`
only lay it out, so both formats state the same numbers with the same formatting
(:func:`fmt_rate`, :func:`fmt_interval`, :func:`fmt_p`, :func:`fmt_v`).

The HTML embeds its figures as ``data:image/png;base64`` URIs and its CSS inline;
it loads nothing from the network and runs no script, so it can be mailed,
archived or opened offline. The Markdown version writes its PNGs to a folder next
to it (``report.md`` → ``report_files/*.png``).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
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
    "WrittenReport",
    "build_report",
    "fmt_interval",
    "fmt_p",
    "fmt_rate",
    "fmt_v",
    "render_html",
    "render_markdown",
    "write_report",
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
    "The reference is the whole fit set. Energy changes compare geometric-mean energies: +40% means the "
    "cluster's images hold 40% more of their energy in that range than the fit set's average image. SD = "
    "standard deviation of the feature over the fit set.",
]


# --------------------------------------------------------------------------- HTML

_CSS = """
:root { --ink:#1d1d1f; --muted:#5f6368; --line:#dadce0; --bg:#fafafa; --red:#c62828; --green:#2e7d32; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); margin: 0; background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 40px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
p, li { max-width: 920px; }
.sub { color: var(--muted); margin: 0 0 16px; }
nav { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px;
      font-size: 14px; }
nav a { margin-right: 14px; color: #1a56a5; text-decoration: none; white-space: nowrap; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 14px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { width: 200px; background: none; color: var(--muted); font-weight: 500; }
tr.blind td { background: #fdecea; }
tr.blind td:first-child { border-left: 4px solid var(--red); }
tr.below td:first-child { border-left: 4px solid var(--green); }
.badge { display: inline-block; font-size: 12px; font-weight: 700; padding: 1px 8px; border-radius: 10px;
         vertical-align: middle; margin-left: 8px; text-transform: uppercase; letter-spacing: .03em; }
.badge.blind { background: var(--red); color: #fff; }
.badge.below { background: var(--green); color: #fff; }
.callout { border-left: 4px solid var(--muted); background: var(--bg); padding: 8px 14px; margin: 12px 0; }
.callout.blind { border-color: var(--red); background: #fdecea; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: var(--muted); font-size: 13px; max-width: 920px; }
.stats { color: var(--muted); }
.z { color: var(--muted); font-size: 13px; white-space: nowrap; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px;
          vertical-align: -1px; }
details { margin: 6px 0 12px; }
summary { cursor: pointer; color: #1a56a5; }
.cluster { border-top: 1px solid var(--line); }
.note { color: var(--muted); font-size: 14px; }
footer { color: var(--muted); font-size: 13px; margin-top: 40px; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img(fig: ReportFigure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (
        f'<figure id="fig-{_e(fig.key)}"><img src="data:image/png;base64,{data}" alt="{_e(fig.alt)}">'
        f"<figcaption>{_e(fig.caption)}</figcaption></figure>"
    )


class _Raw(str):
    """Trusted HTML, inserted without escaping (built here from escaped parts)."""


def _html_table(
    header: list[str],
    rows: list[list[str]],
    row_classes: list[str] | None = None,
    numeric: set[int] | None = None,
) -> str:
    numeric = set(range(1, len(header))) if numeric is None else numeric

    def cell(tag: str, j: int, v: str) -> str:
        cls = ' class="num"' if j in numeric else ""
        return f"<{tag}{cls}>{v if isinstance(v, _Raw) else _e(v)}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell("th", j, h) for j, h in enumerate(header)) + "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(cell("td", j, v) for j, v in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _status_class(status: str) -> str:
    return {"blind spot": "blind", "below global": "below"}.get(status, "")


def render_html(report: Report) -> str:
    """The report as one self-contained HTML document (no scripts, no external resources)."""
    k = len(report.clusters)
    colours = _fig.cluster_colours(k)
    h: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(report.title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body><main>",
        f"<h1>{_e(report.title)}</h1>",
        f'<p class="sub">cxr-monitor report · generated {_e(report.generated)} · cxr-monitor {_e(__version__)}</p>',
        "<nav>"
        + "".join(
            f'<a href="#{a}">{_e(t)}</a>'
            for a, t in [
                ("summary", "Summary"),
                ("rates", "Failure rates"),
                ("map", "Map"),
                ("spectra", "Spectra"),
                ("metadata", "Metadata"),
                *((f"cluster-{s.cluster}", f"Cluster {s.cluster}") for s in report.clusters),
                ("about", "About"),
            ]
        )
        + "</nav>",
        '<h2 id="summary">Summary</h2>',
        '<table class="kv">',
    ]
    for label, value in report.summary:
        h.append(f"<tr><th>{_e(label)}</th><td>{_e(value)}</td></tr>")
    h.append("</table>")
    for line in report.interpretation:
        cls = "callout blind" if "is a blind spot" in line else "callout"
        h.append(f'<p class="{cls}">{_e(line)}</p>')

    h.append('<h2 id="rates">Failure rate by cluster</h2>')
    figs = {f.key: f for f in report.overview}
    h.append(_img(figs["rates"]))
    rows = [
        _cluster_cells(r, s.share, st)
        for r, s, st in zip(report.cluster_rows, report.clusters, report.statuses, strict=True)
    ]
    for row in rows:
        c = row[0][1:]
        row[0] = _Raw(f'<a href="#cluster-{c}">{_e(row[0])}</a>')
    table = _html_table(
        list(_CLUSTER_HEADER),
        rows,
        [_status_class(st) for st in report.statuses],
        numeric={1, 2, 3, 4, 5, 7, 8},
    )
    h.append(table)
    h.append(
        '<p class="note">observed = failures / images; rate = shrunk estimate the model scores with; '
        "lift = rate / global rate.</p>"
    )

    h.append('<h2 id="map">Map of the fit images</h2>')
    if "map" in figs:
        h.append(_img(figs["map"]))
    else:
        h.append('<p class="note">Not available: the model holds no fit profiles.</p>')

    h.append('<h2 id="spectra">Spectral fingerprints</h2>')
    h.append(_img(figs["spectra"]))
    h.append("<ul>")
    for s in report.clusters:
        h.append(
            f'<li><span class="swatch" style="background:{colours[s.cluster]}"></span>'
            f'<a href="#cluster-{s.cluster}">Cluster {s.cluster}</a>: {_e(s.description.summary)}</li>'
        )
    h.append("</ul>")

    h.append('<h2 id="metadata">Metadata composition</h2>')
    comp = report.composition
    if comp.tables:
        h.append(
            '<p class="note">Share of each cluster\'s images in each category (count); "all" = the whole fit '
            "set; failure rate = among the fit images of that category. Columns ordered by their association "
            "with the cluster.</p>"
        )
        for t in comp.tables:
            header, trows = _composition_cells(t, k)
            h.append(f"<h3>{_e(t.label)}</h3>")
            cap = _composition_caption(t)
            if cap:
                h.append(f'<p class="note">{_e(cap)}</p>')
            h.append(_html_table(header, trows))
    else:
        h.append('<p class="note">No metadata columns to tabulate.</p>')

    for s in report.clusters:
        r = s.stats
        badge = f'<span class="badge {_status_class(s.status)}">{_e(s.status)}</span>' if s.status else ""
        h.append(f'<section class="cluster" id="cluster-{s.cluster}">')
        h.append(
            f'<h2><span class="swatch" style="background:{colours[s.cluster]}"></span>Cluster {s.cluster}{badge}</h2>'
        )
        h.append(
            f'<p class="stats">{r["n_images"]} images ({100 * s.share:.1f}% of the fit set) · '
            f"{r['n_failures']} failures · failure rate <b>{_e(fmt_rate(r['rate']))}</b> "
            f"{_e(fmt_interval(r['lower'], r['upper']))} · lift {r['lift']:.2f} · Fisher q {_e(fmt_p(r['fisher_q']))}</p>"
        )
        h.append(f"<p>{_e(s.description.summary)}</p>")
        if s.description.findings:
            h.append("<ul>")
            for f in s.description.findings[:_MAX_FINDINGS]:
                h.append(
                    f'<li><b>{_e(f.change)}</b>: {_e(f.meaning)} <span class="z">({f.z:+.2f} SD)</span></li>'
                )
            extra = len(s.description.findings) - _MAX_FINDINGS
            if extra > 0:
                h.append(f'<li class="note">… {extra} smaller differences (see the feature table below)</li>')
            h.append("</ul>")
        if s.highlights:
            h.append("<p>Over-represented metadata:</p><ul>")
            h.extend(f"<li>{_e(x)}</li>" for x in s.highlights[:5])
            h.append("</ul>")
        h.append(_img(s.profile))
        if s.thumbnails is not None:
            h.append(_img(s.thumbnails))
        if s.thumbnail_note:
            h.append(f'<p class="note">{_e(s.thumbnail_note)}</p>')
        h.append("<details><summary>All features of this cluster</summary>")
        h.append(
            _html_table(
                ["feature", "cluster mean", "reference mean", "difference (SD)"],
                [[n, f"{a:.4g}", f"{b:.4g}", f"{z:+.2f}"] for n, a, b, z in s.features],
            )
        )
        h.append("</details></section>")

    h.append('<h2 id="about">About this report</h2>')
    h.append("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in _HOW_TO_READ) + "</ul>")
    if report.notes:
        h.append("<h3>Notes</h3><ul>" + "".join(f"<li>{_e(x)}</li>" for x in report.notes) + "</ul>")
    if report.missing_images:
        h.append("<details><summary>Images that could not be loaded</summary><ul>")
        h.extend(f"<li>{_e(name)}: {_e(why)}</li>" for name, why in report.missing_images[:50])
        if len(report.missing_images) > 50:
            h.append(f"<li>… and {len(report.missing_images) - 50} more</li>")
        h.append("</ul></details>")
    if report.versions:
        h.append("<h3>Library versions at fit time</h3>")
        h.append(
            _html_table(["library", "version"], [[a, b] for a, b in report.versions.items()], numeric=set())
        )
    h.append(f"<footer>Model {_e(report.model_id)} · report by cxr-monitor {_e(__version__)}</footer>")
    h.append("</main></body></html>")
    return "\n".join(h) + "\n"


# --------------------------------------------------------------------------- Markdown


def _md(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def render_markdown(report: Report, files_dir: str) -> tuple[str, dict[str, bytes]]:
    """The report as Markdown plus its figures.

    Parameters
    ----------
    files_dir : str
        Folder name, relative to the Markdown file, the figures are referenced under.

    Returns
    -------
    text : str
    files : dict of str to bytes
        PNG file name → bytes, to be written into ``files_dir``.
    """
    files: dict[str, bytes] = {}

    def img(fig: ReportFigure) -> str:
        name = f"{fig.key}.png"
        files[name] = fig.png
        return f"![{_md(fig.alt)}]({files_dir}/{name})\n\n*{fig.caption}*"

    k = len(report.clusters)
    md: list[str] = [
        f"# {report.title}",
        "",
        f"cxr-monitor report · generated {report.generated}",
        "",
        "## Summary",
        "",
    ]
    md.append(_md_table(["", ""], [[a, b] for a, b in report.summary]))
    md.append("")
    for line in report.interpretation:
        md += [f"> {'**' + line + '**' if 'is a blind spot' in line else line}", ""]
    figs = {f.key: f for f in report.overview}
    md += ["## Failure rate by cluster", "", img(figs["rates"]), ""]
    rows = [
        _cluster_cells(r, s.share, st)
        for r, s, st in zip(report.cluster_rows, report.clusters, report.statuses, strict=True)
    ]
    for row in rows:
        if row[-1] == "blind spot":
            row[-1] = "**BLIND SPOT**"
    md += [_md_table(list(_CLUSTER_HEADER), rows), ""]
    md += [
        "observed = failures / images; rate = shrunk estimate the model scores with; lift = rate / global rate.",
        "",
    ]
    md += ["## Map of the fit images", ""]
    md += [img(figs["map"]) if "map" in figs else "Not available: the model holds no fit profiles.", ""]
    md += ["## Spectral fingerprints", "", img(figs["spectra"]), ""]
    md += [f"- Cluster {s.cluster}: {s.description.summary}" for s in report.clusters]
    md += ["", "## Metadata composition", ""]
    if report.composition.tables:
        for t in report.composition.tables:
            header, trows = _composition_cells(t, k)
            md += [f"### {t.label}", ""]
            cap = _composition_caption(t)
            if cap:
                md += [f"*{cap}*", ""]
            md += [_md_table(header, trows), ""]
    else:
        md += ["No metadata columns to tabulate.", ""]
    for s in report.clusters:
        r = s.stats
        flag = f" — {s.status.upper()}" if s.status else ""
        md += [f"## Cluster {s.cluster}{flag}", ""]
        md += [
            f"{r['n_images']} images ({100 * s.share:.1f}% of the fit set) · {r['n_failures']} failures · failure "
            f"rate **{fmt_rate(r['rate'])}** {fmt_interval(r['lower'], r['upper'])} · lift {r['lift']:.2f} · "
            f"Fisher q {fmt_p(r['fisher_q'])}",
            "",
            s.description.summary,
            "",
        ]
        md += [
            f"- **{f.change}**: {f.meaning} ({f.z:+.2f} SD)" for f in s.description.findings[:_MAX_FINDINGS]
        ]
        if len(s.description.findings) > _MAX_FINDINGS:
            md.append(f"- … {len(s.description.findings) - _MAX_FINDINGS} smaller differences")
        if s.highlights:
            md += ["", "Over-represented metadata:", ""] + [f"- {x}" for x in s.highlights[:5]]
        md += ["", img(s.profile), ""]
        if s.thumbnails is not None:
            md += [img(s.thumbnails), ""]
        if s.thumbnail_note:
            md += [s.thumbnail_note, ""]
    md += ["## About this report", ""] + [f"- {x}" for x in _HOW_TO_READ] + [""]
    if report.notes:
        md += ["### Notes", ""] + [f"- {x}" for x in report.notes] + [""]
    if report.missing_images:
        md += ["### Images that could not be loaded", ""]
        md += [f"- {name}: {why}" for name, why in report.missing_images[:50]] + [""]
    if report.versions:
        md += [
            "### Library versions at fit time",
            "",
            _md_table(["library", "version"], [[a, b] for a, b in report.versions.items()]),
            "",
        ]
    md += [f"Model {report.model_id} · report by cxr-monitor {__version__}", ""]
    return "\n".join(md), files


# --------------------------------------------------------------------------- writing


@dataclass
class WrittenReport:
    """What :func:`write_report` wrote."""

    path: Path
    files: list[Path]
    report: Report
    seconds: float

    @property
    def missing_images(self) -> list[tuple[str, str]]:
        return self.report.missing_images


def write_report(
    model: ReliabilityModel,
    out: str | os.PathLike,
    *,
    fmt: str = "html",
    images: str | os.PathLike | None = None,
    model_path: str | os.PathLike | None = None,
    n_thumbnails: int = 8,
) -> WrittenReport:
    """Build the report and write it to ``out``.

    ``fmt="html"`` writes one self-contained file; ``fmt="md"`` writes ``out`` and
    its figures into ``<out stem>_files/`` beside it.

    Raises
    ------
    InvalidInputError
        Unknown format, bad image folder, or ``out`` cannot be written.
    """
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise InvalidInputError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.is_dir():
        raise InvalidInputError(f"{out}: is a directory; give the report's file name")
    report = build_report(model, images, model_path=model_path, n_thumbnails=n_thumbnails)
    written: list[Path] = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "html":
            out.write_text(render_html(report), encoding="utf-8")
        else:
            files_dir = out.parent / f"{out.stem}_files"
            text, files = render_markdown(report, files_dir.name)
            files_dir.mkdir(exist_ok=True)
            for name, data in files.items():
                (files_dir / name).write_bytes(data)
                written.append(files_dir / name)
            out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"{out}: cannot write the report ({exc.strerror or exc})") from exc
    return WrittenReport(out, [out, *written], report, time.perf_counter() - t0)
