"""Pre- and post-processing of the paper's test pipeline, as plain tensor functions (any device)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .model import ArchConfig, get_arch

# Caffe's VGG16 ImageNet mean, BGR order, on the 0..255 scale (no further scaling).
MEAN_BGR: tuple[float, float, float] = (104.008, 116.669, 122.675)


def padded_size(height: int, width: int, arch: str | ArchConfig = "largefov", pad_to: int | None = None) -> tuple[int, int]:
    """Network input size for an image: each side rounded up to m·k + r (8k+1 for LargeFOV), or pad_to."""
    cfg = get_arch(arch)
    if pad_to is not None:
        if (pad_to - cfg.pad_remainder) % cfg.pad_multiple:
            raise ValueError(
                f"--pad-to {pad_to} is not {cfg.pad_multiple}k+{cfg.pad_remainder}, which {cfg.name} needs for exact alignment"
            )
        if height > pad_to or width > pad_to:
            raise ValueError(f"image of {width}×{height} does not fit --pad-to {pad_to}")
        return pad_to, pad_to

    def up(n: int) -> int:
        k = max(0, -(-(n - cfg.pad_remainder) // cfg.pad_multiple))
        return k * cfg.pad_multiple + cfg.pad_remainder

    return up(height), up(width)


def to_tensor(image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W, 3) uint8 RGB numpy → (3, H, W) uint8 tensor on device (pinned on the way to CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def preprocess(images: torch.Tensor, size: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """images: (N, 3, H, W) uint8 RGB → (N, 3, *size) BGR minus mean, zero-padded bottom/right (= mean colour)."""
    n, _, h, w = images.shape
    mean = torch.tensor(MEAN_BGR, dtype=dtype, device=images.device).view(1, 3, 1, 1)
    x = images.flip(1).to(dtype) - mean
    return F.pad(x, (0, size[1] - w, 0, size[0] - h))


def upsample_scores(scores: torch.Tensor, arch: str | ArchConfig = "largefov") -> torch.Tensor:
    """fc8 scores (N, C, h, w) → (N, C, (h−1)·8+1 − offset, ...): Caffe's corner-aligned ×8 Interp, then its crop offset."""
    cfg = get_arch(arch)
    h, w = scores.shape[-2:]
    size = ((h - 1) * cfg.output_stride + 1, (w - 1) * cfg.output_stride + 1)
    up = F.interpolate(scores, size=size, mode="bilinear", align_corners=True)
    return up[..., cfg.crop_offset:, cfg.crop_offset:]


def scores_to_probs(scores: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Upsampled scores (..., C, H', W') → softmax probabilities (..., C, height, width) in float32."""
    return torch.softmax(scores[..., :height, :width].float(), dim=-3)
