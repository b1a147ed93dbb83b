"""The network on the CPU, laid out once: DeepLab's layer sequence run as oneDNN convolutions whose weights are
reordered into oneDNN's blocked layout once (not on every call) with the ReLU fused, in fp32 or bf16.

    net = PackedNetwork(model, "fp32")   # once per model (the weights are packed on the first call)
    scores = net(x)                      # x (N, 3, H, W) float32 → scores (N, C, h, w) float32

Eager PyTorch on the CPU spends time that does not change any result (measured at 513×513 on an AMD EPYC,
one thread, CPU time per forward; `benchmarks/runtimes.py` compares whole runtimes):
- every 3×3 convolution re-lays out its weights on every call; ReLU runs as a second pass over each activation;
- the 1×1 convolutions fc7 and fc8 take PyTorch's im2col path: 89 ms for fc7, 40 ms on oneDNN's 1×1 kernel;
- ceil-mode max pooling is 25 % slower than the same pooling without it, which gives the same output when
  the windows tile the input exactly (always, on the padded sizes 8k+1 and 16k+2);
- activations over 32 MB are unmapped on free and page-faulted in again on the next call (41 k page faults,
  70 ms per forward): allocator.keep_freed_memory asks glibc to keep freed memory for reuse, as ONNX Runtime's
  arena does.
fp32 keeps eager fp32's arithmetic (the same oneDNN kernels; 1×1 convolutions differ by float rounding only), so
labels are those of eager PyTorch and Caffe. bf16 keeps the weights in bf16 once instead of re-casting all
20.5 M of them per call (as autocast does); biases and the scores stay float32.

CPU only: on CUDA the pipeline runs the eager model with autocast, as before (Segmenter).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .allocator import keep_freed_memory
from .archs import Layer
from .model import DeepLab

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the precisions PackedNetwork runs


@dataclass
class _Conv:
    """One convolution (with the ReLU that follows it, if any), its weight packed for oneDNN on first use."""

    layer: Layer
    weight: torch.Tensor  # (out, in, k, k) in the network's dtype, until packed
    bias: torch.Tensor  # (out,) float32
    relu: bool
    packed: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lay = self.layer
        pad, stride, dilation = [lay.pad] * 2, [lay.stride] * 2, [lay.dilation] * 2
        if self.packed is None:
            self.packed = torch._C._nn.mkldnn_reorder_conv2d_weight(self.weight.to_mkldnn(), pad, stride, dilation, 1,
                                                                    list(x.shape))
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed, self.bias, pad, stride, dilation, 1,
                                                       "relu" if self.relu else "none", [], "")


def _pool(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """Caffe's max / average pooling (sizes rounded up); ceil mode only where the windows do not tile exactly."""
    k, s, p = layer.kernel, layer.stride, layer.pad
    ceil = any((n + 2 * p - k) % s for n in x.shape[2:])
    if layer.kind == "max_pool":
        return F.max_pool2d(x, k, s, p, ceil_mode=ceil)
    return F.avg_pool2d(x, k, s, p, ceil_mode=ceil, count_include_pad=True)


class PackedNetwork:
    """A DeepLab's layers as oneDNN primitives with packed weights and fused ReLU; fp32 or bf16, on the CPU.

    Runs the architecture's layer graph as DeepLab.forward does (blobs freed after their last reader; the
    multi-scale variants' crops and sums by the model's own modules). Calling it keeps freed memory for reuse
    process-wide (allocator.keep_freed_memory).
    """

    def __init__(self, model: DeepLab, precision: str = "fp32") -> None:
        if precision not in DTYPES:
            raise ValueError(f"PackedNetwork runs {' or '.join(DTYPES)}, not {precision}")
        self.dtype = DTYPES[precision]
        self.precision = precision
        self.steps: list[tuple[Layer, Callable[..., torch.Tensor]]] = []
        for layer in model.layers:
            if layer.kind == "dropout":  # identity at inference
                continue
            last = self.steps[-1][1] if self.steps else None
            if layer.kind == "relu" and isinstance(last, _Conv) and layer.bottoms == (last.layer.top,):
                last.relu = True  # the ReLU right after its convolution, in place: a post-op
                continue
            if layer.kind == "conv":
                module = model.get_submodule(layer.name)
                op = _Conv(layer, module.weight.detach().to(self.dtype).contiguous(),
                           module.bias.detach().float().contiguous(), relu=False)
            elif layer.kind == "relu":
                op = F.relu_
            elif layer.kind in ("max_pool", "ave_pool"):
                op = functools.partial(_pool, layer)
            else:
                op = model.get_submodule(layer.name)
            self.steps.append((layer, op))
        last_read = {blob: i for i, (layer, _) in enumerate(self.steps) for blob in layer.bottoms}
        self.free = [[b for b in layer.bottoms if last_read[b] == i and b != layer.top]
                     for i, (layer, _) in enumerate(self.steps)]

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3, H, W) float32 on the CPU → class scores (N, C, h, w) float32."""
        keep_freed_memory()
        blobs = {"data": x.to(dtype=self.dtype, memory_format=torch.channels_last)}  # cast and laid out in one pass
        for (layer, op), free in zip(self.steps, self.free):
            blobs[layer.top] = op(*(blobs[b] for b in layer.bottoms))
            for blob in free:
                del blobs[blob]
        return blobs[self.steps[-1][0].top].float()
