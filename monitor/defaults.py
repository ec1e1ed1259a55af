"""The one home of every default shared by several modules: addresses, limits, exit codes,
the bundled model's location.

Stdlib only, so that any layer (imaging, settings, the client, the CLI) can import it
without loading a heavy dependency.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_AUDIT_ALPHA",
    "DEFAULT_AUDIT_MIN_EFFECT",
    "DEFAULT_AUDIT_MIN_SEGMENT_IMAGES",
    "DEFAULT_DECODE_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_MAX_FIT_PROFILES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "DEFAULT_METRICS_PORT",
    "DEFAULT_MIN_SIZE",
    "DEFAULT_PORT",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_USAGE",
    "MODEL_ENV",
    "bundled_model_dir",
    "default_model_dir",
]

DEFAULT_HOST = "0.0.0.0"
"""Where ``serve`` listens."""
DEFAULT_PORT = 50051
"""gRPC port of ``serve``."""
DEFAULT_ADDRESS = f"localhost:{DEFAULT_PORT}"
"""Where the client looks for a sidecar."""
DEFAULT_METRICS_PORT = 9108
"""Prometheus /metrics port of ``serve``."""

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest rows * columns accepted; checked from the header before decoding."""
DEFAULT_MIN_SIZE = 64
"""Smallest accepted side of an image, in pixels."""
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest gRPC message, each way (server and client)."""
DEFAULT_MEMORY_BUDGET_BYTES = 384 * 2**20
"""Bytes that the images being scored may need together; see deploy/README.md for the sizing."""
DEFAULT_DECODE_TIMEOUT = 60.0
"""Seconds a decoder process may spend on one image before it is killed and replaced."""

DEFAULT_MAX_FIT_PROFILES = 100_000
"""Above this many profiles ``fit`` clusters a seeded sample, then assigns every profile
(the BIC search's time grows linearly with n; benchmarks/results/scale.md)."""

DEFAULT_AUDIT_ALPHA = 0.01
"""``audit``: false discovery rate of change points over groups."""
DEFAULT_AUDIT_MIN_EFFECT = 0.5
"""``audit``: smallest feature-mean change that counts, in pooled SD (Cohen's "medium" effect)."""
DEFAULT_AUDIT_MIN_SEGMENT_IMAGES = 20
"""``audit``: images needed on each side of a change point."""

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3
"""CLI exit status: success; some inputs failed (each reported); usage error; error."""

MODEL_ENV = "CXR_MONITOR_MODEL"


def bundled_model_dir() -> Path:
    """``models/default`` beside the package."""
    return Path(__file__).resolve().parents[1] / "models" / "default"


def default_model_dir() -> Path:
    """The model directory commands use by default: ``$CXR_MONITOR_MODEL``, else the bundled model."""
    env = os.environ.get(MODEL_ENV)
    return Path(env) if env else bundled_model_dir()
