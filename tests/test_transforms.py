"""Pre- and post-processing: padding to 8k+1, BGR mean subtraction, corner-aligned ×8 upsampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deeplab_cli.transforms import MEAN_BGR, padded_size, preprocess, scores_to_probs, upsample_scores


@pytest.mark.parametrize("n, expected", [(1, 1), (2, 9), (9, 9), (10, 17), (500, 505), (513, 513)])
def test_largefov_pads_to_8k_plus_1(n: int, expected: int) -> None:
    assert padded_size(n, n) == (expected, expected)


def test_deeplab_pads_to_16k_plus_2() -> None:
    assert padded_size(500, 3, "deeplab") == (514, 18)
    assert padded_size(2, 2, "deeplab") == (2, 2)


def test_pad_to_fixed_size() -> None:
    assert padded_size(375, 500, pad_to=513) == (513, 513)
    with pytest.raises(ValueError, match="does not fit"):
        padded_size(600, 500, pad_to=513)
    with pytest.raises(ValueError, match="8k\\+1"):
        padded_size(100, 100, pad_to=512)


def test_preprocess_is_bgr_minus_mean_padded_with_mean_colour() -> None:
    rgb = torch.tensor([10, 20, 30], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 3).contiguous()
    x = preprocess(rgb, (9, 9))
    assert x.shape == (1, 3, 9, 9) and x.dtype == torch.float32
    expected = torch.tensor([30 - MEAN_BGR[0], 20 - MEAN_BGR[1], 10 - MEAN_BGR[2]])
    assert torch.allclose(x[0, :, 0, 0], expected)
    assert torch.count_nonzero(x[:, :, 2:, :]) == 0 and torch.count_nonzero(x[:, :, :, 3:]) == 0


def test_upsampling_is_corner_aligned_times_8() -> None:
    scores = torch.arange(6, dtype=torch.float32).view(1, 1, 2, 3)
    up = upsample_scores(scores)
    assert up.shape == (1, 1, 9, 17)  # (in−1)·8+1
    assert torch.equal(up[0, 0, ::8, ::8], scores[0, 0])  # input samples land exactly on output pixels
    assert up[0, 0, 0, 4].item() == pytest.approx(0.5)  # halfway between 0 and 1
    assert up[0, 0, 4, 0].item() == pytest.approx(1.5)  # halfway between 0 and 3


def test_deeplab_upsampling_crops_caffe_offset() -> None:
    scores = torch.randn(1, 2, 5, 5)
    full = torch.nn.functional.interpolate(scores, size=(33, 33), mode="bilinear", align_corners=True)
    assert torch.equal(upsample_scores(scores, "deeplab"), full[..., 7:, 7:])


def test_scores_to_probs_crops_and_normalises() -> None:
    probs = scores_to_probs(torch.randn(3, 9, 17, dtype=torch.float64), 5, 11)
    assert probs.shape == (3, 5, 11) and probs.dtype == torch.float32
    assert np.allclose(probs.sum(0).numpy(), 1.0, atol=1e-6)
