"""What a weights file holds (`deeplab weights info`), whatever its format: .safetensors, a PyTorch state dict
or a Caffe .caffemodel."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError
from ..model import ARCHS
from .cache import sha256_file
from .caffe import load_caffemodel
from .formats import load_weights


def describe_weights(path: str | os.PathLike) -> dict:
    """Format, arch, description, classes, parameters, size (bytes), sha256 and metadata of a weights file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: weights file not found")
    if path.suffix.lower() == ".caffemodel":
        weights, fmt = load_caffemodel(path), "caffemodel"
    else:
        weights = load_weights(path)
        with open(path, "rb") as f:
            head = f.read(2)
        fmt = "pytorch" if head.startswith((b"PK", b"\x80")) else "safetensors"
    return {
        "path": str(path),
        "format": fmt,
        "arch": weights.arch,
        "description": ARCHS[weights.arch].description,
        "classes": weights.num_classes,
        "parameters": sum(t.numel() for t in weights.state_dict.values()),
        "size": path.stat().st_size,
        "sha256": weights.metadata["source_sha256"] if fmt == "caffemodel" else sha256_file(path),
        "metadata": dict(sorted(weights.metadata.items())),
    }
