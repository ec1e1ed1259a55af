"""Lay a :class:`~monitor.report.render.Report` out as one self-contained HTML page.

Figures are embedded as ``data:image/png;base64`` URIs and the CSS inline; the page loads
nothing from the network and runs no script, so it can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from .. import __version__
from . import figures as _fig
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

__all__ = ["STYLESHEET", "render_html"]


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


STYLESHEET = _CSS
"""The reports' CSS, shared by other self-contained pages (the audit timeline)."""


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
