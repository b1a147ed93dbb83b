"""Fixtures that the tests and the benchmarks share (and `deeplab benchmark` without a weights file): seeded
random weights, realistic synthetic probabilities, .caffemodel files written from a state dict, and video clips
(moving shapes over a photo, written with OpenCV's VideoWriter).

Nothing here is used by the pipeline itself.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# Video clips

CLIP_FRAMES, CLIP_FPS, CLIP_SIZE = 30, 10.0, (96, 128)  # CLIP_SIZE: (H, W)
CODECS = {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "FFV1"}
IDENTITY_MATRIX = (0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)  # an MP4 display matrix (16.16, 2.30 fixed point)


def make_clip(path: Path, photo: np.ndarray, frames: int = CLIP_FRAMES, fps: float = CLIP_FPS,
              size: tuple[int, int] = CLIP_SIZE) -> Path:
    """A clip of a circle and a box moving over photo (resized to size (H, W)); the codec follows the extension."""
    import cv2

    height, width = size
    background = cv2.resize(cv2.cvtColor(photo, cv2.COLOR_RGB2BGR), (width, height), interpolation=cv2.INTER_AREA)
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*CODECS[path.suffix]), fps,
                             (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write {CODECS[path.suffix]} here")
    for i in range(frames):
        frame = background.copy()
        cv2.circle(frame, ((10 + 3 * i) % width, (30 + i) % height), 14 * height // 96, (0, 0, 255), -1)
        x = (width - 20 - 2 * i) % width
        cv2.rectangle(frame, (x, 60 * height // 96), (x + 20, 90 * height // 96), (255, 200, 0), -1)
        writer.write(frame)
    writer.release()
    return path


def decode_all(path: Path) -> list[np.ndarray]:
    """Every frame of a file as RGB, read sequentially with plain OpenCV (the reference)."""
    import cv2

    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


def rotate_mp4(path: Path, out: Path) -> Path:
    """Copy an MP4 with its track's display matrix set to a 90° clockwise rotation (as phones record)."""
    data = bytearray(path.read_bytes())
    box = data.find(b"tkhd")
    matrix = box + 4 + 4 + 20 + 8 + 8  # version/flags, times/ids/duration, reserved, layer/group/volume/reserved
    if box < 0 or data[box + 4] != 0 or struct.unpack_from(">9i", data, matrix) != IDENTITY_MATRIX:
        raise ValueError(f"{path}: no version-0 track header with the identity matrix")
    struct.pack_into(">9i", data, matrix, 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    out.write_bytes(bytes(data))
    return out
