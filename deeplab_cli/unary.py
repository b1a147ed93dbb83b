"""What the dense CRF takes: the checks of its image and probability arrays (one validator, used by both CRF
backends and by `deeplab refine` for users' files) and the unary energy −log p.

Works on numpy arrays and on torch tensors alike (shapes, dtype names and `isfinite`), without importing
either at module level: the command line reads this package's tables before any array library loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

UNARY_CLIP = 1e-5  # pydensecrf.utils.unary_from_softmax's default: U = −log(max(p, 1e-5))
SUM_TOLERANCE = 1e-2  # fp16 softmax outputs sum to 1 within ~1e-3


def _dtype_name(array: Any) -> str:
    return str(array.dtype).removeprefix("torch.")


def _is_float(name: str) -> bool:
    return name.startswith(("float", "bfloat")) or name in ("half", "double")


def _size(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)


def check_image(image: Any) -> None:
    """Raise ValueError unless image is a non-empty (H, W, 3) uint8 array or tensor."""
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) != 3 or shape[2] != 3 or _dtype_name(image) != "uint8":
        raise ValueError(f"image must be (H, W, 3) uint8, got {shape} {getattr(image, 'dtype', type(image).__name__)}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"image is empty: {shape}")


def check_probs(probs: Any, image_hw: tuple[int, int], name: str | None = None, logits: bool = False,
                distribution: bool = False) -> None:
    """Raise ValueError unless probs is a finite float (C, H, W) array (or tensor) for an image of image_hw.

    name: the file it came from, which then starts every message (and sizes are said as W×H for people);
    logits: the values are raw scores; distribution: also require values in [0, 1] summing to 1 over C.
    """
    where = f"{name}: " if name else ""
    what = "scores" if logits else "probabilities"
    dtype = _dtype_name(probs)
    shape = tuple(probs.shape)
    h, w = image_hw
    if not _is_float(dtype):
        if dtype.startswith(("int", "uint")):
            raise ValueError(f"{where}{dtype} array; expected floating point (C, H, W) {what} "
                             "(for a label mask, pass a PNG with --labels-in)")
        raise ValueError(f"{where}unsupported array dtype {dtype}; expected floating point (C, H, W) {what}")
    if len(shape) == 2:
        raise ValueError(f"{where}a 2-D {_size(shape)} array; expected (C, H, W) "
                         "(save a binary foreground probability as (1, H, W); a label mask as a PNG with --labels-in)")
    if len(shape) != 3:
        raise ValueError(f"{where}a {len(shape)}-D {_size(shape)} array; expected 3-D (C, H, W)")
    if shape[1:] != (h, w):
        if shape[:2] == (h, w):
            raise ValueError(f"{where}shape {_size(shape)} looks like (H, W, C); expected (C, H, W) — "
                             "save np.moveaxis(a, -1, 0)")
        if name:
            raise ValueError(f"{where}{shape[2]}×{shape[1]} (W×H) scores but the image is {w}×{h}; "
                             "they must match pixel for pixel")
        raise ValueError(f"probabilities are {shape[2]}×{shape[1]} but the image is {w}×{h}")
    if shape[0] == 0:
        raise ValueError(f"{where}no classes (first axis is 0)")
    _check_finite(probs, where)
    if distribution:
        _check_distribution(probs, where)


def _check_finite(probs: Any, where: str) -> None:
    import numpy as np

    finite = probs.isfinite() if hasattr(probs, "isfinite") else np.isfinite(probs)
    if bool(finite.all()):
        return
    array = np.asarray(probs.cpu()) if hasattr(probs, "cpu") else np.asarray(probs)  # the failure path only
    bad = np.argwhere(~np.isfinite(array))
    c, y, x = (int(v) for v in bad[0])
    kinds = " and ".join(k for k, m in (("NaN", np.isnan(array)), ("inf", np.isinf(array))) if m.any())
    raise ValueError(f"{where}{len(bad)} {kinds} value(s) (first at class {c}, y {y}, x {x}); "
                     "no NaN or inf allowed")


def _check_distribution(probs: np.ndarray, where: str) -> None:
    import numpy as np

    lo, hi = float(probs.min()), float(probs.max())
    if lo < -1e-6 or hi > 1.0 + 1e-3:
        raise ValueError(f"{where}values range {lo:.4g}..{hi:.4g}, outside [0, 1]: not probabilities "
                         "(pass --logits for raw scores)")
    if probs.shape[0] > 1:
        sums = probs.sum(axis=0, dtype=np.float64)
        smin, smax = float(sums.min()), float(sums.max())
        if smin < 1.0 - SUM_TOLERANCE or smax > 1.0 + SUM_TOLERANCE:
            raise ValueError(f"{where}probabilities sum to {smin:.4g}..{smax:.4g} over the first axis, not 1: "
                             "expected softmax outputs as (C, H, W) (pass --logits for raw scores)")


def unary_from_probs(probs: np.ndarray) -> np.ndarray:
    """probs: (C, H, W) → unary energy (C, H·W) float32 C-contiguous, −log p clipped as pydensecrf does."""
    import numpy as np

    p = np.asarray(probs, dtype=np.float32)
    return np.ascontiguousarray(-np.log(np.clip(p, UNARY_CLIP, None)).reshape(p.shape[0], -1))
