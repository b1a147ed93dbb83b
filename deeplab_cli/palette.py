"""PASCAL VOC class names and colour map (the palette of VOC's SegmentationClass PNGs)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import DeeplabError

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOID = 255


@lru_cache(maxsize=1)
def voc_colormap() -> np.ndarray:
    """(256, 3) uint8 RGB: class i's colour from the bits of i, most significant first (VOC devkit)."""
    cmap = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    cmap.flags.writeable = False
    return cmap


def palette_bytes() -> bytes:
    """The VOC colour map flattened for PIL's putpalette (768 bytes)."""
    return voc_colormap().tobytes()


def colorize(labels: np.ndarray) -> np.ndarray:
    """labels: (H, W) integer class indices → (H, W, 3) uint8 RGB in VOC colours."""
    return voc_colormap()[np.asarray(labels).astype(np.uint8)]


def load_class_names(path: str | os.PathLike | None, num_classes: int | None = None) -> list[str]:
    """Class names, one per line in a text file (default: the 21 VOC classes); checked against num_classes."""
    if path is None:
        names = list(VOC_CLASSES)
        if num_classes is not None and num_classes != len(names):
            names = [f"class_{i}" for i in range(num_classes)]
        return names
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DeeplabError(f"{path}: cannot read class names ({exc})") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DeeplabError(f"{path}: no class names in file")
    if num_classes is not None and len(names) != num_classes:
        raise DeeplabError(f"{path}: {len(names)} class names but the model has {num_classes} classes")
    return names


def draw_legend(image: np.ndarray, entries: Sequence[tuple[int, str]]) -> np.ndarray:
    """Draw (class index, name) entries as colour swatches with names on a dark box, top-left: (H, W, 3) uint8.

    Sizes follow the image's shorter side, so the legend reads the same on a VOC photo and a 48 MP one.
    """
    if not entries:
        return image
    from PIL import Image, ImageDraw, ImageFont

    height, width = image.shape[:2]
    size = max(9, min(height, width) // 32)  # font size in pixels
    try:
        font = ImageFont.load_default(size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    pad, line = max(2, size // 3), size + max(2, size // 3)
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    text_w = max(draw.textlength(name, font=font) for _, name in entries)
    box_w = min(width, int(pad * 3 + size + text_w))
    box_h = min(height, pad * 2 + line * len(entries))
    region = image[:box_h, :box_w].astype(np.float32) * 0.35  # darken what lies behind the legend
    canvas.paste(Image.fromarray(region.astype(np.uint8)), (0, 0))
    cmap = voc_colormap()
    for i, (index, name) in enumerate(entries):
        y = pad + i * line
        draw.rectangle((pad, y, pad + size, y + size), fill=tuple(int(v) for v in cmap[index]), outline=(255, 255, 255))
        draw.text((pad * 2 + size, y), name, fill=(255, 255, 255), font=font)
    return np.asarray(canvas).copy()
