"""Exceptions raised by the monitor, each carrying a transport-neutral code.

The gRPC layer maps :attr:`MonitorError.code` to a status code; the CLI maps it
to an exit status. Nothing here imports a transport.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "DeadlineExceededError",
    "ImageTooLargeError",
    "InvalidImageError",
    "InvalidInputError",
    "MissingPixelDataError",
    "MonitorError",
    "NotFittedError",
    "StoreError",
    "UnsupportedImageError",
]


class MonitorError(Exception):
    """Base class of every error the monitor raises on purpose.

    Attributes
    ----------
    code : str
        Transport-neutral category: ``"invalid_argument"``, ``"resource_exhausted"``,
        ``"failed_precondition"``, ``"deadline_exceeded"``, ``"unavailable"`` or ``"internal"``.
    """

    code = "internal"


class InvalidInputError(MonitorError, ValueError):
    """A request or a table is malformed (wrong column, shape, dtype...)."""

    code = "invalid_argument"


class InvalidImageError(InvalidInputError):
    """The bytes or file are not a readable image (truncated, not an image, no pixel data)."""


class MissingPixelDataError(InvalidImageError):
    """A readable DICOM dataset without (7FE0,0010) Pixel Data: not an image, or cut short before it."""


class UnsupportedImageError(InvalidInputError):
    """A readable image that is not a single-frame grayscale radiograph."""


class ImageTooLargeError(InvalidInputError):
    """The image header announces more pixels than the configured limit."""

    code = "resource_exhausted"


class ArtifactError(MonitorError):
    """A model directory is missing files, was tampered with, or is of another spec version."""

    code = "failed_precondition"


class NotFittedError(MonitorError, AttributeError):
    """An estimator method was called before ``fit``."""

    code = "failed_precondition"


class DeadlineExceededError(MonitorError):
    """The caller's deadline passed before the work could be done."""

    code = "deadline_exceeded"


class StoreError(MonitorError):
    """The outcome store cannot be opened, read or written (disk full, wrong file, stalled disk)."""

    code = "unavailable"
