"""Turn any chest X-ray input (DICOM, PNG, JPEG, WebP, TIFF or a raw array) into float32 pixels.

Every loader returns a :class:`~monitor.types.LoadedImage` whose pixels are a C-contiguous,
2-D ``float32`` array in one polarity (bright = dense) and whose metadata says where the image
came from. Every failure is a :class:`~monitor.errors.InvalidInputError` subclass whose message
starts with the image's name and gives the reason; no bare decoder exception escapes.

Sizes are checked from the header before any pixel data are decoded, so a small file that
announces a huge image costs nothing.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

from monitor.colour import ColourAssessment, assess_colour, luminance
from monitor.defaults import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE
from monitor.errors import (
    ImageTooLargeError,
    InvalidImageError,
    InvalidInputError,
    MissingPixelDataError,
    UnsupportedImageError,
)
from monitor.types import ImageMeta, LoadedImage

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIZE",
    "IMAGE_SUFFIXES",
    "from_array",
    "iter_image_files",
    "load_bytes",
    "load_image",
    "peek_size",
    "read_dicom_header",
    "read_file",
    "sniff_format",
]


IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff"}
)

_KINDS = ("dicom", "png", "jpeg", "webp", "tiff")
_KIND_ALIASES = {"dcm": "dicom", "jpg": "jpeg", "tif": "tiff"}
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "tiff": "TIFF"}
_DISPLAY = {"dicom": "DICOM", "png": "PNG", "jpeg": "JPEG", "webp": "WebP", "tiff": "TIFF"}

# Pillow modes read directly as one grey channel, with their bit depth (None: not an integer depth).
_GREY_MODES: dict[str, int | None] = {
    "L": 8,
    "I;16": 16,
    "I;16L": 16,
    "I;16B": 16,
    "I;16N": 16,
    "I": None,
    "F": None,
}
# Colour modes: accepted when grey in substance (identical channels, or colour that is only noise, a
# tint or small overlays; see monitor.colour), converted to luminance.
_COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "LA", "P", "PA"})


# --------------------------------------------------------------------------- public API


def sniff_format(data: bytes) -> str | None:
    """Recognise an image format from its magic number.

    Parameters
    ----------
    data : bytes
        The start of the file (132 bytes are enough).

    Returns
    -------
    str or None
        ``"dicom"``, ``"png"``, ``"jpeg"``, ``"webp"`` or ``"tiff"``; ``None`` if unrecognised.
        DICOM is recognised by the ``DICM`` prefix after the 128-byte preamble only: files
        without it are not DICOM Part 10 files and ``pydicom.dcmread(force=False)`` refuses them.
    """
    head = bytes(data[:132])
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    # Classic TIFF (42) and BigTIFF (43), both byte orders.
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    return None


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
) -> LoadedImage:
    """Load a radiograph from a file, whatever its format (sniffed from the content).

    Parameters
    ----------
    path : str or os.PathLike
        DICOM, PNG, JPEG, WebP or TIFF file; the suffix is ignored.
    max_pixels : int
        Largest accepted rows * columns, checked before decoding.
    min_size : int
        Smallest accepted side, in pixels.

    Returns
    -------
    LoadedImage
        ``meta.source`` is ``str(path)``.

    Raises
    ------
    InvalidImageError
        Missing file, directory, unreadable or corrupt content.
    UnsupportedImageError
        Readable but not a single-frame grey image of at least ``min_size`` pixels a side.
    ImageTooLargeError
        The header announces more than ``max_pixels`` pixels.
    """
    name = os.fspath(path)
    return load_bytes(read_file(name), name=name, max_pixels=max_pixels, min_size=min_size)


def read_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an image file, with the loader's errors for a missing or unreadable one.

    Raises
    ------
    InvalidImageError
        Missing file, directory, or a read error.
    """
    name = os.fspath(path)
    p = Path(name)
    if p.is_dir():
        raise InvalidImageError(f"{name}: is a directory, not an image file")
    try:
        return p.read_bytes()
    except FileNotFoundError as exc:
        raise InvalidImageError(f"{name}: no such file") from exc
    except OSError as exc:
        raise InvalidImageError(f"{name}: cannot read file ({exc.strerror or exc})") from exc


def load_bytes(
    data: bytes,
    *,
    name: str = "<bytes>",
    kind: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
) -> LoadedImage:
    """Decode a radiograph held in memory.

    Parameters
    ----------
    data : bytes
        The encoded file.
    name : str
        Names the image in metadata and error messages.
    kind : {None, "dicom", "png", "jpeg", "webp", "tiff"}
        Format to decode as; ``None`` sniffs it from the magic number.
    max_pixels, min_size : int
        See :func:`load_image`.

    Returns
    -------
    LoadedImage

    Raises
    ------
    InvalidInputError
        ``kind`` is not one of the accepted values.
    InvalidImageError, UnsupportedImageError, ImageTooLargeError
        See :func:`load_image`.
    """
    _check_limits(max_pixels, min_size)
    if kind is None:
        if not data:
            raise InvalidImageError(f"{name}: empty input (0 bytes)")
        kind = sniff_format(data)
        if kind is None:
            raise InvalidImageError(
                f"{name}: not a readable image "
                "(no DICOM, PNG, JPEG, WebP or TIFF signature in the first bytes)"
            )
    else:
        kind = _KIND_ALIASES.get(kind.lower(), kind.lower())
        if kind not in _KINDS:
            raise InvalidInputError(
                f"{name}: unknown image kind {kind!r} (expected one of {', '.join(_KINDS)})"
            )
        if not data:
            raise InvalidImageError(f"{name}: empty input (0 bytes)")
    if kind == "dicom":
        pixels, meta = _decode_dicom(data, name, max_pixels, min_size)
    else:
        pixels, meta = _decode_pillow(data, name, kind, max_pixels, min_size)
    return _finish(pixels, meta)


def peek_size(data: bytes, kind: str | None = None) -> tuple[int, int, int] | None:
    """(rows, columns, samples per pixel) from the header alone, without decoding pixels.

    For budgeting memory before a decode; ``None`` when the header cannot be read (the
    decoder then says why, with the loader's errors).
    """
    try:
        kind = sniff_format(data) if kind is None else _KIND_ALIASES.get(kind.lower(), kind.lower())
        if kind == "dicom":
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            return int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1) or 1)
        if kind in _PIL_FORMAT:
            with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[kind]]) as im:
                return im.size[1], im.size[0], len(im.getbands())
    except Exception:  # any header problem is the decoder's to report
        return None
    return None


def from_array(
    array: Any,
    *,
    name: str = "<array>",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
) -> LoadedImage:
    """Wrap a raw pixel array as a :class:`LoadedImage`.

    Parameters
    ----------
    array : array_like
        2-D, or (rows, columns, channels) with 1, 3 or 4 channels whose colour channels are
        identical (a 4th channel is taken as alpha and ignored). Any integer or float dtype;
        values are taken as they are (bright = dense is the caller's responsibility).
    name : str
        Names the image in metadata and error messages.
    max_pixels, min_size : int
        See :func:`load_image`.

    Returns
    -------
    LoadedImage
        ``meta.format`` is ``"array"``. A C-contiguous float32 2-D input is used without
        copying, so it shares memory with ``array``.
    """
    _check_limits(max_pixels, min_size)
    try:
        arr = np.asarray(array)
    except Exception as exc:  # anything numpy cannot turn into an array
        raise InvalidImageError(f"{name}: not an array of pixels ({exc})") from exc
    if arr.dtype == np.bool_ or arr.dtype.kind not in "uif":
        raise InvalidImageError(
            f"{name}: pixel dtype {arr.dtype} is not supported (expected an integer or float dtype)"
        )
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        rows, columns = arr.shape[:2]
    elif arr.ndim == 2:
        rows, columns = arr.shape
    else:
        raise UnsupportedImageError(
            f"{name}: array of shape {arr.shape} is not a grey image "
            "(expected (rows, columns) or (rows, columns, 1|3|4))"
        )
    _check_size(name, rows, columns, max_pixels, min_size)
    bits = arr.dtype.itemsize * 8 if arr.dtype.kind == "u" else None
    verdict = None
    if arr.ndim == 3:
        arr, verdict = _one_channel(arr, name, n_colour=min(arr.shape[2], 3))
    with np.errstate(over="ignore"):  # out-of-range floats become inf, reported by _finish
        pixels = np.ascontiguousarray(arr, dtype=np.float32)
    meta = ImageMeta(source=name, format="array", rows=rows, columns=columns, bits_stored=bits,
                     **_colour_fields(verdict))  # fmt: skip
    return _finish(pixels, meta)


def iter_image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """List the image files under a folder, recursively, in sorted order.

    A file is listed if its suffix is in :data:`IMAGE_SUFFIXES` (any case), or if it has no
    suffix or a purely numeric one (DICOM files are often named by UID, e.g. ``1.2.840.3``)
    and its content sniffs as DICOM. Hidden files and folders (name starting with ``.``, e.g.
    macOS ``._x.png`` resource forks) and ``DICOMDIR`` indexes are skipped.

    Parameters
    ----------
    folder : str or os.PathLike
        The folder to walk; symbolic links to folders are not followed.

    Returns
    -------
    list of Path

    Raises
    ------
    InvalidInputError
        ``folder`` is not a directory.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InvalidInputError(f"{os.fspath(folder)}: not a directory")
    found: list[Path] = []
    # os.walk silently skips unreadable folders, which is what a scan of a share wants.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fname in filenames:
            if fname.startswith(".") or fname.upper() == "DICOMDIR":
                continue
            path = Path(dirpath, fname)
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                found.append(path)
            elif (suffix == "" or suffix[1:].isdigit()) and _sniffs_as_dicom(path):
                found.append(path)
    return sorted(found)


# --------------------------------------------------------------------------- shared checks


def _check_limits(max_pixels: int, min_size: int) -> None:
    if max_pixels < 1 or min_size < 1:
        raise InvalidInputError(f"max_pixels and min_size must be >= 1, got {max_pixels} and {min_size}")


def _check_size(name: str, rows: int, columns: int, max_pixels: int, min_size: int) -> None:
    """Reject from the header sizes alone, before any pixel is decoded."""
    if rows * columns > max_pixels:
        raise ImageTooLargeError(
            f"{name}: image of {columns}x{rows} pixels ({rows * columns:,}) exceeds the limit "
            f"of {max_pixels:,} pixels"
        )
    if rows < min_size or columns < min_size:
        raise UnsupportedImageError(
            f"{name}: image of {columns}x{rows} pixels is too small (each side must be at least "
            f"{min_size} pixels)"
        )


def _finish(pixels: np.ndarray, meta: ImageMeta) -> LoadedImage:
    """The one place every path goes through: finite, non-constant, float32 C-contiguous 2-D."""
    assert pixels.dtype == np.float32 and pixels.ndim == 2 and pixels.flags.c_contiguous
    # min/max propagate NaN and expose inf, so two reductions check both without a mask copy.
    lo, hi = float(pixels.min()), float(pixels.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InvalidImageError(f"{meta.source}: image contains NaN or infinite values")
    if lo == hi:
        # A constant image has no structure (no histogram spread, no spectrum) to profile.
        raise InvalidImageError(f"{meta.source}: image is constant (all pixels = {lo:g})")
    return LoadedImage(pixels=pixels, meta=meta)


def _one_channel(arr: np.ndarray, name: str, n_colour: int) -> tuple[np.ndarray, ColourAssessment | None]:
    """One grey plane of a (rows, columns, channels) array, and what converting it removed.

    Identical colour channels give channel 0 (no conversion, ``None``). Otherwise the image
    is grey up to noise, a tint or small overlays (see :mod:`monitor.colour`) and becomes
    its luminance, or it is genuinely coloured and refused.
    """
    first = arr[..., 0]
    if all(np.array_equal(first, arr[..., c]) for c in range(1, n_colour)):
        return first, None
    rgb = arr[..., :3]
    with np.errstate(invalid="ignore", over="ignore"):  # NaN or inf: reported by _finish
        grey = luminance(rgb)
        verdict = assess_colour(rgb, grey)
    if not verdict.accepted:
        raise UnsupportedImageError(
            f"{name}: colour image is not supported ({verdict.reason}; a chest radiograph must be grey)"
        )
    return grey, verdict


def _colour_fields(verdict: ColourAssessment | None) -> dict[str, Any]:
    if verdict is None:
        return {}
    return {"colour_conversion": verdict.kind, "coloured_share": round(verdict.coloured_share, 6)}


# --------------------------------------------------------------------------- DICOM


def read_dicom_header(
    data: bytes,
    *,
    name: str = "<bytes>",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
) -> ImageMeta:
    """Check that a DICOM file holds a decodable radiograph, without decoding its pixels.

    The checks :func:`load_bytes` makes before decoding (readable dataset, Pixel Data present,
    single-frame grayscale, size within limits) plus, for uncompressed transfer syntaxes, that
    the Pixel Data holds as many bytes as the header announces. A storage node uses it to
    answer a sender before the slower decode.

    Parameters
    ----------
    data : bytes
        A DICOM file (preamble and file meta information included).
    name, max_pixels, min_size
        See :func:`load_bytes`.

    Returns
    -------
    ImageMeta

    Raises
    ------
    InvalidImageError
        Unreadable or truncated dataset, or a missing / invalid header element.
    MissingPixelDataError
        No (7FE0,0010) Pixel Data.
    UnsupportedImageError, ImageTooLargeError
        See :func:`load_image`.
    """
    _check_limits(max_pixels, min_size)
    ds = _parse_dicom(data, name)
    meta, _ = _checked_header(ds, data, name, max_pixels, min_size)
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is not None and not tsyntax.is_compressed:
        bits = int(_number(ds, "BitsAllocated", 0))
        expected = meta.rows * meta.columns * max(bits, 8) // 8
        held = len(ds.PixelData)
        if held < expected:
            raise InvalidImageError(
                f"{name}: (7FE0,0010) Pixel Data truncated: {held} bytes where {meta.rows}x{meta.columns} "
                f"pixels at {bits} bits allocated need {expected}"
            )
    return meta


def _parse_dicom(data: bytes, name: str) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data), force=False)
    except InvalidDicomError as exc:
        raise InvalidImageError(f"{name}: not a readable DICOM file ({exc})") from exc
    except MemoryError:
        raise
    except Exception as exc:  # malformed headers surface as many types (struct.error, EOFError...)
        raise InvalidImageError(
            f"{name}: not a readable DICOM file; it may be truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from exc


def _checked_header(
    ds: pydicom.Dataset, data: bytes, name: str, max_pixels: int, min_size: int
) -> tuple[ImageMeta, Callable[[np.ndarray, pydicom.Dataset], np.ndarray]]:
    try:
        return _dicom_header(ds, data, name, max_pixels, min_size)
    except InvalidInputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # element values are parsed lazily, so a bad one fails here
        raise InvalidImageError(f"{name}: invalid DICOM header ({type(exc).__name__}: {exc})") from exc


def _decode_dicom(data: bytes, name: str, max_pixels: int, min_size: int) -> tuple[np.ndarray, ImageMeta]:
    ds = _parse_dicom(data, name)
    meta, to_modality = _checked_header(ds, data, name, max_pixels, min_size)

    try:
        stored = ds.pixel_array
    except NotImplementedError as exc:  # pydicom: no decoder exists for this transfer syntax
        raise UnsupportedImageError(
            f"{name}: transfer syntax '{meta.transfer_syntax}' is not supported ({exc})"
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:  # decoder failures (RuntimeError, ValueError...) on corrupt data
        raise InvalidImageError(
            f"{name}: cannot decode the {meta.transfer_syntax} pixel data; it may be truncated or "
            f"corrupt ({type(exc).__name__}: {exc})"
        ) from exc

    try:
        pixels = to_modality(stored, ds)
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidImageError(
            f"{name}: cannot apply the Modality LUT ({type(exc).__name__}: {exc})"
        ) from exc
    del ds, stored  # drop the compressed bytes and the integer array before returning

    if pixels.shape != (meta.rows, meta.columns):
        raise InvalidImageError(
            f"{name}: decoded pixel array has shape {pixels.shape}, header says {meta.rows}x{meta.columns}"
        )
    return pixels, meta


def _dicom_header(
    ds: pydicom.Dataset, data: bytes, name: str, max_pixels: int, min_size: int
) -> tuple[ImageMeta, Callable[[np.ndarray, pydicom.Dataset], np.ndarray]]:
    """Validate the header and return metadata plus the stored -> float32 modality transform."""
    if "PixelData" not in ds:
        hint = _truncation_hint(data)
        # Cut short inside Pixel Data is a truncated file, not a dataset without pixels.
        error = InvalidImageError if hint else MissingPixelDataError
        raise error(f"{name}: (7FE0,0010) Pixel Data is missing{hint}")
    frames = ds.get("NumberOfFrames")
    n_frames = int(frames) if frames not in (None, "") else 1
    if n_frames > 1:
        raise UnsupportedImageError(
            f"{name}: multi-frame DICOM ({n_frames} frames) is not supported; expected a single radiograph"
        )
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not photometric:
        raise InvalidImageError(f"{name}: (0028,0004) Photometric Interpretation is missing")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedImageError(
            f"{name}: (0028,0004) Photometric Interpretation '{photometric}' is not supported "
            "for chest radiographs"
        )
    samples = ds.get("SamplesPerPixel", 1)
    if samples not in (None, "") and int(samples) != 1:
        raise UnsupportedImageError(
            f"{name}: (0028,0002) Samples per Pixel {int(samples)} is not supported (expected 1)"
        )
    for keyword, tag in (("Rows", "(0028,0010)"), ("Columns", "(0028,0011)")):
        if ds.get(keyword) in (None, ""):
            raise InvalidImageError(f"{name}: {tag} {keyword} is missing")
    rows, columns = int(ds.Rows), int(ds.Columns)
    _check_size(name, rows, columns, max_pixels, min_size)

    bits_stored = int(_number(ds, "BitsStored", 0)) or None
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    meta = ImageMeta(
        source=name,
        format="dicom",
        rows=rows,
        columns=columns,
        bits_stored=bits_stored,
        photometric_interpretation=photometric,
        transfer_syntax=tsyntax.name if tsyntax is not None else None,
        modality=_text(ds, "Modality"),
        manufacturer=_text(ds, "Manufacturer"),
        manufacturer_model_name=_text(ds, "ManufacturerModelName"),
        view_position=_text(ds, "ViewPosition"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        pixel_spacing_mm=_spacing(ds),
    )

    invert = photometric == "MONOCHROME1"
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    depth = bits_stored or int(ds.get("BitsAllocated", 16) or 16)
    stored_lo, stored_hi = (-(2 ** (depth - 1)), 2 ** (depth - 1) - 1) if signed else (0, 2**depth - 1)

    if ds.get("ModalityLUTSequence"):

        def transform(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
            out = np.ascontiguousarray(apply_modality_lut(stored, ds), dtype=np.float32)
            if invert:
                # The LUT's output range is [0, 2**depth - 1] with depth from its descriptor.
                lut_hi = float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
                np.subtract(lut_hi, out, out=out)
            return out

        return meta, transform

    # An absent (or empty) slope or intercept means identity, as in the standard's defaults.
    slope = _number(ds, "RescaleSlope", 1.0)
    intercept = _number(ds, "RescaleIntercept", 0.0)

    def transform(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
        # Rescale in float32, in place: pydicom's apply_rescale would make a float64 copy.
        out = np.ascontiguousarray(stored, dtype=np.float32)
        if slope != 1.0:
            out *= np.float32(slope)
        if intercept != 0.0:
            out += np.float32(intercept)
        if invert:
            # MONOCHROME1: low values are bright. Reflect within the modality output range of the
            # possible stored values (fixed per header, not per image) so that bright = dense.
            lo, hi = stored_lo * slope + intercept, stored_hi * slope + intercept
            np.subtract(np.float32(lo + hi), out, out=out)
        return out

    return meta, transform


def _truncation_hint(data: bytes) -> str:
    """Explain a missing Pixel Data element whose tag is in the bytes: pydicom drops it when cut short."""
    if b"\xe0\x7f\x10\x00" in data or b"\x7f\xe0\x00\x10" in data:
        return " (its tag is present, so the file is probably truncated or corrupt)"
    return ""


def _number(ds: pydicom.Dataset, keyword: str, default: float) -> float:
    value = ds.get(keyword)
    return default if value in (None, "") else float(value)


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _spacing(ds: pydicom.Dataset) -> float | None:
    """Pixel Spacing, else Imager Pixel Spacing (first value, mm); 0 or unparsable -> None."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        first = value[0] if isinstance(value, (list, tuple, MultiValue)) else value
        try:
            mm = float(first)
        except (TypeError, ValueError):
            continue
        if np.isfinite(mm) and mm > 0:
            return mm
    return None


def _sniffs_as_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return sniff_format(fh.read(132)) == "dicom"
    except OSError:
        return False


# --------------------------------------------------------------------------- Pillow formats


def _decode_pillow(
    data: bytes, name: str, kind: str, max_pixels: int, min_size: int
) -> tuple[np.ndarray, ImageMeta]:
    fmt = _DISPLAY[kind]
    try:
        # Restricting Pillow to the one expected plugin keeps e.g. a BMP out of the pipeline.
        im = Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[kind]])
    except Image.DecompressionBombError as exc:
        # Pillow's own bomb limit (2 * Image.MAX_IMAGE_PIXELS) is a backstop behind max_pixels.
        raise ImageTooLargeError(f"{name}: {fmt} image is too large ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(
            f"{name}: not a readable {fmt} image; it may be truncated or corrupt"
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:  # header parse errors: OSError, SyntaxError, ValueError, struct.error...
        raise InvalidImageError(
            f"{name}: cannot read the {fmt} header; it may be truncated or corrupt ({exc})"
        ) from exc

    with im:
        columns, rows = im.size
        _check_size(name, rows, columns, max_pixels, min_size)
        try:
            # Counting TIFF pages walks the IFD chain, which can itself hit corrupt data.
            n_frames = getattr(im, "n_frames", 1)
        except MemoryError:
            raise
        except Exception as exc:
            raise InvalidImageError(
                f"{name}: cannot read the {fmt} frames; it may be truncated or corrupt ({exc})"
            ) from exc
        if n_frames > 1:
            raise UnsupportedImageError(
                f"{name}: multi-frame {fmt} ({n_frames} frames or pages) is not supported; "
                "expected a single radiograph"
            )
        mode = im.mode
        if mode == "1":
            # Bilevel images have no grey levels to profile; not a radiograph.
            raise UnsupportedImageError(f"{name}: 1-bit (black-and-white) {fmt} image is not supported")
        if mode not in _GREY_MODES and mode not in _COLOUR_MODES:
            raise UnsupportedImageError(f"{name}: {fmt} image mode '{mode}' is not supported")
        try:
            im.load()
            if mode in ("P", "PA"):
                # A palette may hold grey entries only; expand it and apply the colour check.
                arr = np.asarray(im.convert("RGB"))
            else:
                arr = np.asarray(im)
        except MemoryError:
            raise
        except Exception as exc:  # Pillow raises OSError("image file is truncated ...") and others
            raise InvalidImageError(
                f"{name}: truncated or corrupt {fmt} pixel data ({type(exc).__name__}: {exc})"
            ) from exc

    verdict = None
    if mode in _GREY_MODES:
        bits = _GREY_MODES[mode]
    else:
        bits = 8
        if arr.ndim == 3:
            arr, verdict = _one_channel(arr, name, n_colour=1 if mode == "LA" else 3)
    pixels = np.ascontiguousarray(arr, dtype=np.float32)
    del arr
    meta = ImageMeta(source=name, format=kind, rows=rows, columns=columns, bits_stored=bits,
                     **_colour_fields(verdict))  # fmt: skip
    return pixels, meta
