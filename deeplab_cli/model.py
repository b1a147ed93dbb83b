"""DeepLab v1 networks (Chen et al., ICLR 2015): an atrous VGG16 producing class scores at 1/8 resolution.

The layers, their names and their arithmetic follow the authors' Caffe definitions
(`DeepLab-LargeFOV` and the original `DeepLab`), so that the released Caffe weights map one to one
(`conv1_1.weight` ... `fc8.weight`) and give the same scores. The model knows nothing of files,
colours or the CRF: it maps a mean-subtracted BGR batch (N, 3, H, W) to scores (N, C, h, w).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

VGG16_WIDTHS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


@dataclass(frozen=True)
class ArchConfig:
    """What distinguishes one DeepLab v1 variant from another (all sizes in pixels)."""

    name: str
    pools: tuple[tuple[int, int, int], ...]  # (kernel, stride, pad) of pool1..pool5, max pooling
    pool5a: bool  # LargeFOV's extra 3×3 average pooling after pool5
    fc6: tuple[int, int, int, int]  # (kernel, dilation, pad, channels)
    fc7: int  # channels
    pad_multiple: int  # inputs are padded to sides pad_multiple·k + pad_remainder ...
    pad_remainder: int
    crop_offset: int  # ... and the ×8 upsampled scores are read from [offset, offset + H)
    description: str

    @property
    def output_stride(self) -> int:
        return 8


ARCHS: dict[str, ArchConfig] = {
    "largefov": ArchConfig(
        name="largefov",
        pools=((3, 2, 1), (3, 2, 1), (3, 2, 1), (3, 1, 1), (3, 1, 1)),
        pool5a=True,
        fc6=(3, 12, 12, 1024),
        fc7=1024,
        pad_multiple=8,
        pad_remainder=1,
        crop_offset=0,
        description="DeepLab-LargeFOV: fc6 3×3 hole 12, 1024 channels (20.5 M parameters)",
    ),
    "deeplab": ArchConfig(
        name="deeplab",
        # 2×2 pools with pad 1: each grows the map by one, hence the 16k+2 input and the −7 crop
        # (Caffe's Padding layer, pad_beg −7 / pad_end −8, after the ×8 Interp).
        pools=((2, 2, 1), (2, 2, 1), (2, 2, 1), (2, 1, 1), (3, 1, 1)),
        pool5a=False,
        fc6=(4, 4, 6, 4096),
        fc7=4096,
        pad_multiple=16,
        pad_remainder=2,
        crop_offset=7,
        description="original DeepLab: fc6 4×4 hole 4, 4096 channels (65.1 M parameters)",
    ),
}


def get_arch(arch: str | ArchConfig) -> ArchConfig:
    """Look an architecture up by name ('largefov' or 'deeplab')."""
    if isinstance(arch, ArchConfig):
        return arch
    try:
        return ARCHS[arch.lower()]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}") from None


class DeepLab(nn.Sequential):
    """DeepLab v1: mean-subtracted BGR (N, 3, H, W) float → fc8 class scores (N, C, h, w) at output stride 8."""

    def __init__(self, arch: str | ArchConfig = "largefov", num_classes: int = 21) -> None:
        cfg = get_arch(arch)
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        layers: list[tuple[str, nn.Module]] = []
        in_ch = 3
        for block, widths in enumerate(VGG16_WIDTHS, start=1):
            hole = 2 if block == 5 else 1  # conv5 is atrous so that pool4/pool5 can keep stride 1
            for i, width in enumerate(widths, start=1):
                layers.append((f"conv{block}_{i}", nn.Conv2d(in_ch, width, 3, padding=hole, dilation=hole)))
                layers.append((f"relu{block}_{i}", nn.ReLU(inplace=True)))
                in_ch = width
            kernel, stride, pad = cfg.pools[block - 1]
            # Caffe rounds pooled sizes up; ceil_mode reproduces it, including the rule that the
            # last window must start inside the (left-padded) input.
            layers.append((f"pool{block}", nn.MaxPool2d(kernel, stride, pad, ceil_mode=True)))
        if cfg.pool5a:
            # Caffe's average pooling divides by the window clipped to the padded input, i.e. it
            # counts padding: count_include_pad=True is the same rule.
            layers.append(("pool5a", nn.AvgPool2d(3, 1, 1, ceil_mode=True, count_include_pad=True)))
        kernel, dilation, pad, fc6_ch = cfg.fc6
        layers += [
            ("fc6", nn.Conv2d(in_ch, fc6_ch, kernel, padding=pad, dilation=dilation)),
            ("relu6", nn.ReLU(inplace=True)),
            ("drop6", nn.Dropout(0.5)),
            ("fc7", nn.Conv2d(fc6_ch, cfg.fc7, 1)),
            ("relu7", nn.ReLU(inplace=True)),
            ("drop7", nn.Dropout(0.5)),
            ("fc8", nn.Conv2d(cfg.fc7, num_classes, 1)),
        ]
        super().__init__(OrderedDict(layers))
        self.arch = cfg
        self.num_classes = num_classes

    def conv_flops(self, height: int, width: int) -> int:
        """Multiply-add FLOPs (2 per MAC) of all convolutions for one padded input of height × width."""
        flops = 0
        x = torch.empty(1, 3, height, width, device="meta")
        for module in self:
            y = module(x)
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                flops += 2 * y.numel() * module.in_channels * kh * kw // module.groups
            x = y
        return flops


def parameter_count(model: nn.Module) -> int:
    """Number of scalar parameters of a model."""
    return sum(p.numel() for p in model.parameters())


def expected_shapes(arch: str | ArchConfig, num_classes: int = 21) -> dict[str, tuple[int, ...]]:
    """The state-dict key → tensor shape that a DeepLab of this architecture expects."""
    with torch.device("meta"):
        model = DeepLab(arch, num_classes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
