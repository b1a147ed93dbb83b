"""deeplab-cli: DeepLab v1 semantic segmentation (atrous VGG16 + fully connected CRF) from a shell or from Python.

Heavy modules (torch) load on first use, so `deeplab --version` and `--help` stay instant.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DeepLab": "model",
    "ARCHS": "archs",
    "Segmenter": "pipeline",
    "Segmentation": "pipeline",
    "select_device": "pipeline",
    "CRFParams": "crf",
    "CRF_PRESETS": ("crf", "PRESETS"),
    "dense_crf": "crf",
    "load_weights": "weightfiles.formats",
    "save_weights": "weightfiles.formats",
    "convert_caffemodel": "weightfiles.caffe",
    "fetch_weights": ("weightfiles.fetch", "fetch"),
    "read_image": "io",
    "write_mask": "io",
    "colorize": "palette",
    "VOC_CLASSES": "palette",
    "DeeplabError": "errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'deeplab_cli' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    return getattr(importlib.import_module(f".{module}", __name__), attr)
