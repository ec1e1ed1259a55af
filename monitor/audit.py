"""Drift audit of an image archive: per group and period, and when each group changed.

The archive is a manifest (one row per image: its path or URL and columns such as
acquisition date, site, scanner, view). Images are profiled (locally or on Dask, by the
caller) and scored with a fitted model; only sufficient statistics are kept per
(group, period) cell, so memory grows with the number of cells, not of images.

Two questions, two tests:

* **Against the reference** (per cell): the model's drift report: cluster-mix drift,
  novelty drift, intensity drift, out-of-scope drift, estimated failure rate, most shifted
  features, with the same rank-based per-feature tests as the sidecar's windows.
* **Over time** (per group): did the group's images change, and when? A group may differ
  from the reference from its first period (another hospital is not a change), so each
  group is compared with *itself*: binary segmentation, where every split of the group's
  periods into "before" and "after" is tested on four components — cluster mix
  (chi-square test of homogeneity), novelty rate (Fisher's exact test), out-of-scope rate
  (Fisher's exact test) and feature means, spectral and intensity (two-sample t tests with
  the pooled variance on reference-standardised features, Bonferroni over features) — Bonferroni over components
  and candidate splits; Benjamini–Hochberg over groups. A change counts only when it is
  also large enough to matter: PSI of the mix >= the model's ``psi_min``, a novelty-rate
  difference >= its ``novelty_rate_min``, an out-of-scope-rate difference >= its
  ``out_of_scope_rate_min``, or a feature mean moving by >= ``min_effect`` pooled standard
  deviations (0.5: a "medium" standardised effect). Segments on either side are then
  searched again (at the Bonferroni level over groups).

Images whose DICOM header puts them out of the model's scope (:mod:`monitor.scope`) are
counted per cell and by the header field that failed. As in the drift report
(:func:`monitor.drift.drift_report`), they still count in the other components' statistics
(they are part of what the archive holds); the out-of-scope component says how many there are.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from .defaults import DEFAULT_AUDIT_ALPHA, DEFAULT_AUDIT_MIN_EFFECT, DEFAULT_AUDIT_MIN_SEGMENT_IMAGES
from .drift import WindowStats, psi
from .errors import InvalidInputError
from .model import ReliabilityModel
from .reliability import benjamini_hochberg
from .scope import ScopeRules

__all__ = [
    "PERIODS",
    "AuditResult",
    "CellStats",
    "ChangePoint",
    "ManifestRow",
    "find_changes",
    "period_of",
    "read_manifest",
    "run_audit",
]

PERIODS = ("day", "week", "month", "quarter", "year", "all")
DEFAULT_ALPHA = DEFAULT_AUDIT_ALPHA
DEFAULT_MIN_EFFECT = DEFAULT_AUDIT_MIN_EFFECT
DEFAULT_MIN_SEGMENT_IMAGES = DEFAULT_AUDIT_MIN_SEGMENT_IMAGES


@dataclass(frozen=True)
class ManifestRow:
    """One image of the archive: where it is, its group key and its period."""

    source: str
    group: tuple[str, ...]
    period: str


def period_of(value: str, period: str) -> str:
    """The period label of a date (``2024-03-17``, ``2024-03-17T10:22:00``, ``20240317``, ``2024-03``)."""
    if period == "all":
        return "all"
    text = value.strip()
    d: date | None = None
    for parse in (
        lambda t: datetime.fromisoformat(t).date(),
        lambda t: datetime.strptime(t, "%Y%m%d").date(),
        lambda t: datetime.strptime(t, "%Y-%m").date(),
        lambda t: datetime.strptime(t, "%Y/%m/%d").date(),
    ):
        try:
            d = parse(text)
            break
        except ValueError:
            continue
    if d is None:
        raise InvalidInputError(f"cannot read the date {value!r} (expected e.g. 2024-03-17 or 20240317)")
    if period == "day":
        return d.isoformat()
    if period == "week":
        y, w, _ = d.isocalendar()
        return f"{y}-W{w:02d}"
    if period == "month":
        return f"{d.year}-{d.month:02d}"
    if period == "quarter":
        return f"{d.year}-Q{(d.month - 1) // 3 + 1}"
    if period == "year":
        return str(d.year)
    raise InvalidInputError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")


def read_manifest(
    path: str | os.PathLike,
    by: list[str],
    *,
    period: str = "month",
    date_column: str = "date",
    image_column: str = "image",
) -> list[ManifestRow]:
    """Rows of a manifest CSV; relative image paths are resolved against its folder.

    Raises
    ------
    InvalidInputError
        Unreadable table, a missing column, an empty value or an unreadable date (the message
        names the row).
    """
    path = Path(path)
    if period not in PERIODS:
        raise InvalidInputError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            needed = [image_column, *by] + ([date_column] if period != "all" else [])
            missing = [c for c in needed if c not in columns]
            if missing:
                raise InvalidInputError(
                    f"{path}: no column {', '.join(repr(c) for c in missing)} "
                    f"(columns: {', '.join(columns) or 'none'})"
                )
            rows = []
            for i, r in enumerate(reader, start=2):
                image = (r.get(image_column) or "").strip()
                if not image:
                    raise InvalidInputError(f"{path}: row {i}: empty {image_column!r}")
                if "://" not in image and not os.path.isabs(image):
                    image = str(path.parent / image)
                try:
                    label = period_of(r.get(date_column) or "", period) if period != "all" else "all"
                except InvalidInputError as exc:
                    raise InvalidInputError(f"{path}: row {i}: {exc}") from None
                group = tuple((r.get(c) or "").strip() or "(blank)" for c in by)
                rows.append(ManifestRow(image, group, label))
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read the manifest ({exc.strerror})") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: not a readable CSV ({exc})") from exc
    if not rows:
        raise InvalidInputError(f"{path}: the manifest has no rows")
    return rows


@dataclass
class CellStats(WindowStats):
    """Sufficient statistics of the scored images of one (group, period) cell (mergeable).

    A drift window (:class:`monitor.drift.WindowStats`: built with the model's reference
    ranks, its drift report uses the same rank-based per-feature tests as the sidecar's
    windows) that also counts the images that could not be read.
    """

    n_errors: int = 0

    def merged(self, other: CellStats) -> CellStats:
        out = CellStats(self.n_clusters, self.n_features, self.ranks)
        out.n, out.n_novel = self.n + other.n, self.n_novel + other.n_novel
        out.n_errors = self.n_errors + other.n_errors
        out.failure_probability_sum = self.failure_probability_sum + other.failure_probability_sum
        out.cluster_counts = self.cluster_counts + other.cluster_counts
        out.feature_sum = self.feature_sum + other.feature_sum
        out.feature_sumsq = self.feature_sumsq + other.feature_sumsq
        out.score_sum = self.score_sum + other.score_sum
        out.out_of_scope_counts = {
            k: self.out_of_scope_counts.get(k, 0) + other.out_of_scope_counts.get(k, 0)
            for k in sorted(set(self.out_of_scope_counts) | set(other.out_of_scope_counts))
        }
        return out

    def mean(self) -> np.ndarray:
        return self.feature_sum / max(self.n, 1)

    def var(self) -> np.ndarray:
        if self.n < 2:
            return np.zeros(self.n_features)
        return np.maximum(self.feature_sumsq - self.feature_sum**2 / self.n, 0.0) / (self.n - 1)


@dataclass(frozen=True)
class ChangePoint:
    """A change in one group: the first period of the new regime and what moved."""

    group: tuple[str, ...]
    period: str
    p_value: float  # corrected for components and candidate splits
    q_value: float  # after Benjamini-Hochberg over groups (top level) or Bonferroni (nested)
    components: dict[str, dict[str, float]]
    moved_features: list[tuple[str, float]]
    n_before: int
    n_after: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": list(self.group),
            "period": self.period,
            "p_value": self.p_value,
            "q_value": self.q_value,
            "components": self.components,
            "moved_features": [{"feature": n, "shift_sd": s} for n, s in self.moved_features],
            "n_before": self.n_before,
            "n_after": self.n_after,
        }


def _split_test(
    a: CellStats, b: CellStats, names: tuple[str, ...], thresholds: Any, min_effect: float
) -> tuple[float, dict[str, dict[str, float]], list[tuple[str, float]]]:
    """p-value (Bonferroni over the four components) that ``b`` differs from ``a``; components.

    A component whose effect is below its floor contributes p = 1: significant but negligible
    changes in large archives are not changes.
    """
    comps: dict[str, dict[str, float]] = {}
    # Cluster mix: chi-square test of homogeneity over the clusters either side uses.
    table = np.vstack([a.cluster_counts, b.cluster_counts]).astype(float)
    used = table.sum(axis=0) > 0
    if used.sum() >= 2:
        chi2, p_mix, _, _ = stats.chi2_contingency(table[:, used], correction=False)
    else:
        p_mix = 1.0
    mix_psi = psi(b.cluster_counts, a.cluster_counts)
    comps["cluster_mix"] = {
        "p": float(p_mix),
        "psi": float(mix_psi),
        "before": (a.cluster_counts / a.n).tolist(),
        "after": (b.cluster_counts / b.n).tolist(),
        "significant": False,
    }
    # Novelty rate: Fisher's exact test (novel images are rare: a normal approximation would
    # call 3 novel of 25 against 0 of 125 far more significant than it is).
    pa, pb = a.n_novel / a.n, b.n_novel / b.n
    table2 = [[a.n_novel, a.n - a.n_novel], [b.n_novel, b.n - b.n_novel]]
    p_nov = float(stats.fisher_exact(table2)[1]) if a.n_novel + b.n_novel else 1.0
    comps["novelty"] = {"p": p_nov, "before": pa, "after": pb, "significant": False}
    # Out-of-scope rate: Fisher's exact test, as for novelty (the reference holds none).
    oa, ob = a.n_out_of_scope / a.n, b.n_out_of_scope / b.n
    table3 = [[a.n_out_of_scope, a.n - a.n_out_of_scope], [b.n_out_of_scope, b.n - b.n_out_of_scope]]
    p_oos = float(stats.fisher_exact(table3)[1]) if a.n_out_of_scope + b.n_out_of_scope else 1.0
    comps["out_of_scope"] = {"p": p_oos, "before": oa, "after": ob, "significant": False}
    # Feature means: two-sample t tests with the pooled variance on reference-standardised
    # features, Bonferroni over features. Under "no change" the images before and after are
    # exchangeable, so the variance is pooled. Welch's separate variances let a short segment
    # that by chance holds none of a skewed feature's tail (a few dark films: intensity_p99)
    # look like a shift: on the null archive of benchmarks/audit_demo.py 25 such images gave a
    # Welch t of 5.4 and a false change.
    ma, mb, va, vb = a.mean(), b.mean(), a.var(), b.var()
    df = max(a.n + b.n - 2, 1)
    pooled_var = ((a.n - 1) * va + (b.n - 1) * vb) / df
    se_f = np.sqrt(pooled_var * (1.0 / a.n + 1.0 / b.n)) + 1e-12
    t = (mb - ma) / se_f
    p_feat_each = 2 * stats.t.sf(np.abs(t), df)
    pooled_sd = np.sqrt((va + vb) / 2) + 1e-12
    effect = (mb - ma) / pooled_sd
    large = np.abs(effect) >= min_effect
    p_feat = float(min(1.0, p_feat_each[large].min() * len(names))) if large.any() else 1.0
    j = int(np.argmax(np.where(large, np.abs(t), -np.inf))) if large.any() else int(np.argmax(np.abs(effect)))
    comps["features"] = {"p": p_feat, "largest_shift_sd": float(effect[j]), "significant": False}
    if mix_psi < thresholds.psi_min:
        p_mix = 1.0
    if abs(pb - pa) < thresholds.novelty_rate_min:
        p_nov = 1.0
    if abs(ob - oa) < thresholds.out_of_scope_rate_min:
        p_oos = 1.0
    comps["cluster_mix"]["p"], comps["novelty"]["p"] = float(p_mix), float(p_nov)
    comps["out_of_scope"]["p"] = float(p_oos)
    p = min(1.0, len(comps) * min(p_mix, p_nov, p_oos, p_feat))
    order = np.argsort(-np.abs(effect))
    moved = [(names[i], float(effect[i])) for i in order[:5] if abs(effect[i]) >= min_effect]
    return p, comps, moved


def _best_split(
    cells: list[CellStats], periods: list[str], names: tuple[str, ...], thresholds: Any, min_effect: float,
    min_images: int,
) -> tuple[float, int, dict[str, dict[str, float]], list[tuple[str, float]]] | None:  # fmt: skip
    """The most significant before/after split (index of the first "after" period), scan-corrected."""
    candidates = []
    for s in range(1, len(cells)):
        before = _merge(cells[:s])
        after = _merge(cells[s:])
        if before.n < min_images or after.n < min_images:
            continue
        p, comps, moved = _split_test(before, after, names, thresholds, min_effect)
        candidates.append((p, s, comps, moved))
    if not candidates:
        return None
    p, s, comps, moved = min(candidates, key=lambda c: c[0])
    return min(1.0, p * len(candidates)), s, comps, moved


def _merge(cells: list[CellStats]) -> CellStats:
    out = cells[0]
    for c in cells[1:]:
        out = out.merged(c)
    return out


def find_changes(
    cells: dict[tuple[str, ...], dict[str, CellStats]],
    names: tuple[str, ...],
    thresholds: Any,
    *,
    alpha: float = DEFAULT_ALPHA,
    min_effect: float = DEFAULT_MIN_EFFECT,
    min_segment_images: int = DEFAULT_MIN_SEGMENT_IMAGES,
) -> list[ChangePoint]:
    """Change points of every group (see the module docstring), sorted by group then period."""
    groups = sorted(cells)
    top = []
    for g in groups:
        periods = sorted(cells[g])
        found = _best_split(
            [cells[g][t] for t in periods], periods, names, thresholds, min_effect, min_segment_images
        )
        top.append(found)
    qs = benjamini_hochberg([f[0] if f is not None else 1.0 for f in top]).tolist()
    changes: list[ChangePoint] = []
    for g, found, q in zip(groups, top, qs, strict=True):
        if found is None or q >= alpha:
            continue
        periods = sorted(cells[g])
        stack = [(0, len(periods), found, q)]
        while stack:
            lo, hi, (p, s, comps, moved), qv = stack.pop()
            at = lo + s
            for c in comps.values():
                c["significant"] = bool(c["p"] * len(comps) * (hi - lo - 1) < alpha)
            seg = [cells[g][t] for t in periods]
            changes.append(
                ChangePoint(
                    g,
                    periods[at],
                    p,
                    qv,
                    comps,
                    moved,
                    _merge(seg[lo:at]).n,
                    _merge(seg[at:hi]).n,
                )
            )
            # Look for further changes on either side, at the Bonferroni level over groups.
            for a, b in ((lo, at), (at, hi)):
                if b - a < 2:
                    continue
                sub = _best_split(seg[a:b], periods[a:b], names, thresholds, min_effect, min_segment_images)
                if sub is not None and sub[0] * len(groups) < alpha:
                    stack.append((a, b, sub, min(1.0, sub[0] * len(groups))))
    return sorted(changes, key=lambda c: (c.group, c.period))


@dataclass
class AuditResult:
    """Everything :func:`run_audit` measured; :meth:`to_dict` is the JSON written to disk."""

    by: list[str]
    period: str
    model_id: str
    feature_names: tuple[str, ...]
    cells: dict[tuple[str, ...], dict[str, CellStats]]
    reports: dict[tuple[str, ...], dict[str, Any]]
    changes: list[ChangePoint]
    n_images: int
    errors: list[tuple[str, str]]
    settings: dict[str, Any]
    scope: dict[str, Any] = field(default_factory=dict)  # ScopeRules.to_json() of the rules applied

    def to_dict(self) -> dict[str, Any]:
        groups = []
        for g in sorted(self.cells):
            rows = []
            for t in sorted(self.cells[g]):
                c = self.cells[g][t]
                rows.append(
                    {
                        "period": t,
                        "n_images": c.n,
                        "n_unreadable": c.n_errors,
                        "n_out_of_scope": c.n_out_of_scope,
                        "out_of_scope_counts": dict(sorted(c.out_of_scope_counts.items())),
                        "out_of_scope_rate": c.n_out_of_scope / c.n if c.n else None,
                        "novelty_rate": c.n_novel / c.n if c.n else None,
                        "cluster_mix": (c.cluster_counts / max(c.n, 1)).tolist(),
                        "feature_mean_sd": c.mean().tolist() if c.n else None,
                        "drift": self.reports[g][t],
                    }
                )
            groups.append({"group": dict(zip(self.by, g, strict=True)), "periods": rows})
        return {
            "by": self.by,
            "period": self.period,
            "model_id": self.model_id,
            "feature_names": list(self.feature_names),
            "n_images": self.n_images,
            "n_unreadable": len(self.errors),
            "n_out_of_scope": sum(c.n_out_of_scope for per in self.cells.values() for c in per.values()),
            "scope": self.scope,
            "unreadable": [{"image": s, "reason": r} for s, r in self.errors],
            "settings": self.settings,
            "change_points": [
                {**c.to_dict(), "group": dict(zip(self.by, c.group, strict=True))} for c in self.changes
            ],
            "groups": groups,
        }


def run_audit(
    rows: list[ManifestRow],
    profiled: Iterable[Any],
    model: ReliabilityModel,
    *,
    by: list[str],
    period: str,
    alpha: float = DEFAULT_ALPHA,
    min_effect: float = DEFAULT_MIN_EFFECT,
    min_segment_images: int = DEFAULT_MIN_SEGMENT_IMAGES,
    scope: ScopeRules | None = None,
) -> AuditResult:
    """Score the profiles of ``rows`` (``profiled``: a ProfiledFile per row, in row order) and audit.

    Parameters
    ----------
    profiled : iterable of :class:`~monitor.parallel.ProfiledFile`
        From :func:`monitor.parallel.profile_stream` or ``DaskRunner.profile_stream`` over
        ``[r.source for r in rows]``.
    scope : ScopeRules, optional
        Header allow-lists each image is checked against; default: the model's.
    """
    scope = model.scope if scope is None else scope
    k, d = model.n_clusters, len(model.feature_names)
    cells: dict[tuple[str, ...], dict[str, CellStats]] = {}
    errors: list[tuple[str, str]] = []
    n = 0
    for item in _checked(profiled, rows):
        row = rows[item.index]
        cell = cells.setdefault(row.group, {}).setdefault(row.period, CellStats(k, d, model.drift_ranks))
        if item.error is not None:
            cell.n_errors += 1
            errors.append((item.source, item.error))
            continue
        prof = np.asarray(item.profile, dtype=np.float64)[None, :]
        reasons = scope.check(item.meta) if item.meta is not None else ()
        result = model.score(prof, scope_reasons=[reasons])[0]
        cell.add(
            result.cluster,
            result.is_novel,
            result.cluster_failure_probability,
            model.standardise(prof)[0],
            result.scope_field,
        )
        n += 1
    reports = {
        g: {t: model.drift(c).to_dict() if c.n else None for t, c in per.items()} for g, per in cells.items()
    }
    scored = {g: {t: c for t, c in per.items() if c.n} for g, per in cells.items()}
    changes = find_changes(
        {g: per for g, per in scored.items() if per},
        model.feature_names,
        model.drift_thresholds,
        alpha=alpha,
        min_effect=min_effect,
        min_segment_images=min_segment_images,
    )
    return AuditResult(
        by,
        period,
        model.model_id,
        model.feature_names,
        cells,
        reports,
        changes,
        n,
        errors,
        {
            "alpha": alpha,
            "min_effect_sd": min_effect,
            "min_segment_images": min_segment_images,
            "psi_min": model.drift_thresholds.psi_min,
            "novelty_rate_min": model.drift_thresholds.novelty_rate_min,
            "out_of_scope_rate_min": model.drift_thresholds.out_of_scope_rate_min,
            "method": "binary segmentation per group; chi-square (mix), Fisher exact (novelty and "
            "out-of-scope rates), pooled-variance t with Bonferroni over features; Bonferroni over components "
            "and splits; Benjamini-Hochberg over groups",
        },
        scope.to_json(),
    )


def _checked(profiled: Iterable[Any], rows: list[ManifestRow]) -> Iterator[Any]:
    count = 0
    for item in profiled:
        count += 1
        yield item
    if count != len(rows):
        raise InvalidInputError(f"got {count} profiles for {len(rows)} manifest rows")
