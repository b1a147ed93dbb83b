"""The network: parameter counts, output sizes, and equality with the authors' prototxt computed independently."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deeplab_cli.model import ARCHS, DeepLab, expected_shapes, parameter_count
from deeplab_cli.testing import random_state_dict

DATA = Path(__file__).parent / "data"
PROTOTXT = {"largefov": DATA / "DeepLab-LargeFOV_test.prototxt", "deeplab": DATA / "DeepLab_basic_test.prototxt"}


@pytest.mark.parametrize("arch, count", [("largefov", 20_505_429), ("deeplab", 65_140_565), ("msc-largefov", 21_711_550),
                                         ("msc", 66_346_686), ("7x7", 134_346_581)])
def test_parameter_count(arch: str, count: int) -> None:
    with torch.device("meta"):
        assert parameter_count(DeepLab(arch, 21)) == count


def test_layer_names_are_caffe_names() -> None:
    keys = list(expected_shapes("largefov"))
    assert keys[:2] == ["conv1_1.weight", "conv1_1.bias"]
    assert keys[-2:] == ["fc8.weight", "fc8.bias"]
    assert expected_shapes("largefov")["fc6.weight"] == (1024, 512, 3, 3)
    assert expected_shapes("deeplab", 5)["fc6.weight"] == (4096, 512, 4, 4)
    assert expected_shapes("deeplab", 5)["fc8.weight"] == (5, 4096, 1, 1)


def _caffe_pool_out(n: int, k: int, s: int, p: int) -> int:
    out = int(math.ceil((n + 2 * p - k) / s)) + 1
    if (out - 1) * s >= n + p:  # the last window must start inside the image
        out -= 1
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("size", [(513, 513), (500, 375), (514, 514), (33, 40), (1, 1)])
def test_output_size_follows_caffe_arithmetic(arch: str, size: tuple[int, int]) -> None:
    cfg = ARCHS[arch]
    expected = []
    for side in size:
        n = side
        for k, s, p in cfg.pools:
            n = _caffe_pool_out(n, k, s, p)
        k, d, p, _ = cfg.fc6
        n = n + 2 * p - d * (k - 1)
        if cfg.msc:  # every score map is cropped to the image branch's: 3×3 conv, stride 8, pad 1 (rounding down)
            n = min(n, (side + 2 - 3) // 8 + 1)
        expected.append(n)
    with torch.device("meta"):
        out = DeepLab(arch, 21)(torch.empty(1, 3, *size))
    assert tuple(out.shape) == (1, 21, *expected)


def test_output_stride_8_on_aligned_sizes() -> None:
    with torch.device("meta"):
        model = DeepLab("largefov")
        assert model(torch.empty(2, 3, 513, 337)).shape[-2:] == (65, 43)  # (H'−1)/8+1
        model = DeepLab("deeplab")
        assert model(torch.empty(1, 3, 514, 354)).shape[-2:] == (67, 47)  # 16k+2 → 2k+3


# --- An independent forward pass driven by the authors' prototxt --------------------------------


def _parse_prototxt(path: Path) -> list[dict[str, str]]:
    """Top-level `layers { ... }` blocks flattened to {field: value} (nested params included)."""
    layers, depth, current = [], 0, None
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.endswith("{"):
            if depth == 0 and line.startswith("layers"):
                current = {}
            depth += 1
            continue
        if line == "}":
            depth -= 1
            if depth == 0 and current is not None:
                layers.append(current)
                current = None
            continue
        m = re.match(r"(\w+)\s*:\s*\"?([^\"]*)\"?", line)
        if m and current is not None:
            current.setdefault(m.group(1), m.group(2))
    return layers


def _caffe_max_pool(x: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    oh, ow = _caffe_pool_out(h, k, s, p), _caffe_pool_out(w, k, s, p)
    extra_h = max(0, (oh - 1) * s + k - h - p)
    extra_w = max(0, (ow - 1) * s + k - w - p)
    x = F.pad(x, (p, extra_w, p, extra_h), value=-math.inf)  # windows clipped to the image
    return F.max_pool2d(x, k, s)[..., :oh, :ow]


def _caffe_ave_pool(x: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    oh, ow = _caffe_pool_out(h, k, s, p), _caffe_pool_out(w, k, s, p)
    out = torch.zeros(*x.shape[:2], oh, ow)
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * s - p, j * s - p
            he, we = min(hs + k, h + p), min(ws + k, w + p)
            size = (he - hs) * (we - ws)  # Caffe divides by the window clipped to the padded image
            window = x[..., max(hs, 0):min(he, h), max(ws, 0):min(we, w)]
            out[..., i, j] = window.sum(dim=(-1, -2)) / size
    return out


def _reference_forward(prototxt: Path, sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for layer in _parse_prototxt(prototxt):
        kind, name = layer["type"], layer["name"]
        if kind == "CONVOLUTION":
            key = "fc8" if name.startswith("fc8") else name
            x = F.conv2d(x, sd[f"{key}.weight"], sd[f"{key}.bias"], padding=int(layer.get("pad", 0)),
                         dilation=int(layer.get("hole", 1)))
            if key == "fc8":
                return x
        elif kind == "RELU":
            x = F.relu(x)
        elif kind == "POOLING":
            args = (int(layer["kernel_size"]), int(layer.get("stride", 1)), int(layer.get("pad", 0)))
            x = _caffe_max_pool(x, *args) if layer["pool"] == "MAX" else _caffe_ave_pool(x, *args)
    raise AssertionError("no fc8 layer in prototxt")


@pytest.mark.parametrize("arch, size", [("largefov", (50, 43)), ("largefov", (57, 41)), ("deeplab", (45, 34))])
def test_model_equals_authors_prototxt(arch: str, size: tuple[int, int]) -> None:
    sd = random_state_dict(arch, num_classes=21, seed=1)
    model = DeepLab(arch, 21).eval()
    model.load_state_dict(sd)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2)) * 60
    with torch.no_grad():
        ours = model(x)
        ref = _reference_forward(PROTOTXT[arch], sd, x)
    assert ours.shape == ref.shape
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4
    assert torch.equal(ours.argmax(1), ref.argmax(1))
    assert np.isfinite(ours.numpy()).all() and ref.abs().max() > 0
