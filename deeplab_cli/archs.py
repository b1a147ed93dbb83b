"""The DeepLab v1 architectures as one table: each `ArchConfig` yields the layer sequence (Caffe names and
parameters) that `model.DeepLab` builds, `weightfiles.caffe.deploy_prototxt` writes, and the weight converters
and shape checks read. A new variant is one entry of `ARCHS`; multi-scale variants add `msc_branch`es.

The paper's five networks (Table 1): DeepLab (`deeplab`), DeepLab-MSc (`msc`), DeepLab-7x7 (`7x7`),
DeepLab-LargeFOV (`largefov`) and DeepLab-MSc-LargeFOV (`msc-largefov`, its best).

- `7x7` is the original DeepLab with VGG's fc6 kept at 7×7 (hole 4, pad 12, 4096 channels): the same 2×2
  pools, so the same 16k+2 input and −7 crop (its receptive field, 224, is the paper's).
- Multi-scale (paper §3.1): a two-layer MLP (3×3 conv to 128 channels with the stride that brings it onto the
  output grid, then 1×1 to 128; ReLU and dropout after each) on the input image and on each of pool1–pool4,
  each with its own 1×1 class-score layer, summed with fc8 (the same as concatenating the 5 × 128 channels
  before one classifier). The branches' strides (8, 4, 2, 1, 1) land every score map on one grid only with
  3×3 pools, which is why the authors' multi-scale prototxts use them ("we also change max pooling size in the
  first 4 layers from 2 to 3 ... which makes it easier to exactly align responses at different layers");
  so `msc` is the original DeepLab's fc6 (4×4, hole 4) on LargeFOV's pools, with sides 8k+1 and no crop.
- Caffe names of the branches: `{source}_conv`, `{source}_fc` and the scores `{source}_ms` (+ the model's
  suffix in a .caffemodel: `pool1_ms_voc12`), source = data, pool1 … pool4; their sum is `fc8_fuse`,
  after cropping every score map to the image branch's (a no-op on aligned sides).

Torch-free, so that the command line can offer `--arch` choices without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

VGG16_WIDTHS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
CONV5_HOLE = 2  # conv5 is atrous so that pool4/pool5 can keep stride 1
MSC_SOURCES: tuple[str, ...] = ("data", "pool1", "pool2", "pool3", "pool4")
MSC_WIDTH = 128
SCORES_SUM = "fc8_fuse"  # the Eltwise SUM of fc8 and the branches' scores



@dataclass(frozen=True)
class Layer:
    """One Caffe layer: name, kind (conv, relu, dropout, max_pool, ave_pool, crop, sum), input and output blobs, and for
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
    crf_preset: str  # the CRF parameters cross-validated for this network (a key of crf.PRESETS)
    description: str
    msc: bool = False  # multi-scale: class scores of branches on the image and pool1–pool4 summed with fc8

    @property
    def output_stride(self) -> int:
        return math.prod(stride for _, stride, _ in self.pools)

    def layers(self, num_classes: int = 21) -> tuple[Layer, ...]:
        """The network in Caffe order: VGG16 with this variant's pools, fc6–fc8, then (MSc) the branches and their sum."""
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
        out.append(Layer("fc8", "conv", ("fc7",), "fc8", self.fc7, num_classes, 1))
        if self.msc:
            for source in MSC_SOURCES:
                out += msc_branch(source, self._channels_at(source), self._stride_to_output(source), num_classes)
            out += msc_sum(("fc8", *(f"{source}_ms" for source in MSC_SOURCES)))
        return tuple(out)

    def _channels_at(self, source: str) -> int:
        return 3 if source == "data" else VGG16_WIDTHS[int(source.removeprefix("pool")) - 1][-1]

    def _stride_to_output(self, source: str) -> int:
        """The stride that brings `source` onto the output grid: the product of the pool strides after it."""
        after = 0 if source == "data" else int(source.removeprefix("pool"))
        return math.prod(stride for _, stride, _ in self.pools[after:])

    def param_layers(self, num_classes: int = 21) -> tuple[Layer, ...]:
        """The layers with parameters (convolutions), in order."""
        return tuple(layer for layer in self.layers(num_classes) if layer.has_params)


def _conv_relu(name: str, relu: str, bottom: str, cin: int, cout: int, kernel: int, stride: int = 1, pad: int = 0,
               dilation: int = 1) -> list[Layer]:
    return [Layer(name, "conv", (bottom,), name, cin, cout, kernel, stride, pad, dilation),
            Layer(relu, "relu", (name,), name)]


def msc_branch(source: str, in_channels: int, stride: int, num_classes: int) -> list[Layer]:
    """One multi-scale branch on blob `source`: 3×3 conv (stride onto the output grid) → 128, 1×1 → 128 (ReLU and
    dropout after each), then its own 1×1 class scores `{source}_ms`."""
    conv, fc, ms = f"{source}_conv", f"{source}_fc", f"{source}_ms"
    return [
        *_conv_relu(conv, f"{conv}_relu", source, in_channels, MSC_WIDTH, 3, stride=stride, pad=1),
        Layer(f"{conv}_drop", "dropout", (conv,), conv),
        *_conv_relu(fc, f"{fc}_relu", conv, MSC_WIDTH, MSC_WIDTH, 1),
        Layer(f"{fc}_drop", "dropout", (fc,), fc),
        Layer(ms, "conv", (fc,), ms, MSC_WIDTH, num_classes, 1),
    ]


def msc_sum(scores: tuple[str, ...]) -> list[Layer]:
    """Crop every score map to the image branch's (data_ms) grid, then sum them (`fc8_fuse`).

    On sides 8k+1 all maps are (k+1)², and the crops keep everything; on other sides the strided convolutions
    round down where Caffe's pools round up, so the maps end one row or column apart: the crops keep the rows
    and columns they share, which see the same image positions.
    """
    reference = f"{MSC_SOURCES[0]}_ms"
    crops = [Layer(f"{top}_crop", "crop", (top, reference), f"{top}_crop") for top in scores if top != reference]
    summed = tuple(reference if top == reference else f"{top}_crop" for top in scores)
    return [*crops, Layer(SCORES_SUM, "sum", summed, SCORES_SUM)]


# Pools: LargeFOV's 3×3 windows (pad 1) keep every pooled map aligned on sides 8k+1; the original DeepLab's
# 2×2 windows (pad 1) each grow the map by one, hence its 16k+2 input and the −7 crop (Caffe's Padding layer,
# pad_beg −7 / pad_end −8, after the ×8 Interp).
_POOLS_3X3 = ((3, 2, 1), (3, 2, 1), (3, 2, 1), (3, 1, 1), (3, 1, 1))
_POOLS_2X2 = ((2, 2, 1), (2, 2, 1), (2, 2, 1), (2, 1, 1), (3, 1, 1))

_LARGEFOV = ArchConfig(
    name="largefov", pools=_POOLS_3X3, pool5a=True, fc6=(3, 12, 12, 1024), fc7=1024,
    pad_multiple=8, pad_remainder=1, crop_offset=0, crf_preset="largefov",
    description="DeepLab-LargeFOV: fc6 3×3 hole 12, 1024 channels (20.5 M parameters)",
)
_DEEPLAB = ArchConfig(
    name="deeplab", pools=_POOLS_2X2, pool5a=False, fc6=(4, 4, 6, 4096), fc7=4096,
    pad_multiple=16, pad_remainder=2, crop_offset=7, crf_preset="deeplab",
    description="original DeepLab: fc6 4×4 hole 4, 4096 channels (65.1 M parameters)",
)
ARCHS: dict[str, ArchConfig] = {
    "largefov": _LARGEFOV,
    "deeplab": _DEEPLAB,
    "msc-largefov": replace(
        _LARGEFOV, name="msc-largefov", msc=True, crf_preset="msc-largefov",
        description="DeepLab-MSc-LargeFOV: LargeFOV + multi-scale scores from the image and pool1–4 (21.7 M parameters)",
    ),
    "msc": replace(
        _DEEPLAB, name="msc", pools=_POOLS_3X3, pad_multiple=8, pad_remainder=1, crop_offset=0, msc=True,
        crf_preset="msc",
        description="DeepLab-MSc: DeepLab's fc6 4×4 hole 4 on 3×3 pools + multi-scale scores (66.3 M parameters)",
    ),
    # No CRF values were published for 7x7: LargeFOV's, whose field of view (224) it shares.
    "7x7": replace(
        _DEEPLAB, name="7x7", fc6=(7, 4, 12, 4096), crf_preset="largefov",
        description="DeepLab-7x7: original DeepLab with VGG's 7×7 fc6, hole 4, 4096 channels (134.3 M parameters)",
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
