"""Shared fixtures: random-weight model files, small real photos, a messy image tree, an isolated cache (no
downloads)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import resized

from deeplab_cli.testing import random_state_dict
from deeplab_cli.weightfiles.formats import save_weights


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach the network: a command without weights fails instead of downloading the default
    model (the first-run tests lift this and serve the model from 127.0.0.1)."""
    monkeypatch.setenv("DEEPLAB_OFFLINE", "1")
    monkeypatch.delenv("DEEPLAB_MODEL_URL", raising=False)


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deeplab-cache")


@pytest.fixture(autouse=True)
def _private_cache(_session_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read the user's cache (its weights, or the runtime `deeplab benchmark` recorded for --runtime
    auto); tests that need their own cache set $DEEPLAB_CACHE again."""
    monkeypatch.setenv("DEEPLAB_CACHE", str(_session_cache))


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LargeFOV .safetensors file with seeded random weights (21 VOC classes)."""
    path = tmp_path_factory.mktemp("weights") / "largefov_random.safetensors"
    save_weights(random_state_dict("largefov"), path, "largefov", {"source": "random (tests)"})
    return path


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photo (scikit-image's chelsea), downscaled to 75×113: (H, W, 3) uint8 RGB."""
    from skimage import data

    return np.array(Image.fromarray(data.chelsea()).resize((113, 75), Image.BILINEAR))


@pytest.fixture()
def photo_file(tmp_path: Path, photo: np.ndarray) -> Path:
    """The small photo written as a JPEG."""
    path = tmp_path / "photo.jpg"
    Image.fromarray(photo).save(path, quality=95)
    return path


@pytest.fixture()
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A test's own cache directory, and no $DEEPLAB_WEIGHTS."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DEEPLAB_CACHE", str(cache))
    monkeypatch.delenv("DEEPLAB_WEIGHTS", raising=False)
    return cache


@pytest.fixture()
def tree(tmp_path: Path, photo: np.ndarray) -> tuple[Path, dict[str, tuple[int, int]], dict[str, str]]:
    """`deeplab batch`'s messy tree: a folder of good images (mixed sizes, formats, modes; nested; non-ASCII) and bad ones.

    Returns the root, good relative paths → (width, height), bad relative paths → a word of their error.
    """
    root = tmp_path / "photos"
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "ünïcode café").mkdir()
    good: dict[str, tuple[int, int]] = {}

    def save(rel: str, image: Image.Image, **kw) -> None:
        image.save(root / rel, **kw)
        good[rel] = image.size

    save("cat.jpg", resized(photo, 90, 60), quality=90)
    save("cat.png", resized(photo, 64, 48))  # same stem as cat.jpg in one folder
    save("nested/wide.bmp", resized(photo, 88, 41))
    save("nested/deeper/tall.webp", resized(photo, 45, 77))
    save("nested/deeper/tiff.tif", resized(photo, 50, 50))
    save("ünïcode café/日本語 ñandú.jpg", resized(photo, 70, 55))
    save("gray.png", resized(photo, 57, 43).convert("L"))
    save("rgba.png", resized(photo, 61, 40).convert("RGBA"))
    sixteen = (np.asarray(resized(photo, 52, 46).convert("L"), dtype=np.uint16) * 257)
    save("nested/sixteen.png", Image.fromarray(sixteen))
    assert Image.open(root / "nested/sixteen.png").mode.startswith("I;16")

    buf = io.BytesIO()
    resized(photo, 80, 60).save(buf, "JPEG")
    (root / "nested/corrupt.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (root / "empty.png").write_bytes(b"")
    (root / "ünïcode café/text.jpg").write_text("this is not a JPEG\n")
    bad = {"nested/corrupt.jpg": "cannot decode", "empty.png": "empty", "ünïcode café/text.jpg": "not an image"}
    (root / "notes.txt").write_text("ignored: not an image by extension")
    (root / ".hidden.jpg").write_bytes(buf.getvalue())  # hidden: ignored
    return root, good, bad
