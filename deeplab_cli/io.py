"""All file I/O: decoding the images users have, writing masks, overlays and probabilities atomically.

Every output is written to a temporary name in its destination folder and renamed when complete,
so an interrupted run never leaves a half-written file behind. `-` means stdin / stdout.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DeeplabError, UsageError
from .palette import colorize, draw_legend, palette_bytes
from .resolution import working_size

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"})
STDIO = "-"

# Photos from cameras exceed PIL's default decompression-bomb limit (89 MP) only rarely; keep the
# check but allow 300 MP, beyond which the network's memory would not suffice anyway.
Image.MAX_IMAGE_PIXELS = 300_000_000
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension we decode."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def index_by_stem(folder: str | os.PathLike, suffixes: frozenset[str]) -> dict[str, list[Path]]:
    """Files under folder (recursively, hidden ones skipped) with one of the suffixes, keyed by relative path
    without suffix ('a/b'), so that two folders can be matched: photos/a/x.jpg ↔ labels/a/x.png."""
    root = Path(folder)
    index: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in suffixes and not path.name.startswith(".") and path.is_file():
            index.setdefault(path.relative_to(root).with_suffix("").as_posix(), []).append(path)
    return index


@dataclass
class FolderMatch:
    """Two folders' files paired by relative path without suffix; the files left alone; keys with several files."""

    pairs: list[tuple[str, Path, Path]] = field(default_factory=list)  # (key, first folder's file, second's)
    only_first: list[tuple[str, Path]] = field(default_factory=list)
    only_second: list[tuple[str, Path]] = field(default_factory=list)
    ambiguous: list[tuple[str, list[Path]]] = field(default_factory=list)  # one key, several files (both folders')


def match_folders(
    first: str | os.PathLike, second: str | os.PathLike, first_suffixes: frozenset[str], second_suffixes: frozenset[str]
) -> FolderMatch:
    """Pair the files of two folders (searched recursively) by relative path without suffix, keys in sorted order:
    photos/a/x.jpg ↔ labels/a/x.png; a key held by several files of one folder is ambiguous."""
    a, b = index_by_stem(first, first_suffixes), index_by_stem(second, second_suffixes)
    match = FolderMatch()
    for key in sorted(a.keys() | b.keys()):
        in_a, in_b = a.get(key, []), b.get(key, [])
        if len(in_a) > 1 or len(in_b) > 1:
            match.ambiguous.append((key, in_a + in_b))
        elif not in_b:
            match.only_first.append((key, in_a[0]))
        elif not in_a:
            match.only_second.append((key, in_b[0]))
        else:
            match.pairs.append((key, in_a[0], in_b[0]))
    return match


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    keep_suffix: the temporary name ends with path's extension too (`.x.mkv.abc12345.part.mkv`), for writers
    that choose the format by it (FFmpeg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".part" + (path.suffix if keep_suffix else "")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths (neither '-') name the same file."""
    try:
        return str(a) != STDIO and str(b) != STDIO and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to a file atomically, or to stdout when path is '-'."""
    if str(path) == STDIO:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_bytes(source: str | os.PathLike) -> bytes:
    """Read a whole file, or stdin when source is '-'."""
    if str(source) == STDIO:
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise DeeplabError(f"{source}: is a directory, not an image") from None
    except PermissionError:
        raise DeeplabError(f"{source}: permission denied") from None


def decode_image(data: bytes, name: str = "<image>") -> np.ndarray:
    """Decode image bytes to (H, W, 3) uint8 RGB as displayed: EXIF rotation applied, alpha dropped, 16-bit scaled."""
    return decode_photo(data, name)[0]


def decode_photo(data: bytes, name: str = "<image>", max_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode image bytes for a working resolution: (image (h, w, 3) uint8 RGB, full size (H, W)), both as displayed.

    With max_side, a JPEG much larger than working_size(H, W, max_side) is decoded at a reduced DCT scale
    (1/2, 1/4 or 1/8, libjpeg's draft mode) that still covers it; the full size comes from the header.
    Other formats, and everything without max_side, decode at full size (h, w) = (H, W).
    """
    if not data:
        raise DeeplabError(f"{name}: empty file (0 bytes), not an image")
    try:
        with warnings.catch_warnings():  # PIL's warning for 1–2× its pixel limit: our own error below says it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            width, height = im.size
            if width * height > Image.MAX_IMAGE_PIXELS:
                raise DeeplabError(f"{name}: image too large ({width}×{height} = {width * height / 1e6:.0f} MP; "
                                   f"the limit is {Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP)")
            full = _displayed_size(im)
            if max_side is not None and im.format in ("JPEG", "MPO"):
                h, w = working_size(height, width, max_side)
                if (h, w) != (height, width):
                    im.draft(None, (w, h))
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb8(im), full
    except UnidentifiedImageError:
        image = _decode_with_opencv(data, name)
        return image, image.shape[:2]
    except Image.DecompressionBombError as exc:
        raise DeeplabError(f"{name}: image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DeeplabError(f"{name}: cannot decode image ({exc})") from None


def _to_rgb8(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        scale = 1.0 / 257.0 if im.mode != "F" or arr.max(initial=0) > 1.0 else 255.0
        gray = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.array(im, dtype=np.uint8)  # a writable copy (pydensecrf and torch want one)


def _decode_with_opencv(data: bytes, name: str) -> np.ndarray:
    # PIL does not read every TIFF (48-bit RGB, some compressions); OpenCV does.
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    if arr is None:
        raise DeeplabError(f"{name}: not an image (unrecognised format)")
    if arr.dtype == np.uint16:
        arr = np.rint(arr.astype(np.float32) / 257.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise DeeplabError(f"{name}: unsupported pixel type {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
    else:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(arr)


def photo_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(H, W) of an image file as displayed, from its header alone; None when it cannot be read as an image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return _displayed_size(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def _displayed_size(im: Image.Image) -> tuple[int, int]:
    """(H, W) of an opened image as displayed: EXIF orientations 5–8 turn it by 90°, swapping the sides."""
    width, height = im.size
    return (width, height) if im.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS else (height, width)


def read_image(source: str | os.PathLike) -> np.ndarray:
    """Read an image file (or '-' for stdin) as (H, W, 3) uint8 RGB."""
    return read_photo(source)[0]


def read_photo(source: str | os.PathLike, max_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Read an image file (or '-') for a working resolution: see decode_photo."""
    name = "<stdin>" if str(source) == STDIO else str(source)
    return decode_photo(read_bytes(source), name, max_side)


def encode_mask_png(labels: np.ndarray) -> bytes:
    """labels: (H, W) class indices → palette-mode PNG bytes (VOC colour map, values = indices)."""
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("labels must lie in 0..255 to be stored in a palette PNG")
    im = Image.fromarray(np.ascontiguousarray(labels.astype(np.uint8)))
    im.putpalette(palette_bytes())  # turns the "L" image into mode "P" keeping the values
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_mask(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write (H, W) class indices as a VOC palette PNG, atomically (or to stdout for '-')."""
    write_bytes(path, encode_mask_png(labels))


def overlay_image(image: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None,
                  alpha: float = 0.5, tile_pixels: int = 1 << 22) -> np.ndarray:
    """Blend the colour mask into the image where a class other than background was found: (H, W, 3) uint8.

    Computed in row tiles, so a 48 MP overlay needs no float copy of the whole image. With class_names,
    a legend of the classes present but background (colour swatch + name) is drawn in the top-left corner.
    """
    out = np.empty_like(image)
    rows = max(1, tile_pixels // max(image.shape[1], 1))
    for top in range(0, image.shape[0], rows):
        part, lab = image[top:top + rows].astype(np.float32), labels[top:top + rows]
        blended = (1.0 - alpha) * part + alpha * colorize(lab).astype(np.float32)
        part = np.where((lab != 0)[..., None], blended, part)
        out[top:top + rows] = np.clip(np.rint(part), 0, 255).astype(np.uint8)
    if class_names is not None:
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=1))[1:] if labels.any() else []
        out = draw_legend(out, [(int(c), class_names[c] if c < len(class_names) else f"class_{c}") for c in present])
    return out


def encode_image(image: np.ndarray, name: str | os.PathLike = ".png") -> bytes:
    """(H, W, 3) uint8 RGB → encoded bytes in the format the name's extension says (PNG when unknown)."""
    fmt = Image.registered_extensions().get(Path(name).suffix.lower(), "PNG")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image; the format follows the extension (PNG for '-')."""
    write_bytes(path, encode_image(image, ".png" if str(path) == STDIO else path))


def encode_probs(probs: np.ndarray) -> bytes:
    """Probabilities (C, H, W) → .npy bytes, float32."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(probs, dtype=np.float32))
    return buf.getvalue()


def write_probs(path: str | os.PathLike, probs: np.ndarray) -> None:
    """Save probabilities (C, H, W) float32 as .npy, atomically."""
    write_bytes(path, encode_probs(probs))


def read_probs(path: str | os.PathLike) -> np.ndarray:
    """Load a (C, H, W) .npy array safely (no pickles)."""
    try:
        arr = np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DeeplabError(f"{path}: not a .npy array ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise DeeplabError(f"{path}: expected one .npy array, found an archive")
    return arr


def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG (palette or grayscale; values = class indices, 255 = void) as (H, W) uint8."""
    data = read_bytes(path)
    if not data:
        raise DeeplabError(f"{path}: empty file (0 bytes), not a label image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("P", "L"):
                raise DeeplabError(f"{path}: label images must be palette or grayscale PNGs (found mode {im.mode})")
            return np.array(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DeeplabError(f"{path}: cannot decode label image ({exc})") from None
