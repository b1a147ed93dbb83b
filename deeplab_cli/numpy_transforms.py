"""The network's post-processing in NumPy (×8 upsampling, crop, softmax) for CPU workers that must not import torch.

`upsample_scores` equals `transforms.upsample_scores` (Caffe's corner-aligned Interp, then the crop offset)
followed by the crop to the image: every output value is written as torch's CPU kernel computes it,
x00·w0 fused-multiply-added to x01·w1 along the width, then the same along the height, so for fc8 maps
wider than 8 the result is bit-identical to torch 2.14 on the CPU (measured); narrower maps take another
torch path and differ by ≤ 4e-6. A fused multiply-add is emulated in float64 (a product of two float32
values is exact there). Only the rows and columns inside the crop are computed.
"""

from __future__ import annotations

import numpy as np


def _axis_weights(n: int, stride: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weights (w0, w1) of output positions start..start+count of an n → (n−1)·stride+1 Interp."""
    out = np.arange(start, start + count, dtype=np.float32)
    src = out * np.float32(1.0 / stride)  # (n−1)/((n−1)·stride): exact for stride 8
    i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    w1 = (src - i0).astype(np.float32)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    return i0, i1, w0, w1


def _lerp(a: np.ndarray, w0: np.ndarray, b: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """fma(a, w0, b·w1) in float32, as torch's compiled CPU kernel rounds it."""
    return (a.astype(np.float64) * w0 + (b * w1).astype(np.float64)).astype(np.float32)


def upsample_scores(
    scores: np.ndarray, height: int, width: int, stride: int = 8, offset: int = 0
) -> np.ndarray:
    """fc8 scores (C, h, w) float32 → corner-aligned ×stride upsampling cropped to [offset, offset+height) × [..width): (C, height, width)."""
    c, h, w = scores.shape
    full_h, full_w = (h - 1) * stride + 1, (w - 1) * stride + 1
    if offset + height > full_h or offset + width > full_w:
        raise ValueError(f"scores {w}×{h} upsample to {full_w}×{full_h}, too small for {width}×{height} at offset {offset}")
    x = np.asarray(scores, dtype=np.float32)
    c0, c1, cw0, cw1 = _axis_weights(w, stride, offset, width)
    r0, r1, rw0, rw1 = _axis_weights(h, stride, offset, height)
    cols = _lerp(x[:, :, c0], cw0, x[:, :, c1], cw1)  # (C, h, width)
    return _lerp(cols[:, r0, :], rw0[:, None], cols[:, r1, :], rw1[:, None])


def softmax(scores: np.ndarray, axis: int = 0) -> np.ndarray:
    """Softmax over the class axis (default 0 of (C, H, W)) in float32."""
    x = np.asarray(scores, dtype=np.float32)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def probs_from_scores(scores: np.ndarray, height: int, width: int, stride: int = 8, offset: int = 0) -> np.ndarray:
    """fc8 scores (C, h, w) → softmax probabilities (C, height, width) float32, what the torch pipeline feeds the CRF."""
    return softmax(upsample_scores(scores, height, width, stride, offset))
