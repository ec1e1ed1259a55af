"""Reports of a fitted model: figures, plain-language cluster descriptions, HTML/Markdown.

The names below are loaded on first use, so importing :mod:`monitor.report` (as
the CLI does to register ``cxr-monitor report``) does not import matplotlib.

Examples
--------
>>> from monitor.artifact import load_model            # doctest: +SKIP
>>> from monitor import report                         # doctest: +SKIP
>>> model = load_model("models/default")               # doctest: +SKIP
>>> report.rates_figure(model)                         # doctest: +SKIP
>>> report.describe_cluster(model, 2).summary          # doctest: +SKIP
>>> report.write_report(model, "report.html", images="../shared/data/nih/images")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ClusterDescription",
    "CompositionTable",
    "Finding",
    "MetadataComposition",
    "Report",
    "Thumbnails",
    "WrittenReport",
    "build_report",
    "cluster_colours",
    "cluster_highlights",
    "cluster_profile_figure",
    "describe_cluster",
    "figure_to_png",
    "load_thumbnails",
    "map_figure",
    "metadata_composition",
    "profiles_figure",
    "rates_figure",
    "render_html",
    "render_markdown",
    "select_thumbnails",
    "thumbnails_figure",
    "write_report",
]

_WHERE = {
    "ClusterDescription": "describe",
    "CompositionTable": "describe",
    "Finding": "describe",
    "MetadataComposition": "describe",
    "cluster_highlights": "describe",
    "describe_cluster": "describe",
    "metadata_composition": "describe",
    "Thumbnails": "figures",
    "cluster_colours": "figures",
    "cluster_profile_figure": "figures",
    "figure_to_png": "figures",
    "load_thumbnails": "figures",
    "map_figure": "figures",
    "profiles_figure": "figures",
    "rates_figure": "figures",
    "select_thumbnails": "figures",
    "thumbnails_figure": "figures",
    "Report": "render",
    "WrittenReport": "files",
    "build_report": "render",
    "render_html": "to_html",
    "render_markdown": "to_markdown",
    "write_report": "files",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'monitor.report' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
