"""Tests for monitor.imaging: every input format to float32 pixels, and every bad input to a clear error."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_files import dicom_bytes
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML

from monitor.errors import (
    ImageTooLargeError,
    InvalidImageError,
    InvalidInputError,
    MissingPixelDataError,
    UnsupportedImageError,
)
from monitor.imaging import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIZE,
    IMAGE_SUFFIXES,
    from_array,
    iter_image_files,
    load_bytes,
    load_image,
    read_dicom_header,
    sniff_format,
)

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- helpers


def _pil_bytes(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _ramp(rows: int = 80, columns: int = 96, hi: int = 255, dtype: str = "uint8") -> np.ndarray:
    """A non-constant test image with distinct values across the frame."""
    return (np.arange(rows * columns).reshape(rows, columns) % (hi + 1)).astype(dtype)


def _strip_means(pixels: np.ndarray) -> tuple[float, float]:
    """Mean of the central vertical strip (spine, mediastinum) and of the two lung strips."""
    rows, cols = pixels.shape
    band = pixels[int(0.25 * rows) : int(0.75 * rows)]
    centre = band[:, int(0.45 * cols) : int(0.55 * cols)].mean()
    lungs = (
        band[:, int(0.2 * cols) : int(0.3 * cols)].mean() + band[:, int(0.7 * cols) : int(0.8 * cols)].mean()
    ) / 2
    return float(centre), float(lungs)


def _assert_output(img, rows: int, columns: int) -> None:
    assert img.pixels.dtype == np.float32
    assert img.pixels.ndim == 2 and img.pixels.flags.c_contiguous
    assert img.pixels.shape == (rows, columns)
    assert (img.meta.rows, img.meta.columns) == (rows, columns)


# --------------------------------------------------------------------------- constants and sniffing


def test_public_constants() -> None:
    assert DEFAULT_MAX_PIXELS == 50_000_000
    assert DEFAULT_MIN_SIZE == 64
    assert IMAGE_SUFFIXES == {".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff"}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\0" * 128 + b"DICM" + b"\2\0", "dicom"),
        (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "png"),
        (b"\xff\xd8\xff\xe0\0\x10JFIF", "jpeg"),
        (b"RIFF\x24\0\0\0WEBPVP8L", "webp"),
        (b"II*\0\x08\0\0\0", "tiff"),
        (b"MM\0*\0\0\0\x08", "tiff"),
        (b"", None),
        (b"DICM", None),
        (b"RIFF\x24\0\0\0WAVEfmt ", None),
        (b"hello, world\n" * 20, None),
        (b"GIF89a" + b"\0" * 200, None),
    ],
)
def test_sniff_format(data: bytes, expected: str | None) -> None:
    assert sniff_format(data) == expected


def test_sniff_format_on_real_files(data_dir: Path) -> None:
    assert sniff_format((data_dir / "dicom" / "cxr_pa_cr_philips_j2k.dcm").read_bytes()[:132]) == "dicom"
    webp = next((data_dir / "nih" / "images").glob("*.webp"))
    assert sniff_format(webp.read_bytes()) == "webp"
    jpeg = next((data_dir / "kermany" / "test" / "NORMAL").glob("*.jpeg"))
    assert sniff_format(jpeg.read_bytes()) == "jpeg"


# --------------------------------------------------------------------------- real DICOM


def test_monochrome1_is_inverted_relative_to_monochrome2(data_dir: Path) -> None:
    # The two files hold bit-identical pixel data; only the label differs. MONOCHROME1 means
    # "low = bright", so once both are in bright = dense polarity they must be exact negatives.
    m2 = load_image(data_dir / "dicom" / "cxr_pa_monochrome2_jpeg.dcm")
    m1 = load_image(data_dir / "dicom" / "cxr_pa_monochrome1_jpeg.dcm")
    _assert_output(m2, 1024, 1024)
    _assert_output(m1, 1024, 1024)
    assert m2.meta.photometric_interpretation == "MONOCHROME2"
    assert m1.meta.photometric_interpretation == "MONOCHROME1"
    # Inverted within the 8-bit stored range, so the value range is kept.
    np.testing.assert_array_equal(m1.pixels, 255.0 - m2.pixels)
    assert np.corrcoef(m1.pixels.ravel(), m2.pixels.ravel())[0, 1] < -0.99
    # The MONOCHROME2 file is a normal radiograph: spine/mediastinum brighter than the lungs.
    centre, lungs = _strip_means(m2.pixels)
    assert centre > lungs + 20


def test_monochrome2_jpeg_metadata(data_dir: Path) -> None:
    meta = load_image(data_dir / "dicom" / "cxr_pa_monochrome2_jpeg.dcm").meta
    assert meta.format == "dicom"
    assert meta.bits_stored == 8
    assert meta.transfer_syntax == "JPEG Baseline (Process 1)"
    assert meta.modality == "CR"
    assert meta.view_position == "PA"
    assert meta.pixel_spacing_mm == pytest.approx(0.168)
    assert meta.manufacturer is None
    assert meta.source.endswith("cxr_pa_monochrome2_jpeg.dcm")


def test_philips_j2k_monochrome1(data_dir: Path) -> None:
    path = data_dir / "dicom" / "cxr_pa_cr_philips_j2k.dcm"
    img = load_image(path)
    _assert_output(img, 1955, 1841)
    meta = img.meta
    assert meta.bits_stored == 15
    assert meta.photometric_interpretation == "MONOCHROME1"
    assert meta.transfer_syntax == "JPEG 2000 Image Compression"
    assert meta.modality == "CR"
    assert meta.view_position == "PA"
    assert meta.manufacturer == "Philips Medical Systems"
    assert meta.manufacturer_model_name
    assert meta.pixel_spacing_mm is None  # the header says 0\0
    # Inverted within the 15-bit stored range.
    stored = pydicom.dcmread(path).pixel_array
    assert stored.max() < 2**15
    np.testing.assert_array_equal(img.pixels, 32767.0 - stored)
    # Polarity: on the raw MONOCHROME1 values the spine column is *darker* than the lungs
    # (checked first, so the assertion below is meaningful); after loading it is brighter.
    raw_centre, raw_lungs = _strip_means(stored.astype(np.float32))
    assert raw_centre < raw_lungs
    centre, lungs = _strip_means(img.pixels)
    assert centre > lungs + 1000


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm"])
def test_compressed_transfer_syntaxes_match_uncompressed(name: str) -> None:
    # pydicom's bundled test files: the same 64x64 signed 16-bit image in several syntaxes.
    reference = load_image(get_testdata_file("MR_small.dcm"))
    img = load_image(get_testdata_file(name))
    _assert_output(img, 64, 64)
    np.testing.assert_array_equal(img.pixels, reference.pixels)
    assert (
        img.meta.transfer_syntax == pydicom.dcmread(get_testdata_file(name)).file_meta.TransferSyntaxUID.name
    )


# --------------------------------------------------------------------------- synthetic DICOM


def test_rescale_slope_and_intercept_applied() -> None:
    stored = _ramp(70, 80, hi=4000, dtype="uint16")
    data = dicom_bytes(stored, RescaleSlope="2", RescaleIntercept="-1024", PixelSpacing=[0.2, 0.25])
    img = load_bytes(data, name="rescaled.dcm")
    _assert_output(img, 70, 80)
    np.testing.assert_array_equal(img.pixels, stored.astype(np.float32) * 2 - 1024)
    assert img.pixels.min() == -1024
    assert img.meta.bits_stored == 16
    assert img.meta.transfer_syntax == "Explicit VR Little Endian"
    assert img.meta.pixel_spacing_mm == pytest.approx(0.2)
    assert img.meta.source == "rescaled.dcm"


def test_rescale_and_monochrome1_inverts_in_output_range() -> None:
    stored = _ramp(64, 64, hi=4095, dtype="uint16")
    data = dicom_bytes(
        stored, bits_stored=12, photometric="MONOCHROME1", RescaleSlope="2", RescaleIntercept="-1024"
    )
    img = load_bytes(data)
    # Output range of stored 0..4095 is [-1024, 7166]; MONOCHROME1 reflects within it.
    np.testing.assert_array_equal(img.pixels, (-1024 + 7166) - (stored.astype(np.float32) * 2 - 1024))


@pytest.mark.parametrize(
    ("photometric", "expected"),
    [("MONOCHROME2", lambda x: x), ("MONOCHROME1", lambda x: 4095 - x)],
)
def test_12_bit_dicom(photometric: str, expected) -> None:
    stored = _ramp(66, 70, hi=4095, dtype="uint16")
    img = load_bytes(dicom_bytes(stored, bits_stored=12, photometric=photometric), name="twelve.dcm")
    _assert_output(img, 66, 70)
    assert img.meta.bits_stored == 12
    np.testing.assert_array_equal(img.pixels, expected(stored.astype(np.float32)))


def test_signed_16_bit_monochrome1() -> None:
    stored = (_ramp(64, 64, hi=2000, dtype="int16") - 1000).astype(np.int16)
    img = load_bytes(dicom_bytes(stored, photometric="MONOCHROME1"))
    # Signed 16-bit range is [-32768, 32767]; reflection maps x to -1 - x.
    np.testing.assert_array_equal(img.pixels, -1.0 - stored)


def test_imager_pixel_spacing_used_when_pixel_spacing_is_zero() -> None:
    data = dicom_bytes(_ramp(), PixelSpacing=[0, 0], ImagerPixelSpacing=[0.139, 0.139])
    assert load_bytes(data).meta.pixel_spacing_mm == pytest.approx(0.139)


# --------------------------------------------------------------------------- Pillow formats


def test_png_8_bit() -> None:
    arr = _ramp()
    img = load_bytes(_pil_bytes(Image.fromarray(arr), "PNG"), name="eight.png")
    _assert_output(img, 80, 96)
    np.testing.assert_array_equal(img.pixels, arr)
    assert (img.meta.format, img.meta.bits_stored, img.meta.source) == ("png", 8, "eight.png")


def test_png_16_bit(tmp_path: Path) -> None:
    arr = _ramp(100, 70, hi=65535, dtype="uint16") * 7
    path = tmp_path / "sixteen.png"
    Image.fromarray(arr).save(path)
    img = load_image(path)
    _assert_output(img, 100, 70)
    np.testing.assert_array_equal(img.pixels, arr)
    assert (img.meta.format, img.meta.bits_stored) == ("png", 16)
    assert img.meta.source == str(path)


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_tiff_16_bit(dtype: str) -> None:
    arr = (_ramp(90, 64, hi=65535, dtype="uint16") * 5).astype(dtype)
    img = load_bytes(_pil_bytes(Image.fromarray(arr), "TIFF"))
    _assert_output(img, 90, 64)
    np.testing.assert_array_equal(img.pixels, arr.astype(np.float32))
    assert (img.meta.format, img.meta.bits_stored) == ("tiff", 16)


def test_tiff_float32() -> None:
    arr = _ramp(64, 64, hi=999, dtype="float32") / 7
    img = load_bytes(_pil_bytes(Image.fromarray(arr), "TIFF"))
    np.testing.assert_array_equal(img.pixels, arr)
    assert img.meta.bits_stored is None


def test_real_webp_rgb_with_equal_channels(data_dir: Path) -> None:
    path = sorted((data_dir / "nih" / "images").glob("*.webp"))[0]
    with Image.open(path) as im:
        assert im.mode == "RGB"
        first = np.asarray(im)[..., 0]
    img = load_image(path)
    _assert_output(img, 1024, 1024)
    np.testing.assert_array_equal(img.pixels, first)
    assert (img.meta.format, img.meta.bits_stored) == ("webp", 8)


def test_real_jpeg_rgb_with_equal_channels(data_dir: Path) -> None:
    path = sorted((data_dir / "kermany" / "test" / "NORMAL").glob("*.jpeg"))[0]
    img = load_image(path)
    _assert_output(img, 224, 224)
    assert (img.meta.format, img.meta.bits_stored) == ("jpeg", 8)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P"])
def test_grey_stored_as_colour_is_accepted(mode: str) -> None:
    arr = _ramp()
    img = load_bytes(_pil_bytes(Image.fromarray(arr).convert(mode), "PNG"))
    np.testing.assert_array_equal(img.pixels, arr)
    assert img.meta.bits_stored == 8


@pytest.mark.parametrize("mode", ["RGB", "P"])
def test_colour_image_is_rejected(mode: str) -> None:
    arr = np.stack([_ramp(), _ramp()[::-1], _ramp()], axis=-1)
    data = _pil_bytes(Image.fromarray(arr, "RGB").convert(mode), "PNG")
    with pytest.raises(
        UnsupportedImageError, match=r"colour\.png: colour image is not supported \(.*pixels carry colour"
    ):
        load_bytes(data, name="colour.png")


def test_one_bit_image_is_rejected() -> None:
    data = _pil_bytes(Image.fromarray(_ramp() > 100), "PNG")
    with pytest.raises(UnsupportedImageError, match=r"bw\.png: 1-bit"):
        load_bytes(data, name="bw.png")


def test_kind_forces_the_decoder() -> None:
    data = _pil_bytes(Image.fromarray(_ramp()), "PNG")
    assert load_bytes(data, kind="PNG").meta.format == "png"
    with pytest.raises(InvalidImageError, match=r"x: not a readable JPEG image"):
        load_bytes(data, name="x", kind="jpg")
    with pytest.raises(InvalidInputError, match=r"unknown image kind 'gif'"):
        load_bytes(data, kind="gif")


# --------------------------------------------------------------------------- raw arrays


@pytest.mark.parametrize(
    ("dtype", "bits"), [("uint8", 8), ("uint16", 16), ("int32", None), ("float64", None), ("float32", None)]
)
def test_from_array_dtypes(dtype: str, bits: int | None) -> None:
    arr = _ramp(hi=200).astype(dtype)
    img = from_array(arr, name="arr")
    _assert_output(img, 80, 96)
    np.testing.assert_array_equal(img.pixels, arr.astype(np.float32))
    assert (img.meta.format, img.meta.bits_stored, img.meta.source) == ("array", bits, "arr")


def test_from_array_equal_channels_and_strided_input() -> None:
    arr = np.repeat(_ramp()[..., None], 3, axis=-1)
    img = from_array(arr)
    np.testing.assert_array_equal(img.pixels, _ramp())
    strided = from_array(_ramp(160, 192)[::2, ::2])
    assert strided.pixels.flags.c_contiguous and strided.pixels.shape == (80, 96)


def test_from_array_float32_is_not_copied() -> None:
    arr = _ramp().astype(np.float32)
    assert np.shares_memory(from_array(arr).pixels, arr)


def test_from_array_unequal_channels_rejected() -> None:
    arr = np.stack([_ramp(), _ramp(), _ramp()[::-1]], axis=-1)
    with pytest.raises(
        UnsupportedImageError, match=r"<array>: colour image is not supported \(.*pixels carry colour"
    ):
        from_array(arr)


@pytest.mark.parametrize(
    ("array", "error", "match"),
    [
        (np.full((80, 80), np.nan), InvalidImageError, r"nan: image contains NaN or infinite values"),
        (np.where(_ramp() > 5, 1.0, np.inf), InvalidImageError, r"nan: image contains NaN or infinite"),
        (_ramp() * 1e300, InvalidImageError, r"nan: image contains NaN or infinite"),  # beyond float32
        (np.full((80, 80), 7, np.uint16), InvalidImageError, r"nan: image is constant \(all pixels = 7\)"),
        (_ramp() > 3, InvalidImageError, r"nan: pixel dtype bool is not supported"),
        (np.zeros((80, 80), complex), InvalidImageError, r"nan: pixel dtype complex128 is not supported"),
        (np.array([["a"] * 80] * 80), InvalidImageError, r"nan: pixel dtype <U1 is not supported"),
        (np.arange(10_000), UnsupportedImageError, r"nan: array of shape \(10000,\) is not a grey image"),
        (np.zeros((2, 80, 80)), UnsupportedImageError, r"nan: array of shape \(2, 80, 80\)"),
        (_ramp(10, 200), UnsupportedImageError, r"nan: image of 200x10 pixels is too small"),
    ],
)
def test_from_array_bad_inputs(array: np.ndarray, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        from_array(array, name="nan")


# --------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def real_png(data_dir: Path) -> bytes:
    """A real radiograph as PNG (the NIH WebP is lossless, so this is the original NIH PNG)."""
    with Image.open(sorted((data_dir / "nih" / "images").glob("*.webp"))[0]) as im:
        return _pil_bytes(im.convert("L"), "PNG")


def test_empty_bytes() -> None:
    with pytest.raises(InvalidImageError, match=r"empty\.png: empty input \(0 bytes\)"):
        load_bytes(b"", name="empty.png")


def test_random_bytes() -> None:
    data = RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(
        InvalidImageError, match=r"chest\.dcm: not a readable image \(no DICOM, PNG, JPEG, WebP"
    ):
        load_bytes(data, name="chest.dcm")


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("patient notes, not an image\n" * 10)
    with pytest.raises(InvalidImageError, match=r"notes\.png: not a readable image"):
        load_image(path)


def test_truncated_png(real_png: bytes) -> None:
    with pytest.raises(InvalidImageError, match=r"half\.png: truncated or corrupt PNG pixel data") as info:
        load_bytes(real_png[: len(real_png) // 2], name="half.png")
    assert isinstance(info.value.__cause__, OSError)


def test_truncated_jpeg(data_dir: Path) -> None:
    data = sorted((data_dir / "kermany" / "test" / "NORMAL").glob("*.jpeg"))[0].read_bytes()
    with pytest.raises(InvalidImageError, match=r"half\.jpeg: truncated or corrupt JPEG pixel data"):
        load_bytes(data[: len(data) // 2], name="half.jpeg")


def test_truncated_webp(data_dir: Path) -> None:
    data = sorted((data_dir / "nih" / "images").glob("*.webp"))[0].read_bytes()
    with pytest.raises(InvalidImageError, match=r"half\.webp: .*truncated or corrupt"):
        load_bytes(data[: len(data) // 2], name="half.webp")


def test_truncated_dicom(data_dir: Path) -> None:
    data = (data_dir / "dicom" / "cxr_pa_cr_philips_j2k.dcm").read_bytes()
    with pytest.warns(UserWarning, match="End of file"):  # pydicom's own warning; it drops the element
        with pytest.raises(InvalidImageError, match=r"half\.dcm: .*Pixel Data .*truncated or corrupt"):
            load_bytes(data[: len(data) // 2], name="half.dcm")


def test_truncated_uncompressed_dicom() -> None:
    data = dicom_bytes(_ramp(200, 200, hi=4000, dtype="uint16"))
    with pytest.raises(InvalidImageError, match=r"half\.dcm: .*truncated or corrupt"):
        load_bytes(data[: len(data) // 2], name="half.dcm")


def test_corrupt_compressed_dicom(data_dir: Path) -> None:
    ds = pydicom.dcmread(data_dir / "dicom" / "cxr_pa_monochrome2_jpeg.dcm")
    # Keep the encapsulation framing valid but destroy the JPEG stream inside it.
    ds.PixelData = encapsulate([b"\xff\xd8\xff" + b"\x00" * 1001])
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(
        InvalidImageError, match=r"bad\.dcm: cannot decode the JPEG Baseline \(Process 1\) pixel data"
    ):
        load_bytes(buf.getvalue(), name="bad.dcm")


def test_dicom_without_pixel_data() -> None:
    with pytest.raises(InvalidImageError, match=r"nopix\.dcm: \(7FE0,0010\) Pixel Data is missing"):
        load_bytes(dicom_bytes(None), name="nopix.dcm")


def test_multi_frame_dicom() -> None:
    frames = np.stack([_ramp(dtype="uint8"), _ramp(dtype="uint8")[::-1]])
    data = dicom_bytes(frames[0], NumberOfFrames=2, PixelData=frames.tobytes())
    with pytest.raises(
        UnsupportedImageError, match=r"cine\.dcm: multi-frame DICOM \(2 frames\) is not supported"
    ):
        load_bytes(data, name="cine.dcm")


def test_rgb_dicom() -> None:
    rgb = np.stack([_ramp()] * 3, axis=-1)
    data = dicom_bytes(rgb, photometric="RGB", samples=3)
    with pytest.raises(
        UnsupportedImageError,
        match=r"rgb\.dcm: \(0028,0004\) Photometric Interpretation .RGB. is not supported for chest radio",
    ):
        load_bytes(data, name="rgb.dcm")


def test_dicom_without_photometric_interpretation() -> None:
    with pytest.raises(InvalidImageError, match=r"\(0028,0004\) Photometric Interpretation is missing"):
        load_bytes(dicom_bytes(_ramp(), photometric=""))


def test_monochrome_dicom_with_three_samples() -> None:
    data = dicom_bytes(_ramp(), samples=3)
    with pytest.raises(UnsupportedImageError, match=r"\(0028,0002\) Samples per Pixel 3 is not supported"):
        load_bytes(data)


def test_unsupported_transfer_syntax() -> None:
    data = dicom_bytes(_ramp(), transfer_syntax=MPEG2MPML, PixelData=encapsulate([b"\0" * 64]))
    with pytest.raises(
        UnsupportedImageError,
        match=r"mpeg\.dcm: transfer syntax 'MPEG2 Main Profile / Main Level' is not supported",
    ):
        load_bytes(data, name="mpeg.dcm")


def test_dicom_without_preamble_is_not_sniffed() -> None:
    with pytest.raises(InvalidImageError, match=r"no_meta\.dcm: not a readable image"):
        load_bytes(Path(get_testdata_file("no_meta.dcm")).read_bytes(), name="no_meta.dcm")


def test_too_small_image() -> None:
    data = _pil_bytes(Image.fromarray(_ramp(32, 100)), "PNG")
    with pytest.raises(UnsupportedImageError, match=r"tiny\.png: image of 100x32 pixels is too small"):
        load_bytes(data, name="tiny.png")
    # Same limit for DICOM, and it is configurable.
    with pytest.raises(UnsupportedImageError, match=r"tiny\.dcm: image of 96x80 pixels is too small"):
        load_bytes(dicom_bytes(_ramp()), name="tiny.dcm", min_size=81)


def test_too_many_pixels_png_rejected_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _pil_bytes(Image.new("1", (9000, 9000)), "PNG")
    assert len(data) < 20_000  # a tiny file announcing 81 million pixels

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixel data decoded before the size check")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    with pytest.raises(ImageTooLargeError, match=r"big\.png: image of 9000x9000 pixels .* exceeds the limit"):
        load_bytes(data, name="big.png", max_pixels=1_000_000)


def test_too_many_pixels_dicom_rejected_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(self):
        raise AssertionError("pixel data decoded before the size check")

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(no_decoding))
    with pytest.raises(ImageTooLargeError, match=r"big\.dcm: image of 96x80 pixels \(7,680\) exceeds"):
        load_bytes(dicom_bytes(_ramp()), name="big.dcm", max_pixels=5000)


def test_pillow_decompression_bomb_becomes_image_too_large() -> None:
    data = _pil_bytes(Image.new("1", (20000, 20000)), "PNG")  # beyond Pillow's own hard limit
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png: .*(too large|exceeds)"):
        load_bytes(data, name="bomb.png", max_pixels=10**9)


def test_multi_page_tiff() -> None:
    pages = [Image.fromarray(_ramp()), Image.fromarray(_ramp()[::-1].copy())]
    data = _pil_bytes(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    with pytest.raises(UnsupportedImageError, match=r"pages\.tif: multi-frame TIFF \(2 frames or pages\)"):
        load_bytes(data, name="pages.tif")


def test_unsupported_pillow_mode() -> None:
    data = _pil_bytes(Image.fromarray(np.stack([_ramp()] * 3, axis=-1)).convert("CMYK"), "JPEG")
    with pytest.raises(UnsupportedImageError, match=r"cmyk\.jpg: JPEG image mode 'CMYK' is not supported"):
        load_bytes(data, name="cmyk.jpg")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.dcm"
    with pytest.raises(InvalidImageError, match=r"absent\.dcm: no such file"):
        load_image(path)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageError, match=r"is a directory, not an image file"):
        load_image(tmp_path)


def test_constant_image() -> None:
    data = _pil_bytes(Image.new("L", (100, 100), 42), "PNG")
    with pytest.raises(InvalidImageError, match=r"flat\.png: image is constant \(all pixels = 42\)"):
        load_bytes(data, name="flat.png")
    flat = dicom_bytes(np.full((70, 70), 9, np.uint16), RescaleSlope="2", RescaleIntercept="-1")
    with pytest.raises(InvalidImageError, match=r"flat\.dcm: image is constant \(all pixels = 17\)"):
        load_bytes(flat, name="flat.dcm")


def test_bad_limits() -> None:
    with pytest.raises(InvalidInputError, match="must be >= 1"):
        from_array(_ramp(), max_pixels=0)


@pytest.mark.parametrize(
    "prefix",
    [
        b"\0" * 128 + b"DICM",
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff\xe0",
        b"RIFF\x00\x10\x00\x00WEBPVP8 ",
        b"II*\0",
        b"MM\0*",
    ],
)
def test_garbage_after_a_valid_signature_raises_our_errors(prefix: bytes) -> None:
    # Whatever the decoders raise internally, callers only ever see our error classes.
    for seed in range(5):
        garbage = np.random.default_rng(seed).integers(0, 256, 600, dtype=np.uint8).tobytes()
        with pytest.raises(InvalidInputError, match=r"^junk: "):
            load_bytes(prefix + garbage, name="junk")


def test_errors_are_value_errors_with_codes() -> None:
    with pytest.raises(ValueError) as info:
        load_bytes(b"", name="e")
    assert info.value.code == "invalid_argument"
    with pytest.raises(ImageTooLargeError) as info:
        from_array(_ramp(), max_pixels=100)
    assert info.value.code == "resource_exhausted"


# --------------------------------------------------------------------------- folders


def test_iter_image_files(tmp_path: Path) -> None:
    png = _pil_bytes(Image.fromarray(_ramp()), "PNG")
    dicom = dicom_bytes(_ramp())
    files = {
        "b/scan.PNG": png,
        "a.jpg": b"x",  # listed by suffix; loading will report it
        "b/c/series.DCM": dicom,
        "b/c/IM0001": dicom,  # extensionless DICOM
        "b/c/1.2.840.10008.3": dicom,  # UID-named DICOM
        "b/c/README": b"not dicom",
        "b/c/1.2.840.10008.4": b"not dicom either",
        "notes.txt": b"text",
        "DICOMDIR": dicom,
        ".hidden.png": png,
        ".cache/x.png": png,
        "z.Tiff": b"x",
    }
    for rel, content in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(content)
    found = iter_image_files(tmp_path)
    assert found == sorted(found)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.jpg",
        "b/c/1.2.840.10008.3",
        "b/c/IM0001",
        "b/c/series.DCM",
        "b/scan.PNG",
        "z.Tiff",
    ]
    assert load_image(found[2]).meta.format == "dicom"


def test_iter_image_files_on_real_folder(data_dir: Path) -> None:
    found = iter_image_files(data_dir / "dicom")
    assert [p.name for p in found] == [
        "cxr_pa_cr_philips_j2k.dcm",
        "cxr_pa_monochrome1_jpeg.dcm",
        "cxr_pa_monochrome2_jpeg.dcm",
    ]


def test_iter_image_files_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"absent: not a directory"):
        iter_image_files(tmp_path / "absent")


# --------------------------------------------------------------------------- read_dicom_header


def test_read_dicom_header_checks_without_decoding(data_dir: Path) -> None:
    meta = read_dicom_header((data_dir / "dicom" / "cxr_pa_cr_philips_j2k.dcm").read_bytes(), name="cr")
    assert (meta.rows, meta.columns, meta.photometric_interpretation) == (1955, 1841, "MONOCHROME1")
    pixels = _ramp(200, 300, hi=4095, dtype="uint16")
    assert read_dicom_header(dicom_bytes(pixels, bits_stored=12)).columns == 300


def test_read_dicom_header_reasons() -> None:
    pixels = _ramp(200, 300, hi=4095, dtype="uint16")
    with pytest.raises(MissingPixelDataError, match=r"x: \(7FE0,0010\) Pixel Data is missing$"):
        read_dicom_header(dicom_bytes(None, Rows=200, Columns=300), name="x")
    full = dicom_bytes(pixels)
    short = dicom_bytes(pixels, PixelData=pixels.tobytes()[:1000])
    with pytest.raises(
        InvalidImageError, match=r"Pixel Data truncated: 1000 bytes where 200x300 pixels at 16 bits"
    ):
        read_dicom_header(short, name="x")
    with pytest.raises(InvalidImageError, match="truncated") as cut:
        read_dicom_header(full[: len(full) - 5000], name="x")
    assert not isinstance(
        cut.value, MissingPixelDataError
    )  # cut inside Pixel Data: truncated, not pixel-less
    with pytest.raises(UnsupportedImageError, match="Photometric Interpretation 'RGB'"):
        read_dicom_header(dicom_bytes(np.zeros((80, 80, 3), np.uint8), photometric="RGB", samples=3))
    with pytest.raises(ImageTooLargeError):
        read_dicom_header(full, max_pixels=1000)
    with pytest.raises(InvalidImageError, match="not a readable DICOM file"):
        read_dicom_header(b"DICM but not really" * 20)
