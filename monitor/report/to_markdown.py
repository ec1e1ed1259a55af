"""Lay a :class:`~monitor.report.render.Report` out as Markdown, with its figures as PNG files."""

from __future__ import annotations

from typing import Any

from .. import __version__
from .render import (
    _CLUSTER_HEADER,
    _HOW_TO_READ,
    _MAX_FINDINGS,
    Report,
    ReportFigure,
    _cluster_cells,
    _composition_caption,
    _composition_cells,
    fmt_interval,
    fmt_p,
    fmt_rate,
)

__all__ = ["render_markdown"]


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
