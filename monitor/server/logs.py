"""Logging for the sidecar: one JSON object per line (ts, level, logger, msg, extra fields) or plain text."""

from __future__ import annotations

import collections
import json
import logging
import math
import re
import sys
import warnings
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "TEXT_FORMAT", "TextFormatter", "configure_logging"]

# Attributes every LogRecord has; anything else was passed through `extra=` and is emitted as a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """``{"ts": ISO-8601 UTC, "level", "logger", "msg", ...extra fields, "exc": traceback}``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in doc:
                doc[key] = _plain(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """One line per record: line breaks and other control characters in the message are escaped
    (a request id or file name holding ``\\n`` would otherwise forge a log line); a traceback
    follows on its own lines as usual."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        return _CONTROL.sub(_escape, super().formatMessage(record))


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _SameWarningOnce(logging.Filter):
    """Drop a Python warning whose text a library has just logged itself.

    pydicom reports each problem twice, ``logger.warning(msg)`` then ``warnings.warn(msg)``
    (``pydicom.misc.warn_and_log``): with both routed to the log, keep the first.
    """

    def __init__(self) -> None:
        super().__init__()
        self._recent: collections.deque[str] = collections.deque(maxlen=16)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":
            text = getattr(record, "warning", None)
            if text in self._recent:
                return False
        elif record.levelno >= logging.WARNING:
            self._recent.append(record.getMessage())
        return True


def _log_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
    line: str | None = None,
) -> None:  # fmt: skip
    # warnings.showwarning replacement: one log record instead of two raw lines on stderr.
    text = str(message)
    logging.getLogger("py.warnings").warning(
        "%s: %s", category.__name__, text, extra={"warning": text, "source": f"{filename}:{lineno}"}
    )


def configure_logging(fmt: str, level: str, *, text_format: str = TEXT_FORMAT) -> None:
    """Send every log record and Python warning to stderr as JSON lines or text; replaces root handlers.

    Parameters
    ----------
    fmt : {"json", "text"}
    level : str
        DEBUG, INFO, WARNING or ERROR.
    text_format : str
        The ``logging`` format of text lines.

    Warnings (``warnings.warn``: pydicom, numpy) become log records of the ``py.warnings``
    logger, one line each, and a warning that repeats a message a library just logged is
    dropped. Decoder processes call this too, so their lines have the same format.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(text_format))
    handler.addFilter(_SameWarningOnce())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    warnings.showwarning = _log_warning
    # pynetdicom narrates every association and DIMSE message at INFO; the DICOM node logs what matters.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))
