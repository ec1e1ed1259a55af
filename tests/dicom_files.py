"""DICOM Part 10 files for the tests, written with pydicom: the one place that knows which
elements an image dataset needs (file meta, SOP class and instance, pixel module).

Imported by the test modules as ``from dicom_files import ...`` (pytest puts ``tests/`` on the
path: the folder is not a package).
"""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

__all__ = ["dicom_bytes", "dicom_dataset", "to_bytes"]


def dicom_dataset(
    pixels: np.ndarray | None,
    *,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    samples: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
    sop_class: str = SecondaryCaptureImageStorage,
    **elements: object,
) -> Dataset:
    """A dataset holding ``pixels`` as native (uncompressed) pixel data.

    Parameters
    ----------
    pixels : ndarray of shape (rows, columns) or (rows, columns, samples), or None
        Stored as they are: bits allocated from the dtype, pixel representation signed for
        signed integers. None leaves out the pixel module but for the photometric
        interpretation and samples per pixel (a dataset without pixel data).
    bits_stored : int, optional
        Defaults to the bits allocated.
    samples : int
        Samples per pixel, written as given (it may contradict ``pixels`` on purpose).
    **elements
        Further elements by keyword, set last (they may replace any of the above, e.g.
        ``PixelData`` with encapsulated frames).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = samples
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(pixels.dtype.kind == "i")
        if samples > 1:
            ds.PlanarConfiguration = 0
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """``ds`` as a DICOM Part 10 file (preamble + 'DICM' + file meta)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_bytes(pixels: np.ndarray | None, **kwargs: object) -> bytes:
    """A DICOM Part 10 file holding ``pixels`` (see :func:`dicom_dataset` for the arguments)."""
    return to_bytes(dicom_dataset(pixels, **kwargs))
