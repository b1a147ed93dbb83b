"""DeepLab v1 networks (Chen et al., ICLR 2015): an atrous VGG16 producing class scores at 1/8 resolution, and
the facts about their weights (layer order, expected shapes, which architecture a state dict holds).

The layers, their names and their arithmetic follow the authors' Caffe definitions (`archs.ARCHS`: one
layer sequence per variant), so that the released Caffe weights map one to one (`conv1_1.weight` ...
`fc8.weight`) and give the same scores. The model knows nothing of files, colours or the CRF: it maps a
mean-subtracted BGR batch (N, 3, H, W) to scores (N, C, h, w).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .archs import ARCHS, VGG16_WIDTHS, ArchConfig, Layer, get_arch
from .errors import DeeplabError

__all__ = ["ARCHS", "VGG16_WIDTHS", "ArchConfig", "DeepLab", "LAYER_ORDER", "check_shapes", "expected_shapes",
           "get_arch", "infer_arch", "layer_order", "parameter_count"]


class Sum(nn.Module):
    """Caffe's Eltwise SUM: the element-wise sum of its inputs (the multi-scale class scores)."""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = inputs[0]
        for x in inputs[1:]:
            out = out + x
        return out


class Crop(nn.Module):
    """Caffe's Crop (axis 2, offset 0): the first input cut to the second's height and width."""

    def forward(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return x[..., : reference.shape[-2], : reference.shape[-1]]


def _module(layer: Layer) -> nn.Module:
    if layer.kind == "conv":
        return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel, layer.stride, layer.pad, layer.dilation)
    if layer.kind == "relu":
        return nn.ReLU(inplace=True)
    if layer.kind == "dropout":
        return nn.Dropout(0.5)
    # Caffe rounds pooled sizes up; ceil_mode reproduces it, including the rule that the last window must
    # start inside the (left-padded) input. Caffe's average pooling divides by the window clipped to the
    # padded input, i.e. it counts padding: count_include_pad=True is the same rule.
    if layer.kind == "max_pool":
        return nn.MaxPool2d(layer.kernel, layer.stride, layer.pad, ceil_mode=True)
    if layer.kind == "ave_pool":
        return nn.AvgPool2d(layer.kernel, layer.stride, layer.pad, ceil_mode=True, count_include_pad=True)
    if layer.kind == "crop":
        return Crop()
    if layer.kind == "sum":
        return Sum()
    raise ValueError(f"layer {layer.name!r}: unknown kind {layer.kind!r}")


class DeepLab(nn.Module):
    """DeepLab v1: mean-subtracted BGR (N, 3, H, W) float → class scores (N, C, h, w) at output stride 8.

    Built from the architecture's layer sequence; each layer is a submodule under its Caffe name. Blobs are
    freed as soon as their last reader has run, so memory stays that of a sequential network.
    """

    def __init__(self, arch: str | ArchConfig = "largefov", num_classes: int = 21) -> None:
        super().__init__()
        cfg = get_arch(arch)
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.layers = cfg.layers(num_classes)
        for layer in self.layers:
            self.add_module(layer.name, _module(layer))
        last_read = {blob: i for i, layer in enumerate(self.layers) for blob in layer.bottoms}
        self._free = [[b for b in layer.bottoms if last_read[b] == i and b != layer.top] for i, layer in enumerate(self.layers)]
        self.arch = cfg
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blobs = {"data": x}
        for layer, free in zip(self.layers, self._free):
            module = self._modules[layer.name]
            blobs[layer.top] = module(*(blobs[b] for b in layer.bottoms))
            for blob in free:
                del blobs[blob]
        return blobs[self.layers[-1].top]

    def conv_flops(self, height: int, width: int) -> int:
        """Multiply-add FLOPs (2 per MAC) of all convolutions for one padded input of height × width."""
        flops = 0

        def count(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
            nonlocal flops
            kh, kw = module.kernel_size
            flops += 2 * output.numel() * module.in_channels * kh * kw // module.groups

        with torch.device("meta"):
            meta = DeepLab(self.arch, self.num_classes)
        hooks = [m.register_forward_hook(count) for m in meta.modules() if isinstance(m, nn.Conv2d)]
        try:
            meta(torch.empty(1, 3, height, width, device="meta"))
        finally:
            for hook in hooks:
                hook.remove()
        return flops


def parameter_count(model: nn.Module) -> int:
    """Number of scalar parameters of a model."""
    return sum(p.numel() for p in model.parameters())


def layer_order(arch: str | ArchConfig = "largefov") -> list[str]:
    """Names of the layers with parameters, in network order: positional imports map foreign layouts onto it."""
    return [layer.name for layer in get_arch(arch).param_layers()]


LAYER_ORDER: list[str] = layer_order("largefov")  # conv1_1 … conv5_3, fc6, fc7, fc8 (every single-scale variant)
MSC_LAYER_ORDER: list[str] = layer_order("msc-largefov")  # then {data, pool1 … pool4}_{conv, fc, ms}


def expected_shapes(arch: str | ArchConfig, num_classes: int = 21) -> dict[str, tuple[int, ...]]:
    """The state-dict key → tensor shape that a DeepLab of this architecture expects, in network order."""
    return {f"{layer.name}.{param}": shape for layer in get_arch(arch).param_layers(num_classes)
            for param, shape in layer.param_shapes().items()}


def infer_arch(sd: Mapping[str, torch.Tensor]) -> str | None:
    """The architecture with the state dict's layers whose fc6 has the state dict's fc6 shape, or None."""
    fc6 = sd.get("fc6.weight")
    if fc6 is None:
        return None
    layers = {key.rpartition(".")[0] for key in sd}
    for name in ARCHS:
        expected = expected_shapes(name)
        if expected["fc6.weight"] == tuple(fc6.shape) and layers == {k.rpartition(".")[0] for k in expected}:
            return name
    return None


def check_shapes(sd: Mapping[str, torch.Tensor], arch: str, num_classes: int, source: str = "weights") -> None:
    """Raise a DeeplabError naming every missing, unexpected or mis-shaped tensor."""
    expected = expected_shapes(arch, num_classes)
    problems = [f"missing {k}" for k in expected if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in expected]
    problems += [
        f"{k} is {list(sd[k].shape)}, expected {list(shape)}"
        for k, shape in expected.items()
        if k in sd and tuple(sd[k].shape) != shape
    ]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise DeeplabError(f"{source}: does not fit the {arch} architecture: {shown}")
