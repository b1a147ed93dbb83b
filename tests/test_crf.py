"""The dense CRF (pydensecrf backend): parameters, input checks, and that it snaps labels to image edges."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deeplab_cli import native
from deeplab_cli.crf import PRESETS, CRFParams, dense_crf, resolve_backend, unary_from_probs


def sharp_scene(size: int = 72) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc off the 8-pixel grid on a noisy dark background: image (H, W, 3) uint8, truth (H, W)."""
    yy, xx = np.mgrid[:size, :size]
    truth = ((yy - 37.3) ** 2 + (xx - 30.6) ** 2 < 19.5**2).astype(np.int64)
    rng = np.random.default_rng(0)
    image = np.where(truth[..., None] == 1, (210, 180, 60), (40, 60, 90)) + rng.normal(0, 6, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), truth


def coarse_probs(truth: np.ndarray, num_classes: int = 2) -> np.ndarray:
    """What the network gives: the truth at 1/8 resolution, upsampled ×8 and softened. (C, H, W) float32."""
    onehot = torch.from_numpy(np.eye(num_classes, dtype=np.float32)[truth]).permute(2, 0, 1)[None]
    small = F.avg_pool2d(onehot, 8, 8, ceil_mode=True)
    up = F.interpolate(small, size=truth.shape, mode="bilinear", align_corners=False)[0]
    return (0.15 + 0.7 * up).numpy() / (0.15 * num_classes + 0.7)


def test_presets_hold_the_quoted_values() -> None:
    assert PRESETS["largefov"] == CRFParams(10, 4, 121, 5, 3, 3)
    assert (PRESETS["deeplab"].bi_w, PRESETS["deeplab"].bi_xy, PRESETS["deeplab"].bi_rgb) == (5, 50, 10)
    assert PRESETS["msc"].bi_xy == 95 and PRESETS["msc-largefov"].bi_xy == 83


def test_crf_moves_boundaries_to_image_edges() -> None:
    image, truth = sharp_scene()
    probs = coarse_probs(truth)
    before = probs.argmax(0)
    q = dense_crf(image, probs, PRESETS["largefov"])
    after = q.argmax(0)
    assert q.shape == probs.shape and q.dtype == np.float32
    assert np.allclose(q.sum(0), 1.0, atol=1e-4)
    edge = np.zeros_like(truth, bool)  # pixels within 4 px of the true boundary
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            edge |= np.roll(truth, (dy, dx), (0, 1)) != truth
    acc_before = (before == truth)[edge].mean()
    acc_after = (after == truth)[edge].mean()
    assert acc_after > acc_before + 0.05, (acc_before, acc_after)
    assert (after == truth).mean() > 0.98


def test_no_iterations_returns_softmax_of_unary() -> None:
    image, truth = sharp_scene(16)
    probs = coarse_probs(truth)
    q = dense_crf(image, probs, CRFParams(iterations=0))
    assert np.allclose(q, np.clip(probs, 1e-5, None) / np.clip(probs, 1e-5, None).sum(0), atol=1e-5)


def test_unary_is_clipped_negative_log() -> None:
    probs = np.array([[[0.0, 0.5]], [[1.0, 0.5]]], np.float64)
    u = unary_from_probs(probs)
    assert u.shape == (2, 2) and u.dtype == np.float32 and u.flags.c_contiguous
    assert u[0, 0] == pytest.approx(-np.log(1e-5)) and u[1, 0] == pytest.approx(0.0)


@pytest.mark.parametrize(
    "image, probs, match",
    [
        (np.zeros((4, 5, 3), np.uint8), np.full((2, 4, 6), 0.5, np.float32), "image is"),
        (np.zeros((4, 5), np.uint8), np.full((2, 4, 5), 0.5, np.float32), "uint8"),
        (np.zeros((4, 5, 3), np.uint8), np.full((2, 4, 5), np.nan, np.float32), "NaN"),
        (np.zeros((4, 5, 3), np.uint8), np.ones((2, 4, 5), np.int64), "floating"),
    ],
)
def test_bad_inputs_are_clear_errors(image: np.ndarray, probs: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dense_crf(image, probs)


def test_parameter_validation_and_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="σ"):
        CRFParams(bi_xy=0).validate()
    assert CRFParams().with_overrides(bi_w=7, bi_xy=None).bi_w == 7
    assert resolve_backend("auto", "cuda:0") == "torch"
    assert resolve_backend("auto", "cpu") == "torch"  # alone on the CPU, the faster
    assert resolve_backend("auto", "cpu", in_pool=True) == "torch"  # in single-threaded workers too (compiled)
    assert resolve_backend("auto", "cuda", in_pool=True) == "torch"
    monkeypatch.setattr(native, "library", lambda: None)  # installed without the compiled kernels
    assert resolve_backend("auto", "cpu", in_pool=True) == "pydensecrf"
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("pydensecrf", "cuda") == "pydensecrf"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("gpu")


def test_finite_values_whose_sum_overflows_are_accepted() -> None:
    """The finiteness check sums first: a sum that overflows from finite values must not read as inf."""
    from deeplab_cli.unary import check_probs

    scores = np.zeros((2, 4, 5), np.float32)
    scores[:, :2] = 3e38  # finite, but their float32 sum is inf
    check_probs(scores, (4, 5), logits=True)
    check_probs(torch.from_numpy(scores), (4, 5), logits=True)
    scores[1, 3, 4] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN value\(s\) \(first at class 1, y 3, x 4\)"):
        check_probs(torch.from_numpy(scores), (4, 5), logits=True)
