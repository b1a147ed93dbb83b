"""The DeepLab v1 architectures as one table: each `ArchConfig` yields the layer sequence (Caffe names and
parameters) that `model.DeepLab` builds, `weightfiles.caffe.deploy_prototxt` writes, and the weight converters
and shape checks read. A new variant is one entry of `ARCHS`.

Torch-free, so that the command line can offer `--arch` choices without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

VGG16_WIDTHS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
CONV5_HOLE = 2  # conv5 is atrous so that pool4/pool5 can keep stride 1



@dataclass(frozen=True)
class Layer:
    """One Caffe layer: name, kind (conv, relu, dropout, max_pool, ave_pool), input and output blobs, and for
    convolutions and pools the sizes in pixels. Layers with parameters (convolutions) are keyed by name in state dicts."""

    name: str
    kind: str
    bottoms: tuple[str, ...]
    top: str
    in_channels: int = 0
    out_channels: int = 0
    kernel: int = 0
    stride: int = 1
    pad: int = 0
    dilation: int = 1
    scores: bool = False  # the class-score layer: its Caffe name carries the model's suffix (fc8_voc12)

    @property
    def has_params(self) -> bool:
        return self.kind == "conv"

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """'weight' → (out, in, k, k) and 'bias' → (out,) for a convolution; {} otherwise."""
        if not self.has_params:
            return {}
        return {"weight": (self.out_channels, self.in_channels, self.kernel, self.kernel), "bias": (self.out_channels,)}


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
        return math.prod(stride for _, stride, _ in self.pools)

    def layers(self, num_classes: int = 21) -> tuple[Layer, ...]:
        """The network in Caffe order: VGG16 with this variant's pools, then fc6, fc7 and the class scores fc8."""
        out: list[Layer] = []
        bottom, channels = "data", 3
        for block, widths in enumerate(VGG16_WIDTHS, start=1):
            hole = CONV5_HOLE if block == 5 else 1
            for i, width in enumerate(widths, start=1):
                name = f"conv{block}_{i}"
                out += _conv_relu(name, f"relu{block}_{i}", bottom, channels, width, 3, pad=hole, dilation=hole)
                bottom, channels = name, width
            kernel, stride, pad = self.pools[block - 1]
            out.append(Layer(f"pool{block}", "max_pool", (bottom,), f"pool{block}", kernel=kernel, stride=stride, pad=pad))
            bottom = f"pool{block}"
        if self.pool5a:
            out.append(Layer("pool5a", "ave_pool", (bottom,), "pool5a", kernel=3, stride=1, pad=1))
            bottom = "pool5a"
        kernel, dilation, pad, fc6 = self.fc6
        out += _conv_relu("fc6", "relu6", bottom, channels, fc6, kernel, pad=pad, dilation=dilation)
        out.append(Layer("drop6", "dropout", ("fc6",), "fc6"))
        out += _conv_relu("fc7", "relu7", "fc6", fc6, self.fc7, 1)
        out.append(Layer("drop7", "dropout", ("fc7",), "fc7"))
        out.append(Layer("fc8", "conv", ("fc7",), "fc8", self.fc7, num_classes, 1, scores=True))
        return tuple(out)

    def param_layers(self, num_classes: int = 21) -> tuple[Layer, ...]:
        """The layers with parameters (convolutions), in order."""
        return tuple(layer for layer in self.layers(num_classes) if layer.has_params)


def _conv_relu(name: str, relu: str, bottom: str, cin: int, cout: int, kernel: int, stride: int = 1, pad: int = 0,
               dilation: int = 1) -> list[Layer]:
    return [Layer(name, "conv", (bottom,), name, cin, cout, kernel, stride, pad, dilation),
            Layer(relu, "relu", (name,), name)]


# Pools: LargeFOV's 3×3 windows (pad 1) keep every pooled map aligned on sides 8k+1; the original DeepLab's
# 2×2 windows (pad 1) each grow the map by one, hence its 16k+2 input and the −7 crop (Caffe's Padding layer,
# pad_beg −7 / pad_end −8, after the ×8 Interp).
_POOLS_3X3 = ((3, 2, 1), (3, 2, 1), (3, 2, 1), (3, 1, 1), (3, 1, 1))
_POOLS_2X2 = ((2, 2, 1), (2, 2, 1), (2, 2, 1), (2, 1, 1), (3, 1, 1))

ARCHS: dict[str, ArchConfig] = {
    "largefov": ArchConfig(
        name="largefov", pools=_POOLS_3X3, pool5a=True, fc6=(3, 12, 12, 1024), fc7=1024,
        pad_multiple=8, pad_remainder=1, crop_offset=0,
        description="DeepLab-LargeFOV: fc6 3×3 hole 12, 1024 channels (20.5 M parameters)",
    ),
    "deeplab": ArchConfig(
        name="deeplab", pools=_POOLS_2X2, pool5a=False, fc6=(4, 4, 6, 4096), fc7=4096,
        pad_multiple=16, pad_remainder=2, crop_offset=7,
        description="original DeepLab: fc6 4×4 hole 4, 4096 channels (65.1 M parameters)",
    ),
}


def get_arch(arch: str | ArchConfig) -> ArchConfig:
    """Look an architecture up by name (a key of ARCHS)."""
    if isinstance(arch, ArchConfig):
        return arch
    try:
        return ARCHS[arch.lower()]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}") from None
