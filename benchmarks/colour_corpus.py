"""A corpus of colour-coded images built by code: grey in substance, or genuinely coloured.

Used by ``tests/test_colour.py`` (on a synthetic chest phantom) and by
``benchmarks/colour_tolerance.py`` (also on real NIH radiographs) to check and measure the
colour rule of :mod:`monitor.colour`. Every case is encoded to bytes the way it would arrive
(JPEG or PNG), so compression noise is real.

Genuinely coloured references that are not synthetic come with matplotlib (a pinned
dependency): ``grace_hopper.jpg`` (a colour photograph), ``Minduka_Present_Blue_Pack.png``
(a colour product photograph).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["CASES", "Case", "chest_phantom", "encode", "grey_rgb_noise", "sample_photo"]

_SAMPLE_DATA = Path(matplotlib.get_data_path()) / "sample_data"


@dataclass(frozen=True)
class Case:
    """One corpus entry: ``build(grey, rng) -> bytes``; ``grey_in_substance`` is the expected verdict."""

    name: str
    grey_in_substance: bool
    build: Callable[[np.ndarray, np.random.Generator], bytes]
    note: str = ""


def chest_phantom(size: int = 512, seed: int = 0) -> np.ndarray:
    """A deterministic chest-like grey image (uint8): mediastinum, two lungs, ribs, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.55 + 0.25 * yy  # denser towards the abdomen
    for cx in (0.3, 0.7):  # lungs: darker ellipses
        lung = ((xx - cx) / 0.17) ** 2 + ((yy - 0.45) / 0.3) ** 2 < 1
        img = np.where(lung, img - 0.3, img)
    for k in range(9):  # ribs: bright bands across the lungs
        y0 = 0.2 + 0.07 * k
        img += 0.08 * np.exp(-(((yy - y0 - 0.1 * (xx - 0.5) ** 2) / 0.01) ** 2))
    img += 0.25 * np.exp(-(((xx - 0.5) / 0.07) ** 2))  # mediastinum
    img += rng.normal(0, 0.02, img.shape)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str = "JPEG", quality: int = 85, subsampling: int = 2) -> bytes:
    """Encode an (rows, columns, 3) uint8 array; ``subsampling`` 0 = 4:4:4, 2 = 4:2:0."""
    buf = io.BytesIO()
    im = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    if fmt == "JPEG":
        im.save(buf, "JPEG", quality=quality, subsampling=subsampling)
    else:
        im.save(buf, fmt)
    return buf.getvalue()


def grey_rgb_noise(grey: np.ndarray, rng: np.random.Generator, amplitude: float = 1.5) -> np.ndarray:
    """Grey as RGB with independent per-channel dither, as a colour-managed export leaves it."""
    rgb = grey[..., None].astype(np.float32) + rng.uniform(-amplitude, amplitude, (*grey.shape, 3))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _tinted(grey: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    return np.clip(grey[..., None].astype(np.float32) * np.array(gains), 0, 255).astype(np.uint8)


def _sepia(grey: np.ndarray) -> np.ndarray:
    # The classic sepia matrix applied to grey (R = G = B = v): row sums 1.351, 1.203, 0.937.
    return _tinted(grey, (1.351, 1.203, 0.937))


def _red_arrow(grey: np.ndarray) -> np.ndarray:
    im = Image.fromarray(grey).convert("RGB")
    d = ImageDraw.Draw(im)
    s = grey.shape[0]
    tip = (int(0.55 * s), int(0.5 * s))
    d.line([(int(0.8 * s), int(0.75 * s)), tip], fill=(230, 20, 20), width=max(3, s // 100))
    d.polygon(
        [tip, (tip[0] + s // 12, tip[1] + s // 40), (tip[0] + s // 40, tip[1] + s // 12)], fill=(230, 20, 20)
    )
    return np.asarray(im)


def _text_stamp(grey: np.ndarray) -> np.ndarray:
    im = Image.fromarray(grey).convert("RGB")
    d = ImageDraw.Draw(im)
    s = grey.shape[0]
    font = ImageFont.load_default(size=max(12, s // 18))
    d.text((s // 30, s // 30), "R  PORTABLE", fill=(255, 220, 0), font=font)
    d.text((int(0.7 * s), int(0.92 * s)), "2024-03-01", fill=(0, 255, 120), font=font)
    return np.asarray(im)


def _screenshot(grey: np.ndarray) -> np.ndarray:
    """The image inside a viewer window: grey frame and a coloured title bar (3.75% of the height)."""
    s = grey.shape[0]
    h, w = int(s * 1.25), int(s * 1.15)
    canvas = np.full((h, w, 3), 45, dtype=np.uint8)
    bar = h * 3 // 80
    canvas[:bar] = (30, 90, 200)
    top, left = bar + (h - bar - s) // 2, (w - s) // 2
    canvas[top : top + s, left : left + s] = grey[..., None]
    return canvas


def _jet(v: np.ndarray) -> np.ndarray:
    """The jet colormap of values in [0, 1], as heat maps are drawn."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.stack([r, g, b], axis=-1)


def _heat_overlay(grey: np.ndarray) -> np.ndarray:
    """A saliency heat map blended over the image (alpha 0.4 where the heat is above 0.1)."""
    s = grey.shape[0]
    yy, xx = np.mgrid[0:s, 0:s] / s
    heat = np.exp(-(((xx - 0.35) / 0.18) ** 2 + ((yy - 0.45) / 0.22) ** 2))
    heat += 0.7 * np.exp(-(((xx - 0.7) / 0.1) ** 2 + ((yy - 0.6) / 0.12) ** 2))
    heat /= heat.max()
    alpha = np.where(heat > 0.1, 0.4, 0.0)[..., None]
    base = grey[..., None].astype(np.float32) / 255
    out = (1 - alpha) * base + alpha * _jet(heat)
    return np.clip(out * 255, 0, 255).astype(np.uint8)


def _false_colour(grey: np.ndarray) -> np.ndarray:
    """The whole image through a perceptual colormap (viridis): colour as a function of grey."""
    cmap = matplotlib.colormaps["viridis"]
    return (cmap(grey / 255.0)[..., :3] * 255).astype(np.uint8)


def _coloured_figure(grey: np.ndarray) -> np.ndarray:
    """A paper figure: the image with a coloured lung mask, beside a coloured bar chart."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=80)
    canvas = FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.imshow(grey, cmap="gray")
    s = grey.shape[0]
    yy, xx = np.mgrid[0:s, 0:s] / s
    mask = np.zeros((s, s, 4))
    for cx, colour in ((0.3, (1, 0, 0, 0.35)), (0.7, (0, 0.6, 1, 0.35))):
        mask[((xx - cx) / 0.17) ** 2 + ((yy - 0.45) / 0.3) ** 2 < 1] = colour
    left.imshow(mask)
    left.set_axis_off()
    right.bar(range(4), [0.91, 0.84, 0.77, 0.88], color=["tab:red", "tab:blue", "tab:green", "tab:orange"])
    right.set_title("AUROC by site")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def sample_photo(name: str) -> np.ndarray:
    """A colour image bundled with matplotlib, as (rows, columns, 3) uint8."""
    with Image.open(_SAMPLE_DATA / name) as im:
        return np.asarray(im.convert("RGB"))


def _bytes_of(name: str) -> bytes:
    return (_SAMPLE_DATA / name).read_bytes()


CASES: tuple[Case, ...] = (
    Case(
        "grey RGB PNG (identical channels)", True, lambda g, r: encode(np.repeat(g[..., None], 3, 2), "PNG")
    ),
    *(
        Case(
            f"grey RGB JPEG q{q} {'4:4:4' if sub == 0 else '4:2:0'}",
            True,
            lambda g, r, q=q, sub=sub: encode(grey_rgb_noise(g, r), quality=q, subsampling=sub),
        )
        for q in (30, 50, 75, 90, 95)
        for sub in (2, 0)
    ),  # fmt: skip
    Case(
        "grey with strong dither (+-4 levels) JPEG q75",
        True,
        lambda g, r: encode(grey_rgb_noise(g, r, amplitude=4.0), quality=75),
    ),  # fmt: skip
    Case("sepia tint JPEG q85", True, lambda g, r: encode(_sepia(g))),
    Case("blue tint JPEG q85", True, lambda g, r: encode(_tinted(g, (0.85, 0.93, 1.0)))),
    Case("red arrow JPEG q85", True, lambda g, r: encode(_red_arrow(g))),
    Case("coloured text stamp JPEG q85", True, lambda g, r: encode(_text_stamp(g))),
    Case("screenshot with a coloured title bar PNG", True, lambda g, r: encode(_screenshot(g), "PNG")),
    Case("sepia tint + red arrow JPEG q75", True, lambda g, r: encode(_red_arrow_on(_sepia(g)), quality=75)),
    Case("heat-map overlay JPEG q90", False, lambda g, r: encode(_heat_overlay(g), quality=90)),
    Case("false colour (viridis) PNG", False, lambda g, r: encode(_false_colour(g), "PNG")),
    Case("colour photograph (grace_hopper.jpg)", False, lambda g, r: _bytes_of("grace_hopper.jpg")),
    Case(
        "colour photograph (Minduka_Present_Blue_Pack.png)",
        False,
        lambda g, r: _bytes_of("Minduka_Present_Blue_Pack.png"),
    ),  # fmt: skip
    Case(
        "coloured figure (segmentation panel + bar chart) PNG",
        False,
        lambda g, r: encode(_coloured_figure(g), "PNG"),
    ),  # fmt: skip
)


def _red_arrow_on(rgb: np.ndarray) -> np.ndarray:
    im = Image.fromarray(rgb)
    d = ImageDraw.Draw(im)
    s = rgb.shape[0]
    d.line(
        [(int(0.8 * s), int(0.75 * s)), (int(0.55 * s), int(0.5 * s))],
        fill=(230, 20, 20),
        width=max(3, s // 100),
    )
    return np.asarray(im)


def _misregistered(grey: np.ndarray) -> np.ndarray:
    """Red and blue planes shifted by one pixel either way: colour fringes at every edge, as a
    phone capture or a colour resampling leaves them."""
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgb[:, 1:, 0] = grey[:, :-1]
    rgb[:, :-1, 2] = grey[:, 1:]
    return rgb


def _sparse_channel_noise(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What the issue measured on real near-grey exports: channels differ by 2-16 levels on a
    few pixels (mean difference about 0.1)."""
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.int16)
    hit = rng.random(grey.shape) < 0.01
    rgb[hit, rng.integers(0, 3, hit.sum())] += rng.integers(-16, 17, hit.sum()).astype(np.int16)
    return np.clip(rgb, 0, 255).astype(np.uint8)


CASES = (
    *CASES[:12],
    Case(
        "sparse channel differences up to 16 levels PNG",
        True,
        lambda g, r: encode(_sparse_channel_noise(g, r), "PNG"),
    ),  # fmt: skip
    Case("channels misregistered by 1 px JPEG q90", True, lambda g, r: encode(_misregistered(g), quality=90)),
    *CASES[12:],
)
