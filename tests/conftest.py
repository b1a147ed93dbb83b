"""Shared fixtures: random-weight model files, small real photos, an isolated cache (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deeplab_cli.testing import random_state_dict
from deeplab_cli.weightfiles.formats import save_weights


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach the network: a command without weights fails instead of downloading the default
    model (the first-run tests lift this and serve the model from 127.0.0.1)."""
    monkeypatch.setenv("DEEPLAB_OFFLINE", "1")
    monkeypatch.delenv("DEEPLAB_MODEL_URL", raising=False)


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
