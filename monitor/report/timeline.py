"""The archive audit as one self-contained HTML page: change points, then a timeline per group.

Built from the audit's JSON (:meth:`monitor.audit.AuditResult.to_dict`), in the reports' style;
figures are inline PNGs, nothing is fetched from the network.
"""

from __future__ import annotations

import base64
import html
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .figures import cluster_colours, figure_to_png
from .render import fmt_p
from .to_html import STYLESHEET

__all__ = ["group_timeline_figure", "render_audit_html"]

_CHANGE_COLOUR = "#c62828"
_NOVELTY_COLOUR = "#1a56a5"
_SCOPE_COLOUR = "#e08a00"


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _label(group: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in group.items())


def group_timeline_figure(audit: dict[str, Any], group: dict[str, Any], features: list[str]) -> Figure:
    """Images per period with the novelty and out-of-scope rates, the cluster mix, and the mean of
    ``features``."""
    rows = group["periods"]
    periods = [r["period"] for r in rows]
    x = np.arange(len(periods))
    names = audit["feature_names"]
    fig = Figure(figsize=(10.0, 6.4), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True, height_ratios=(1.0, 1.0, 1.3))
    n = np.array([r["n_images"] for r in rows])
    ax1.bar(x, n, color="#9aa0a6", width=0.7, label="images")
    ax1.set_ylabel("images", fontsize=9)
    twin = ax1.twinx()
    nov = [r["novelty_rate"] if r["novelty_rate"] is not None else np.nan for r in rows]
    oos = [r.get("out_of_scope_rate") if r.get("out_of_scope_rate") is not None else np.nan for r in rows]
    twin.plot(x, nov, "o-", color=_NOVELTY_COLOUR, label="novelty rate")
    twin.plot(x, oos, "s--", color=_SCOPE_COLOUR, label="out-of-scope rate")
    twin.set_ylabel("share of images", fontsize=9)
    top = np.nanmax(np.concatenate([nov, oos])) if np.isfinite(np.concatenate([nov, oos])).any() else 0.0
    twin.set_ylim(0, max(0.2, top * 1.15))
    twin.legend(fontsize=7.5, loc="upper right", frameon=False)
    k = len(rows[0]["cluster_mix"])
    mix = np.array([r["cluster_mix"] for r in rows])
    bottom = np.zeros(len(rows))
    for c, colour in enumerate(cluster_colours(k)):
        ax2.bar(x, mix[:, c], bottom=bottom, color=colour, width=0.7, label=f"cluster {c}")
        bottom += mix[:, c]
    ax2.set_ylabel("cluster mix", fontsize=9)
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=7.5, ncol=min(k, 6), loc="upper left", bbox_to_anchor=(0, 1.28), frameon=False)
    for name in features:
        j = names.index(name)
        y = [r["feature_mean_sd"][j] if r["feature_mean_sd"] is not None else np.nan for r in rows]
        ax3.plot(x, y, "o-", label=name)
    ax3.axhline(0, color="#222", lw=0.8)
    ax3.set_ylabel("mean, reference SD", fontsize=9)
    if features:
        ax3.legend(fontsize=7.5, loc="best", frameon=False)
    changes = [c for c in audit["change_points"] if c["group"] == group["group"]]
    for c in changes:
        at = periods.index(c["period"]) - 0.5
        for ax in (ax1, ax2, ax3):
            ax.axvline(at, color=_CHANGE_COLOUR, ls="--", lw=1.4)
        ax1.annotate(
            f"change from {c['period']}",
            (at, 1.0),
            xycoords=("data", "axes fraction"),
            color=_CHANGE_COLOUR,
            fontsize=8.5,
            ha="left",
            va="bottom",
        )
    ax3.set_xticks(x, periods, rotation=45 if len(periods) > 8 else 0, fontsize=8)
    for ax in (ax1, ax2, ax3):
        ax.tick_params(labelsize=8)
        ax.spines["top"].set_visible(False)
    fig.suptitle(_label(group["group"]), fontsize=11)
    return fig


def _img(fig: Figure, alt: str) -> str:
    data = base64.b64encode(figure_to_png(fig)).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}"></figure>'


def _components(c: dict[str, Any]) -> str:
    parts = []
    comp = c["components"]
    if comp["cluster_mix"]["significant"]:
        parts.append(f"cluster mix (PSI {comp['cluster_mix']['psi']:.2f})")
    if comp["novelty"]["significant"]:
        parts.append(f"novelty {comp['novelty']['before']:.1%} → {comp['novelty']['after']:.1%}")
    oos = comp.get("out_of_scope", {})
    if oos.get("significant"):
        parts.append(f"out of scope {oos['before']:.1%} → {oos['after']:.1%}")
    if comp["features"]["significant"]:
        parts.append(f"features (largest shift {comp['features']['largest_shift_sd']:+.1f} SD)")
    return "; ".join(parts) or "combined evidence"


def render_audit_html(audit: dict[str, Any]) -> str:
    """The whole page."""
    by = ", ".join(audit["by"])
    changes = audit["change_points"]
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Archive drift audit by {_e(by)}</title><style>{STYLESHEET}</style></head><body><main>",
        f"<h1>Archive drift audit by {_e(by)} and {_e(audit['period'])}</h1>",
        f"<p class='sub'>Model {_e(audit['model_id'])}; {audit['n_images']} images scored "
        f"({audit.get('n_out_of_scope', 0)} of them out of the model's scope by their DICOM header), "
        f"{audit['n_unreadable']} unreadable; {len(audit['groups'])} groups.</p>",
        "<h2>Change points</h2>",
    ]
    if not changes:
        out.append("<p>No group changed over time (at the settings below).</p>")
    else:
        out.append(
            "<table><tr><th>group</th><th>from period</th><th>what changed</th>"
            "<th>features that moved (shift in SD)</th><th class='num'>q</th>"
            "<th class='num'>images before / after</th></tr>"
        )
        for c in changes:
            moved = ", ".join(f"{m['feature']} {m['shift_sd']:+.1f}" for m in c["moved_features"])
            out.append(
                f"<tr class='blind'><td>{_e(_label(c['group']))}</td><td>{_e(c['period'])}</td>"
                f"<td>{_e(_components(c))}</td><td>{_e(moved)}</td><td class='num'>{_e(fmt_p(c['q_value']))}"
                f"</td><td class='num'>{c['n_before']} / {c['n_after']}</td></tr>"
            )
        out.append("</table>")
    s = audit["settings"]
    out.append(
        f"<p class='note'>Method: {_e(s['method'])}. A change needs q &lt; {s['alpha']} and an effect at least "
        f"PSI {s['psi_min']} (mix), {s['novelty_rate_min']} (novelty rate), "
        f"{s.get('out_of_scope_rate_min', 0.0)} (out-of-scope rate) or {s['min_effect_sd']} pooled SD "
        f"(a feature mean); each side of a split holds at least {s['min_segment_images']} images. "
        "The drift verdict per period compares it with the model's reference set. Out-of-scope images "
        "(a DICOM header outside the model's modality, body part or view allow-lists) are counted "
        "by the field that failed and, as in the drift report, still count in the other components.</p>"
    )
    for group in audit["groups"]:
        label = _label(group["group"])
        out.append(f"<h2>{_e(label)}</h2>")
        mine = [c for c in changes if c["group"] == group["group"]]
        features: list[str] = []
        for c in mine:
            features += [m["feature"] for m in c["moved_features"][:3] if m["feature"] not in features]
        if not features:
            # No change: show the features furthest from the reference over the whole span.
            means = np.array([r["feature_mean_sd"] for r in group["periods"] if r["feature_mean_sd"]])
            if len(means):
                top = np.argsort(-np.abs(means.mean(axis=0)))[:2]
                features = [audit["feature_names"][j] for j in top]
        out.append(_img(group_timeline_figure(audit, group, features), f"timeline of {label}"))
        out.append(
            "<table><tr><th>period</th><th class='num'>images</th><th>drift vs reference</th>"
            "<th class='num'>PSI</th><th class='num'>novelty rate</th><th>out of scope</th>"
            "<th class='num'>est. failure rate</th><th>most shifted features</th></tr>"
        )
        for r in group["periods"]:
            d = r["drift"] or {}
            verdict = "DRIFT" if d.get("drift") else "no drift"
            moved = [k.replace("_", " ") for k, v in (d.get("components") or {}).items() if v]
            if moved:
                verdict += f" ({', '.join(moved)})"
            by_field = ", ".join(
                f"{k.replace('_', ' ')} {v}" for k, v in (r.get("out_of_scope_counts") or {}).items()
            )
            scope = f"{r.get('n_out_of_scope', 0)}" + (f" ({by_field})" if by_field else "")
            if d.get("n_images", 0) < d.get("thresholds", {}).get("min_images", 0):
                verdict = "too few images for a verdict"
            top = ", ".join(
                f"{t['feature']} {t['z']:+.1f}" for t in (d.get("top_shifted_features") or [])[:3]
            )
            out.append(
                f"<tr><td>{_e(r['period'])}</td><td class='num'>{r['n_images']}</td><td>{_e(verdict)}</td>"
                f"<td class='num'>{d.get('psi', float('nan')):.3f}</td>"
                f"<td class='num'>{(r['novelty_rate'] or 0):.1%}</td><td>{_e(scope)}</td>"
                f"<td class='num'>{d.get('estimated_failure_rate', float('nan')):.3f}</td>"
                f"<td>{_e(top)}</td></tr>"
            )
        out.append("</table>")
    out.append("<footer>cxr-monitor audit; self-contained page (no network).</footer></main></body></html>")
    return "\n".join(out)
