"""runtime.PackedNetwork (the CPU network with packed weights and fused ReLU) against the eager model."""

from __future__ import annotations

import pytest
import torch

from deeplab_cli import allocator, runtime
from deeplab_cli.pipeline import Segmenter
from deeplab_cli.allocator import keep_freed_memory
from deeplab_cli.runtime import PackedNetwork
from deeplab_cli.testing import random_model


def preprocessed(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A (1, 3, H, W) float32 input in the range of mean-subtracted pixels."""
    return torch.randn((1, 3, height, width), generator=torch.Generator().manual_seed(seed)) * 60


@pytest.mark.parametrize("arch, size", [("largefov", (65, 49)), ("largefov", (60, 47)), ("deeplab", (50, 66)),
                                        ("msc-largefov", (65, 57)), ("msc-largefov", (60, 47))])
def test_fp32_gives_the_eager_scores_and_labels(arch: str, size: tuple[int, int]) -> None:
    """Padded sizes (8k+1 / 16k+2) pool without ceil mode, others with it; the multi-scale graph (branches, crops,
    sum) runs as the model's: all match eager PyTorch."""
    model = random_model(arch, seed=3)
    x = preprocessed(*size)
    with torch.inference_mode():
        ref = model(x)
        out = PackedNetwork(model, "fp32")(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_one_packing_serves_every_input_size() -> None:
    model = random_model("largefov", seed=1)
    net = PackedNetwork(model, "fp32")
    with torch.inference_mode():
        for size in [(41, 33), (73, 57), (41, 33)]:
            x = preprocessed(*size, seed=size[0])
            torch.testing.assert_close(net(x), model(x), rtol=1e-4, atol=1e-3)


def test_bf16_keeps_bf16_weights_and_float32_scores() -> None:
    model = random_model("largefov", seed=2)
    net = PackedNetwork(model, "bf16")
    x = preprocessed(65, 65)
    with torch.inference_mode():
        out, ref = net(x), model(x)
    convs = [op for _, op in net.steps if isinstance(op, runtime._Conv)]
    assert len(convs) == 16 and all(c.weight.dtype == torch.bfloat16 and c.bias.dtype == torch.float32 for c in convs)
    assert sum(c.relu for c in convs) == 15  # every convolution but fc8 carries its ReLU
    assert out.dtype == torch.float32
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.9
    assert not torch.equal(out, ref)  # really computed in bf16


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="fp32 or bf16"):
        PackedNetwork(random_model("largefov"), "fp16")


def test_freed_memory_is_kept_once_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_kept", None)
    first = keep_freed_memory()
    assert isinstance(first, bool) and keep_freed_memory() is first


def test_segmenter_runs_packed_on_the_cpu_unless_asked_not_to() -> None:
    model = random_model("largefov")
    packed = Segmenter(model, device="cpu", crf=None)  # --runtime auto, nothing recorded in the test cache
    eager = Segmenter(model, device="cpu", crf=None, packed=False)
    assert isinstance(packed.network, PackedNetwork) and eager.network is None
    x = preprocessed(49, 57)
    torch.testing.assert_close(packed.scores(x), eager.scores(x), rtol=1e-4, atol=1e-3)
