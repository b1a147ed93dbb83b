"""The known models: the repository's `weights/manifest.json` (see `weights/README.md`).

setup.cfg installs the `weights/` folder as the data package `deeplab_cli.weights`, so an installed copy
reads it from there; a source checkout (an editable install, or PYTHONPATH pointing at a worktree) reads
its own `weights/manifest.json`, never another checkout's.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

MANIFEST = "manifest.json"
DATA_PACKAGE = "deeplab_cli.weights"  # setup.cfg: package_dir deeplab_cli.weights = weights


def manifest_text() -> str:
    """The manifest's JSON text: the checkout's weights/manifest.json, else the installed data package's copy."""
    root = Path(__file__).resolve().parents[2]
    checkout = root / "weights" / MANIFEST
    if (root / "setup.cfg").is_file() and checkout.is_file():
        return checkout.read_text(encoding="utf-8")
    return files(DATA_PACKAGE).joinpath(MANIFEST).read_text(encoding="utf-8")


def load_manifest() -> dict[str, dict]:
    """The known models: name → {url, mirrors, sha256, size, format, arch, classes, description, ...}."""
    return json.loads(manifest_text())["models"]
