"""Matplotlib figures of a fitted :class:`~monitor.model.ReliabilityModel`.

Every function builds a :class:`matplotlib.figure.Figure` directly (never through
``pyplot``), so nothing is registered in pyplot's global figure manager, no GUI
backend is touched and figures are freed as soon as they are dropped. In a
notebook, display one by leaving it as the cell's value, or save it with
``fig.savefig("rates.png")``::

    from monitor.artifact import load_model
    from monitor import report

    model = load_model("models/default")
    report.rates_figure(model)
    report.cluster_profile_figure(model, 2)
    report.thumbnails_figure(model, "../shared/data/nih/images", 2)

Colours: clusters use the tab10 palette without red; red is kept for blind spots
and failures, so it always means "the classifier does badly here".
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..errors import InvalidInputError, MonitorError
from ..model import ReliabilityModel
from .describe import band_centres, check_cluster, cluster_raw_means

__all__ = [
    "BLIND_SPOT_COLOUR",
    "Thumbnails",
    "cluster_colours",
    "cluster_profile_figure",
    "figure_to_png",
    "load_thumbnails",
    "map_figure",
    "profiles_figure",
    "rates_figure",
    "select_thumbnails",
    "thumbnails_figure",
]

BLIND_SPOT_COLOUR = "#c62828"
_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#393b79",
)
_REFERENCE_COLOUR = "#222222"
_FONT = {"title": 11, "label": 9.5, "tick": 8.5, "small": 7.5}
THUMBNAIL_SIZE = 96


def cluster_colours(n_clusters: int) -> list[str]:
    """One colour per cluster (cycling after 10)."""
    return [_PALETTE[c % len(_PALETTE)] for c in range(n_clusters)]


def figure_to_png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG bytes of ``fig``, without the software/version text chunk (smaller, reproducible)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def _style_axes(ax) -> None:  # type: ignore[no-untyped-def]
    ax.tick_params(labelsize=_FONT["tick"])
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(True, color="#e6e6e6", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)


def _pct_axis(ax, axis: str = "y") -> None:  # type: ignore[no-untyped-def]
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{100 * v:.0f}%")
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


# Energy ratios with round % labels: -90% ... -2%, 0, +2% ... +900%.
_RATIO_TICKS = np.array(
    sorted(
        {1.0}
        | {1 - d for d in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 0.9, 0.95, 0.99)}
        | {1 + d for d in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 4.0, 9.0, 19.0, 99.0)}
    )
)


def _ratio_axis(ax) -> None:  # type: ignore[no-untyped-def]
    """Log-scaled energy-ratio axis labelled as % change, so +300% and -75% look equally far."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_yscale("log")
    ax.relim()
    ax.autoscale_view()  # margins in log space, not those of the earlier linear autoscale
    lo, hi = ax.get_ylim()
    lo, hi = min(lo, 0.97), max(hi, 1.03)
    ax.set_ylim(lo, hi)
    # Keep ticks at least 1/10 of the axis apart (in log space), walking out from 0%.
    gap = (np.log(hi) - np.log(lo)) / 10
    inside = _RATIO_TICKS[(_RATIO_TICKS >= lo) & (_RATIO_TICKS <= hi)]
    ticks = [1.0]
    for side in (inside[inside > 1], inside[inside < 1][::-1]):
        last = 0.0
        for t in side:
            if abs(np.log(t) - last) >= gap:
                ticks.append(float(t))
                last = float(np.log(t))
    ax.yaxis.set_major_locator(FixedLocator(sorted(ticks)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(
        FuncFormatter(lambda v, _: "0" if abs(v - 1) < 1e-9 else f"{100 * (v - 1):+.0f}%")
    )


def _freq_axis(ax, model: ReliabilityModel) -> None:  # type: ignore[no-untyped-def]
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ax.set_xscale("log")
    n = model.profiler.working_size
    ticks = [t for t in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if t <= n / 2]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("band centre (cycles/image)", fontsize=_FONT["label"])


# --------------------------------------------------------------------------- failure rates


def rates_figure(model: ReliabilityModel) -> Figure:
    """Failure rate of each cluster with its 95% interval, the global rate, blind spots in red.

    Bars are the Beta-shrunk posterior rates the model scores with; whiskers the
    credible interval; the dashed line the fit set's global failure rate.
    """
    r = model.rates
    k = model.n_clusters
    colours = cluster_colours(k)
    fig = Figure(figsize=(max(6.4, 1.6 + 0.75 * k), 3.8), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(k)
    blind = np.asarray(r.blind_spot_, dtype=bool)
    face = [BLIND_SPOT_COLOUR if blind[c] else colours[c] for c in range(k)]
    ax.bar(x, r.rate_, width=0.62, color=face, alpha=0.85, edgecolor="none", zorder=2)
    ax.errorbar(
        x,
        r.rate_,
        yerr=np.vstack([r.rate_ - r.lower_, r.upper_ - r.rate_]),
        fmt="none",
        ecolor="#222222",
        elinewidth=1.2,
        capsize=4,
        zorder=3,
    )
    ax.axhline(r.global_rate_, color="#222222", linestyle="--", linewidth=1.1, zorder=4)
    top = float(max(np.max(r.upper_), r.global_rate_))
    for c in range(k):
        if blind[c]:
            ax.text(
                c,
                r.upper_[c] + 0.02 * max(top, 0.05),
                "blind spot",
                ha="center",
                va="bottom",
                fontsize=_FONT["small"],
                color=BLIND_SPOT_COLOUR,
                fontweight="bold",
            )
    ax.set_xticks(x, [f"C{c}\nn={int(r.counts_[c])}" for c in range(k)], fontsize=_FONT["tick"])
    ax.set_ylim(0, min(1.0, top * 1.18 + 0.02))
    _pct_axis(ax)
    _style_axes(ax)
    ax.grid(False, axis="x")
    ax.set_ylabel("classifier failure rate", fontsize=_FONT["label"])
    ax.set_title("Failure rate by spectral cluster", fontsize=_FONT["title"], loc="left")
    handles = [
        Patch(color="#9e9e9e", alpha=0.85, label="estimated rate"),
        Line2D([], [], color="#222222", marker="_", markersize=10, linewidth=1.2, label="95% interval"),
        Line2D(
            [],
            [],
            color="#222222",
            linestyle="--",
            linewidth=1.1,
            label=f"global {100 * r.global_rate_:.1f}%",
        ),
    ]
    if blind.any():
        handles.append(Patch(color=BLIND_SPOT_COLOUR, alpha=0.85, label="blind spot"))
    ax.legend(
        handles=handles, fontsize=_FONT["small"], loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False
    )
    return fig


# --------------------------------------------------------------------------- spectra


def _band_arrays(model: ReliabilityModel) -> tuple[np.ndarray, np.ndarray]:
    names = model.feature_names
    idx = np.array([i for i, n in enumerate(names) if n.startswith("log_energy_band_")], dtype=np.intp)
    return idx, band_centres(model)


def _band_change(model: ReliabilityModel, cluster: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-band energy ratio to the reference, with the 95% interval of the cluster mean."""
    idx, _ = _band_arrays(model)
    diff = cluster_raw_means(model)[cluster, idx] - model.clusterer.mean_[idx]
    n = max(int(model.rates.counts_[cluster]), 1)
    se = model.clusterer.scale_[idx] * np.asarray(model.cluster_feature_std)[cluster, idx] / np.sqrt(n)
    return 10.0**diff, 10.0 ** (diff - 1.96 * se), 10.0 ** (diff + 1.96 * se)


def profiles_figure(model: ReliabilityModel) -> Figure:
    """All clusters' mean spectra: log energy fraction, and % energy change vs the reference."""
    idx, centres = _band_arrays(model)
    k = model.n_clusters
    colours = cluster_colours(k)
    means = cluster_raw_means(model)
    fig = Figure(figsize=(10.0, 3.6), layout="constrained")
    a, b = fig.subplots(1, 2)
    a.plot(
        centres, model.clusterer.mean_[idx], color=_REFERENCE_COLOUR, lw=2.2, label="reference (all images)"
    )
    for c in range(k):
        a.plot(centres, means[c, idx], color=colours[c], lw=1.3, label=f"C{c}")
        change, _, _ = _band_change(model, c)
        b.plot(centres, change, color=colours[c], lw=1.6, marker="o", markersize=2.5, label=f"C{c}")
    b.axhline(1.0, color=_REFERENCE_COLOUR, lw=1.2)
    for ax in (a, b):
        _freq_axis(ax, model)
        _style_axes(ax)
    a.set_ylabel("log10 energy fraction", fontsize=_FONT["label"])
    a.set_title("Mean spectrum of each cluster", fontsize=_FONT["title"], loc="left")
    b.set_ylabel("energy vs reference", fontsize=_FONT["label"])
    _ratio_axis(b)
    b.set_title("Energy change per band vs reference", fontsize=_FONT["title"], loc="left")
    a.legend(fontsize=_FONT["small"], frameon=False, ncols=2 if k > 4 else 1)
    return fig


def cluster_profile_figure(model: ReliabilityModel, cluster: int) -> Figure:
    """One cluster against the reference: spectrum, per-band change, other features.

    Left: mean log10 energy fraction per band (cluster and reference). Middle: the
    per-band energy change in %, with the 95% interval of the cluster mean (shaded).
    Right: the non-band features (slopes, direction, periodic peak, blockiness) as
    the cluster mean minus the reference mean, in reference SDs.
    """
    cluster = check_cluster(model, cluster)
    idx, centres = _band_arrays(model)
    colour = cluster_colours(model.n_clusters)[cluster]
    means = cluster_raw_means(model)
    fig = Figure(figsize=(11.0, 3.3), layout="constrained")
    a, b, c = fig.subplots(1, 3, width_ratios=[1.0, 1.0, 0.9])
    a.plot(centres, model.clusterer.mean_[idx], color=_REFERENCE_COLOUR, lw=2.0, label="reference")
    a.plot(centres, means[cluster, idx], color=colour, lw=1.6, label=f"cluster {cluster}")
    a.set_ylabel("log10 energy fraction", fontsize=_FONT["label"])
    a.set_title("Mean spectrum", fontsize=_FONT["title"], loc="left")
    a.legend(fontsize=_FONT["small"], frameon=False)

    change, lo, hi = _band_change(model, cluster)
    b.fill_between(centres, lo, hi, color=colour, alpha=0.25, linewidth=0, label="95% interval of mean")
    b.plot(centres, change, color=colour, lw=1.6, marker="o", markersize=2.5, label=f"cluster {cluster}")
    b.axhline(1.0, color=_REFERENCE_COLOUR, lw=1.2)
    b.set_ylabel("energy vs reference", fontsize=_FONT["label"])
    _ratio_axis(b)
    b.set_title("Energy change per band", fontsize=_FONT["title"], loc="left")
    b.legend(fontsize=_FONT["small"], frameon=False)
    for ax in (a, b):
        _freq_axis(ax, model)
        _style_axes(ax)

    names = model.feature_names
    other = [i for i, n in enumerate(names) if not n.startswith("log_energy_band_")]
    z = np.asarray(model.cluster_feature_mean)[cluster, other]
    y = np.arange(len(other))[::-1]
    c.barh(y, z, color=[colour if v >= 0 else colour for v in z], alpha=0.85, height=0.6, zorder=2)
    c.axvline(0, color=_REFERENCE_COLOUR, lw=1.0)
    for lim in (-0.5, 0.5):
        c.axvline(lim, color="#9e9e9e", lw=0.8, linestyle=":")
    c.set_yticks(y, [names[i].replace("_", " ") for i in other], fontsize=_FONT["small"])
    span = max(1.0, float(np.max(np.abs(z))) * 1.15) if len(z) else 1.0
    c.set_xlim(-span, span)
    c.set_xlabel("cluster - reference (SD)", fontsize=_FONT["label"])
    c.set_title("Other features", fontsize=_FONT["title"], loc="left")
    _style_axes(c)
    c.grid(False, axis="y")
    return fig


# --------------------------------------------------------------------------- map


def _pca_coords(model: ReliabilityModel) -> tuple[np.ndarray, np.ndarray]:
    """PCA coordinates of the fit set and each component's share of the total variance."""
    if model.fit_profiles is None:
        raise InvalidInputError(
            "the model holds no fit profiles (fitted without them or saved by an old version)"
        )
    Y = model.clusterer.transform(model.fit_profiles)
    total = float(model.clusterer.standardise(model.fit_profiles).var(axis=0).sum())
    return Y, Y.var(axis=0) / max(total, 1e-12)


def _record_column(model: ReliabilityModel, key: str, default: int) -> np.ndarray:
    recs = model.fit_records or []
    n = 0 if model.fit_profiles is None else model.fit_profiles.shape[0]
    if len(recs) != n:
        return np.full(n, default)
    return np.array([int(r.get(key, default)) for r in recs])


def map_figure(model: ReliabilityModel) -> Figure:
    """2-D map of the fit images: first two PCA coordinates, coloured by cluster, failures marked.

    Raises
    ------
    InvalidInputError
        The model holds no fit profiles.
    """
    Y, share = _pca_coords(model)
    k = model.n_clusters
    colours = cluster_colours(k)
    labels = _record_column(model, "cluster", -1)
    if (labels < 0).any():
        labels = model.clusterer.predict(model.fit_profiles)
    failures = _record_column(model, "failure", 0).astype(bool)
    fig = Figure(figsize=(7.2, 5.4), layout="constrained")
    ax = fig.add_subplot()
    y2 = Y[:, 1] if Y.shape[1] > 1 else np.zeros(len(Y))
    size = float(np.clip(8000.0 / max(len(Y), 1), 6, 40))
    for c in range(k):
        m = labels == c
        ax.scatter(
            Y[m, 0], y2[m], s=size, color=colours[c], alpha=0.55, linewidths=0, label=f"C{c}", zorder=2
        )
    ax.scatter(
        Y[failures, 0],
        y2[failures],
        s=size * 1.3,
        marker="x",
        color="#111111",
        linewidths=0.9,
        alpha=0.8,
        label="classifier failure",
        zorder=3,
    )
    centres = model.clusterer.means_
    blind = np.asarray(model.rates.blind_spot_, dtype=bool)
    for c in range(k):
        cy = centres[c, 1] if centres.shape[1] > 1 else 0.0
        ax.text(
            centres[c, 0],
            cy,
            f"C{c}",
            fontsize=11,
            fontweight="bold",
            color=BLIND_SPOT_COLOUR if blind[c] else colours[c],
            ha="center",
            va="center",
            zorder=5,
            path_effects=[patheffects.withStroke(linewidth=3, foreground="white")],
        )
    ax.set_xlabel(f"PC1 ({100 * share[0]:.0f}% of variance)", fontsize=_FONT["label"])
    ax.set_ylabel(
        f"PC2 ({100 * share[1]:.0f}% of variance)" if Y.shape[1] > 1 else "(one component)",
        fontsize=_FONT["label"],
    )
    ax.set_title(
        f"{len(Y)} fit images in spectral-profile space (first two principal components)",
        fontsize=_FONT["title"],
        loc="left",
    )
    _style_axes(ax)
    ax.legend(
        fontsize=_FONT["small"], frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0), markerscale=1.5
    )
    return fig


# --------------------------------------------------------------------------- thumbnails


@dataclass
class Thumbnails:
    """Thumbnails of one cluster: the images nearest its centre and its failures.

    ``typical`` and ``failures`` hold (record index, image name, pixels or None) with
    pixels a uint8 array of at most ``THUMBNAIL_SIZE`` a side; ``missing`` the
    images that could not be loaded, with the reason.
    """

    cluster: int
    typical: list[tuple[int, str, np.ndarray | None]] = field(default_factory=list)
    failures: list[tuple[int, str, np.ndarray | None]] = field(default_factory=list)
    n_failures: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)


def select_thumbnails(model: ReliabilityModel, cluster: int, n: int = 8) -> tuple[list[int], list[int]]:
    """Record indices of the ``n`` images nearest the cluster centre and its ``n`` most typical failures.

    Nearness is the Mahalanobis distance to the cluster's Gaussian in PCA space
    (``model.clusterer.transform`` of the fit profiles), the metric the mixture
    itself uses to decide membership.
    """
    cluster = check_cluster(model, cluster)
    Y, _ = _pca_coords(model)
    labels = _record_column(model, "cluster", -1)
    if (labels < 0).any():
        labels = model.clusterer.predict(model.fit_profiles)
    failures = _record_column(model, "failure", 0).astype(bool)
    members = np.flatnonzero(labels == cluster)
    chol = np.linalg.cholesky(model.clusterer.covariances_[cluster])
    d = np.linalg.solve(chol, (Y[members] - model.clusterer.means_[cluster]).T)
    order = members[np.argsort(np.sum(d * d, axis=0), kind="stable")]
    typical = [int(i) for i in order[:n]]
    fails = [int(i) for i in order if failures[i]][:n]
    return typical, fails


def _thumbnail(path: Path, size: int) -> np.ndarray:
    """Load an image and shrink it (box average) to at most ``size`` pixels a side, uint8."""
    from ..imaging import load_image

    px = load_image(path).pixels
    f = int(np.ceil(max(px.shape) / size))
    if f > 1:
        h, w = (px.shape[0] // f) * f, (px.shape[1] // f) * f
        px = px[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3), dtype=np.float32)
    lo, hi = np.percentile(px, (0.5, 99.5))
    scaled = (px - lo) / max(float(hi - lo), 1e-12)
    return (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)


def load_thumbnails(
    model: ReliabilityModel, images: str | os.PathLike, cluster: int, n: int = 8, size: int = THUMBNAIL_SIZE
) -> Thumbnails:
    """Load the thumbnails chosen by :func:`select_thumbnails` from the folder ``images``.

    Images are found at ``images / record["image"]`` (the path the outcomes table
    gave at fit time). Missing or unreadable files are listed in ``missing`` and
    drawn as empty tiles, never raised.

    Raises
    ------
    InvalidInputError
        ``images`` is not a folder, or the model has no image names.
    """
    folder = Path(images)
    if not folder.is_dir():
        raise InvalidInputError(f"{folder}: image folder not found")
    records = model.fit_records or []
    if not records or "image" not in records[0]:
        raise InvalidInputError("the model's fit records hold no image names: thumbnails need them")
    typical, fails = select_thumbnails(model, cluster, n)
    out = Thumbnails(cluster=int(cluster))
    out.n_failures = int(sum(1 for r in records if r.get("cluster") == cluster and int(r.get("failure", 0))))
    wanted = list(dict.fromkeys(typical + fails))

    def load(i: int) -> tuple[int, np.ndarray | None, str]:
        name = str(records[i].get("image", ""))
        try:
            return i, _thumbnail(folder / name, size), ""
        except MonitorError as exc:
            return i, None, str(exc)

    # Decoding releases the GIL (Pillow, pydicom's codecs), so a few threads overlap it.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        loaded = {i: (px, err) for i, px, err in pool.map(load, wanted)}
    for i in wanted:
        if loaded[i][0] is None:
            out.missing.append((str(records[i].get("image", "")), loaded[i][1]))

    def get(i: int) -> tuple[int, str, np.ndarray | None]:
        return i, str(records[i].get("image", "")), loaded[i][0]

    out.typical = [get(i) for i in typical]
    out.failures = [get(i) for i in fails]
    return out


def thumbnails_figure(
    model: ReliabilityModel,
    images: str | os.PathLike | None,
    cluster: int,
    n: int = 8,
    thumbnails: Thumbnails | None = None,
) -> Figure:
    """Grid of one cluster's images: top row nearest the centre, bottom row its failures.

    Failures carry a red frame in both rows; images that could not be loaded are
    grey tiles marked "missing". Pass ``thumbnails`` (from :func:`load_thumbnails`)
    to reuse already loaded images; otherwise they are loaded from ``images``.
    """
    cluster = check_cluster(model, cluster)
    if thumbnails is None:
        if images is None:
            raise InvalidInputError("thumbnails need an image folder")
        thumbnails = load_thumbnails(model, images, cluster, n)
    records = model.fit_records or []
    cols = max(n, 1)
    rows = (("typical", thumbnails.typical), ("failures", thumbnails.failures))
    fig = Figure(figsize=(1.15 * cols, 2 * 1.45 + 0.2), layout="constrained")
    grid = fig.subplots(2, cols, squeeze=False)
    for r, (title, tiles) in enumerate(rows):
        for j in range(cols):
            ax = grid[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j == 0:
                ax.set_ylabel(title, fontsize=_FONT["label"])
            if j >= len(tiles):
                if j == 0 and r == 1:
                    ax.text(0.5, 0.5, "no failures", ha="center", va="center", fontsize=_FONT["small"])
                    ax.set_facecolor("#f5f5f5")
                continue
            i, name, px = tiles[j]
            failed = bool(int(records[i].get("failure", 0))) if i < len(records) else False
            if px is None:
                ax.set_facecolor("#e0e0e0")
                ax.text(
                    0.5, 0.5, "missing", ha="center", va="center", fontsize=_FONT["small"], color="#555555"
                )
            else:
                ax.imshow(px, cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
            if failed:
                for s in ax.spines.values():
                    s.set_visible(True)
                    s.set_color(BLIND_SPOT_COLOUR)
                    s.set_linewidth(2.0)
            base = Path(name).name
            short = base if len(base) <= 20 else base[:9] + "…" + base[-9:]
            ax.set_title(short, fontsize=6.0, pad=2)
    fig.suptitle(
        f"Cluster {cluster}: typical = nearest the centre; failures = the {len(thumbnails.failures)} of "
        f"{thumbnails.n_failures} nearest the centre; red frame = classifier failure",
        fontsize=_FONT["label"],
        x=0.0,
        ha="left",
    )
    return fig
