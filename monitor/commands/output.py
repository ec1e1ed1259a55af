"""What every command shares: the help layout, JSON output, path expansion, tables.

Command modules import this module, never :mod:`monitor.cli` (which imports them).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "add_command",
    "expand_paths",
    "formatter",
    "no_images_message",
    "print_cluster_table",
    "print_json",
    "print_scope",
    "read_model_spec",
    "untrusted_note",
]


def print_json(obj: Any) -> None:
    """One JSON object on one line (NaN written as null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not np.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return clean(v.item())
        return v

    sys.stdout.write(json.dumps(clean(obj), separators=(",", ":")) + "\n")


def expand_paths(items: Sequence[str]) -> list[Path]:
    """Files as given; folders expanded to the images inside (recursive, sorted)."""
    from ..imaging import iter_image_files

    out: list[Path] = []
    for item in items:
        p = Path(item)
        out.extend(iter_image_files(p) if p.is_dir() else [p])
    return out


def no_images_message(items: Sequence[str]) -> str:
    """The error for paths that hold no image file, naming them (an empty folder, a wrong path)."""
    from ..imaging import IMAGE_SUFFIXES

    named = ", ".join(str(i) for i in items)
    return (
        f"no image files in {named} (looked for {', '.join(sorted(IMAGE_SUFFIXES))} and DICOM files "
        "without a suffix, recursively)"
    )


def read_model_spec(model_dir: str | Path) -> dict[str, Any] | None:
    """The profile specification in a model directory's ``model.json``, without loading the model.

    Lets worker processes start profiling while the caller imports scikit-learn and loads the
    model (which verifies the checksums, and whose spec the caller compares with this one).
    ``None`` when it cannot be read: loading the model then says why.
    """
    try:
        spec = json.loads((Path(model_dir) / "model.json").read_text())["spectrum"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return spec if isinstance(spec, dict) else None


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=100)


def add_command(
    sub: Any, name: str, summary: str, description: str, epilog: str = ""
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=textwrap.dedent(description).strip(),
        epilog=textwrap.dedent(epilog).strip() or None,
        formatter_class=formatter,
    )


def untrusted_note(r: Any) -> str:
    """Why a result's reliability is not a point value (empty when trusted); ``r`` is a
    ScoreResult or a ScoreResponse."""
    if r.trusted:
        return ""
    why = [r.scope_field.replace("_", " ") + " out of scope"] if r.out_of_scope else []
    if r.is_novel:
        why.append("novel")
    return f" (not trusted: {', '.join(why)}; lower end of its interval)"


def print_scope(scope: dict[str, list[str] | None]) -> None:
    """A model's scope (``ScopeRules.to_json()``) as text."""
    print("scope (DICOM headers outside it are scored as out of scope and not trusted):")
    for name, values in scope.items():
        print(f"  {name.replace('_', ' '):15s} {'any' if values is None else ', '.join(values)}")


def print_cluster_table(rows: list[dict]) -> None:
    print(
        f"{'cluster':>7} {'images':>6} {'fail':>5} {'rate':>6} {'95% interval':>15} {'lift':>5} {'q':>7}  blind spot"
    )
    for r in rows:
        print(
            f"{r['cluster']:>7} {r['n_images']:>6} {r['n_failures']:>5} {r['rate']:>6.3f} "
            f"[{r['lower']:.3f}, {r['upper']:.3f}] {r['lift']:>5.2f} {r['fisher_q']:>7.3g}  "
            f"{'YES' if r['blind_spot'] else ''}"
        )
