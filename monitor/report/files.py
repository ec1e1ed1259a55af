"""Write a report to disk: one HTML file, or Markdown with its figures beside it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInputError
from ..model import ReliabilityModel
from .render import FORMATS, Report, build_report
from .to_html import render_html
from .to_markdown import render_markdown

__all__ = ["WrittenReport", "write_report"]


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
