"""The working resolution: photos larger than the paper's test size run on a downscaled copy.

DeepLab v1 was trained and cross-validated (network and CRF σ alike) on PASCAL VOC images of at most
500 px, padded to 513. A 12 MP phone photo at full resolution costs ~9 GB and shows objects far
larger than the network's field of view, so a photo whose longer side exceeds `max_side` is
downscaled (area averaging, i.e. antialiased) to longer side `max_side` for the network and the CRF;
the CRF marginals (C, h, w) then come back to the photo's size through bilinear upsampling and an
argmax computed in row tiles, so memory stays at one (H, W) uint8 mask plus one tile.

Torch-free (NumPy and OpenCV only): CRF worker processes and other engines call it too.
"""

from __future__ import annotations

import numpy as np

DEFAULT_MAX_SIDE = 513  # the released VOC test scripts' padded size
TILE_PIXELS = 1 << 22  # output pixels per tile of upsample_labels (a tile's arrays stay < ~100 MB at 21 classes)


def working_size(height: int, width: int, max_side: int | None = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """(h, w) the network and the CRF run at: (height, width) itself unless its longer side exceeds max_side."""
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, min(max_side, round(height * scale))), max(1, min(max_side, round(width * scale)))


def downscale(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """image (H, W, 3) uint8 → (h, w, 3) uint8 by area averaging (antialiased); returned as is when already that size."""
    if image.shape[:2] == tuple(size):
        return image
    import cv2

    h, w = size
    return np.ascontiguousarray(cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA))


def _source_index(out_len: int, in_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sampling positions (pixel centres aligned, as torch's align_corners=False): i0, i1, weight of i1."""
    src = (np.arange(out_len, dtype=np.float64) + 0.5) * (in_len / out_len) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.intp), in_len - 1)
    i1 = np.minimum(i0 + 1, in_len - 1)
    return i0, i1, (src - i0).astype(np.float32)


def upsample_labels(probs: np.ndarray, size: tuple[int, int], tile_pixels: int = TILE_PIXELS) -> np.ndarray:
    """argmax over classes of probs (C, h, w) upsampled bilinearly to size (H, W): labels (H, W) uint8.

    Equal to `F.interpolate(probs, size, mode="bilinear").argmax(0)` but computed in row tiles, and only
    where it can differ from the low-resolution argmax: a bilinear value is a convex combination of its
    four source pixels, so where all four share their argmax c, c stays the argmax (p_c ≥ p_k holds at
    each source, hence for any weighted mean). Only pixels between differing labels are interpolated.
    """
    if probs.ndim != 3:
        raise ValueError(f"probs must be (C, h, w), got shape {probs.shape}")
    if probs.shape[0] > 256:
        raise ValueError(f"at most 256 classes fit a uint8 mask, got {probs.shape[0]}")
    height, width = size
    low = probs.argmax(axis=0).astype(np.uint8)
    if probs.shape[1:] == (height, width):
        return low
    y0, y1, wy = _source_index(height, probs.shape[1])
    x0, x1, wx = _source_index(width, probs.shape[2])
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, tile_pixels // max(width, 1))
    for top in range(0, height, rows):
        r0, r1 = low[y0[top:top + rows]], low[y1[top:top + rows]]  # (t, w) label rows above and below
        a = r0[:, x0]
        mixed = (a != r0[:, x1]) | (a != r1[:, x0]) | (a != r1[:, x1])
        ys, xs = np.nonzero(mixed)
        if ys.size:
            yy = ys + top
            ry0, ry1, cx0, cx1 = y0[yy], y1[yy], x0[xs], x1[xs]
            fy, fx = wy[yy], wx[xs]
            # torch's order of operations: h0λ·(w0λ·q00 + w1λ·q01) + h1λ·(w0λ·q10 + w1λ·q11)
            upper = (1 - fx) * probs[:, ry0, cx0] + fx * probs[:, ry0, cx1]
            lower = (1 - fx) * probs[:, ry1, cx0] + fx * probs[:, ry1, cx1]
            a[ys, xs] = ((1 - fy) * upper + fy * lower).argmax(axis=0)
        out[top:top + rows] = a
    return out

