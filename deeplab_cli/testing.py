"""Fixtures that the tests and the benchmarks share (and `deeplab benchmark` without a weights file): seeded
random weights, realistic synthetic probabilities, and .caffemodel files written from a state dict.

Nothing here is used by the pipeline itself.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .archs import ArchConfig
from .io import write_bytes
from .model import DeepLab
from .weightfiles.caffe import V1_CONVOLUTION, caffe_name, messages


def random_model(arch: str | ArchConfig = "largefov", num_classes: int = 21, seed: int = 0) -> DeepLab:
    """A DeepLab with seeded He-normal weights and small biases (activations stay in range through all layers)."""
    gen = torch.Generator().manual_seed(seed)
    model = DeepLab(arch, num_classes)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * (2.0 / param[0].numel()) ** 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.eval()


def random_state_dict(arch: str = "largefov", num_classes: int = 21, seed: int = 0) -> dict[str, torch.Tensor]:
    """random_model's weights as a state dict: activations stay in a sane range through all layers."""
    return random_model(arch, num_classes, seed).state_dict()


def random_smooth_probs(height: int, width: int, labels: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    """Realistic synthetic DeepLab output: (labels, H, W) float32 softmax of random logits drawn at 1/8 resolution
    (N(0, scale²)) and upsampled 8× bilinearly (corners aligned, like Caffe's Interp)."""
    gen = torch.Generator().manual_seed(seed)
    hs, ws = (height - 1) // 8 + 2, (width - 1) // 8 + 2
    logits = torch.randn((1, labels, hs, ws), generator=gen) * scale
    up = torch.nn.functional.interpolate(logits, size=((hs - 1) * 8 + 1, (ws - 1) * 8 + 1), mode="bilinear",
                                         align_corners=True)
    return torch.softmax(up[0, :, :height, :width], dim=0).numpy()


def caffemodel_bytes(sd: dict[str, torch.Tensor], fc8_name: str = "fc8_voc12", legacy: bool = False,
                     rename: dict[str, str] | None = None) -> bytes:
    """Serialize our state dict (any architecture) as a NetParameter: new-style `layer`s with blob shapes, or legacy
    V1 `layers` with num/channels/height/width blobs and biases stored [1, 1, 1, n] (as the authors' old files
    do). Layers get the authors' names (caffe_name: fc8 → fc8_name), or rename[our name]."""
    net = messages(raw=True).NetParameter(name="DeepLab")
    for name in dict.fromkeys(key.rpartition(".")[0] for key in sd):
        layer = net.layers.add() if legacy else net.layer.add()
        layer.name = (rename or {}).get(name) or caffe_name(name, fc8_name)
        layer.type = V1_CONVOLUTION if legacy else "Convolution"
        for key in ("weight", "bias"):
            arr = sd[f"{name}.{key}"].detach().to("cpu", torch.float32).contiguous().numpy()
            blob = layer.blobs.add()
            if legacy:
                blob.num, blob.channels, blob.height, blob.width = arr.shape if arr.ndim == 4 else (1, 1, 1, arr.size)
            else:
                blob.shape.dim.extend(arr.shape)
            blob.data.append(arr.astype("<f4").tobytes())
    return net.SerializeToString()


def write_caffemodel(
    sd: dict[str, torch.Tensor], path: str | os.PathLike, fc8_name: str = "fc8_voc12", legacy: bool = False
) -> None:
    """Write our state dict as a .caffemodel (atomically); see caffemodel_bytes for the two layouts."""
    write_bytes(path, caffemodel_bytes(sd, fc8_name, legacy))
