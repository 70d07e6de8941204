"""Image grids with labelled rows: class names per row for sample grids; "original", "first 1 group", ... for
reconstruction grids. One implementation for both training scripts and the demo.

    save_grid(images_uint8_nhwc, "samples.png", ncol=8, row_labels=["T-shirt/top", "Trouser"], scale=2)
"""
from __future__ import annotations

import math
import os

import numpy as np

PAD = 2


def to_uint8(images, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """(N, 3, H, W) float tensor/array in `value_range` (or uint8 NCHW/NHWC) -> uint8 (N, H, W, 3)."""
    a = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if a.dtype == np.uint8:
        return a if a.shape[-1] in (1, 3) else a.transpose(0, 2, 3, 1)
    lo, hi = value_range
    a = np.clip((a - lo) / (hi - lo), 0.0, 1.0)
    return np.round(a * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def reconstruction_labels(groups: int) -> list[str]:
    """Row labels of a reconstruction grid: the originals, then decodes from the first 1..G groups."""
    return ["original"] + [f"first {g} group{'s' if g > 1 else ''}" if g < groups else f"all {groups} groups"
                           for g in range(1, groups + 1)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def make_grid(images: np.ndarray, ncol: int, pad: int = PAD, scale: int = 1, row_labels: list[str] | None = None):
    """uint8 (N, H, W, 3) -> PIL image: `ncol` columns, `pad` px white padding, enlarged `scale` x (nearest), and,
    with `row_labels`, a left margin naming each row (one label per row; missing rows are left blank)."""
    from PIL import Image, ImageDraw

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"make_grid: expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    ncol = max(1, min(ncol, n))
    nrow = math.ceil(n / ncol)
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, a in enumerate(images):
        r, c = divmod(i, ncol)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = a
    img = Image.fromarray(canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), resample=Image.NEAREST)
    if not row_labels:
        return img
    if len(row_labels) > nrow:
        raise ValueError(f"make_grid: {len(row_labels)} row labels for {nrow} rows")
    cell = (h + pad) * scale
    font = _font(max(8, min(14, cell // 2)))
    draw = ImageDraw.Draw(img)
    margin = max(int(draw.textlength(str(t), font=font)) for t in row_labels) + 3 * pad * scale
    out = Image.new("RGB", (img.width + margin, img.height), (255, 255, 255))
    out.paste(img, (margin, 0))
    draw = ImageDraw.Draw(out)
    for r, text in enumerate(row_labels):
        draw.text((pad * scale, pad * scale + r * cell + cell // 2), str(text), fill=(0, 0, 0), font=font, anchor="lm")
    return out


def save_grid(images: np.ndarray, path: str | os.PathLike, ncol: int, pad: int = PAD, scale: int = 1,
              row_labels: list[str] | None = None) -> tuple[int, int]:
    """make_grid(...) written as a PNG (atomically); returns (width, height)."""
    img = make_grid(images, ncol, pad, scale, row_labels)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.getpid()}-{os.path.basename(path)}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return img.size
