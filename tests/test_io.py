"""Decoding the images users have, the VOC palette, and atomic palette-PNG masks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deeplab_cli.errors import DeeplabError, UsageError
from deeplab_cli.io import atomic_path, decode_image, encode_mask_png, read_image, read_label_image, write_mask
from deeplab_cli.palette import VOC_CLASSES, colorize, load_class_names, voc_colormap


def test_voc_colormap_known_entries() -> None:
    cmap = voc_colormap()
    assert cmap.shape == (256, 3)
    assert tuple(cmap[0]) == (0, 0, 0)
    assert tuple(cmap[1]) == (128, 0, 0)
    assert tuple(cmap[2]) == (0, 128, 0)
    assert tuple(cmap[3]) == (128, 128, 0)
    assert tuple(cmap[15]) == (192, 128, 128)  # person
    assert tuple(cmap[255]) == (224, 224, 192)  # void
    assert len(VOC_CLASSES) == 21


def test_mask_png_round_trips_labels(tmp_path: Path) -> None:
    labels = np.random.default_rng(0).integers(0, 21, size=(13, 17)).astype(np.uint8)
    labels[0, 0] = 255
    write_mask(tmp_path / "m.png", labels)
    im = Image.open(tmp_path / "m.png")
    assert im.mode == "P" and im.size == (17, 13)
    assert np.array_equal(np.array(im), labels)
    assert np.array_equal(np.array(im.convert("RGB")), colorize(labels))
    assert np.array_equal(read_label_image(tmp_path / "m.png"), labels)
    assert not [p for p in tmp_path.iterdir() if p.name != "m.png"]  # no temporary left behind


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP"])
def test_decodes_common_formats(fmt: str) -> None:
    rgb = np.zeros((10, 14, 3), np.uint8)
    rgb[:, 7:] = (200, 30, 60)
    out = decode_image(_encode(Image.fromarray(rgb), fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert out.shape == (10, 14, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).mean() < 6  # JPEG: lossy at the sharp edge


def test_grayscale_rgba_and_16_bit() -> None:
    gray = decode_image(_encode(Image.new("L", (5, 4), 77), "PNG"))
    assert gray.shape == (4, 5, 3) and (gray == 77).all()
    rgba = decode_image(_encode(Image.new("RGBA", (5, 4), (1, 2, 3, 0)), "PNG"))
    assert rgba.shape == (4, 5, 3) and tuple(rgba[0, 0]) == (1, 2, 3)
    sixteen = Image.fromarray(np.full((4, 5), 65535, np.uint16))
    assert (decode_image(_encode(sixteen, "PNG")) == 255).all()
    assert (decode_image(_encode(Image.fromarray(np.full((4, 5), 257 * 100, np.uint16)), "TIFF")) == 100).all()


def test_exif_rotation_is_applied() -> None:
    im = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out = decode_image(_encode(im, "JPEG", exif=exif.tobytes()))
    assert out.shape == (20, 10, 3)  # displayed as portrait


def test_bad_files_give_one_clear_error(tmp_path: Path) -> None:
    good = _encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")
    cases = {"empty.png": b"", "text.jpg": b"hello world\n", "trunc.jpg": good[: len(good) // 2]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DeeplabError, match=name):
            read_image(tmp_path / name)
    with pytest.raises(UsageError, match="no such file"):
        read_image(tmp_path / "missing.jpg")


def test_non_ascii_path(tmp_path: Path) -> None:
    path = tmp_path / "фото café.png"
    Image.new("RGB", (3, 2)).save(path)
    assert read_image(path).shape == (2, 3, 3)


def test_mask_png_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        encode_mask_png(np.full((2, 2), 300))


def test_class_names_file(tmp_path: Path) -> None:
    (tmp_path / "names.txt").write_text("sky\nroad\n\n")
    assert load_class_names(tmp_path / "names.txt", 2) == ["sky", "road"]
    with pytest.raises(DeeplabError, match="3 classes"):
        load_class_names(tmp_path / "names.txt", 3)
