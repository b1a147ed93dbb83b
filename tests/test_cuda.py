"""The CUDA path: every command on `cuda`, the half precisions against fp32, the torch CRF on the GPU against
pydensecrf, pinned transfers and out-of-memory handling. Skipped without CUDA; benchmarks/device_check.sh runs
them (`pytest -m cuda`) on a GPU machine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli, one_line_error
from PIL import Image

from deeplab_cli.crf import PRESETS, dense_crf_pydensecrf
from deeplab_cli.meanfield import dense_crf_torch
from deeplab_cli.pipeline import Segmenter
from deeplab_cli.testing import random_model, random_smooth_probs
from deeplab_cli.transforms import to_tensor

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def mask(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def test_segment_on_cuda_gives_the_cpu_mask(tmp_path: Path, photo_file: Path, weights_file: Path) -> None:
    res = cli("segment", photo_file, "-o", tmp_path / "gpu.png", "--weights", weights_file, "--device", "cuda")
    assert res.exit_code == 0, res.output
    assert "cuda" in res.stderr.splitlines()[0] and "fp16" in res.stderr.splitlines()[0]
    cli("segment", photo_file, "-o", tmp_path / "cpu.png", "--weights", weights_file, "--device", "cpu")
    assert (mask(tmp_path / "gpu.png") == mask(tmp_path / "cpu.png")).mean() >= 0.99


def test_batch_on_cuda_batches_and_writes_every_mask(tmp_path: Path, photo: np.ndarray, weights_file: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i, size in enumerate([(113, 75), (113, 75), (90, 61)]):
        Image.fromarray(photo).resize(size).save(folder / f"p{i}.png")
    for device in ("cuda", "cpu"):
        res = cli("batch", folder, "-o", tmp_path / device, "--weights", weights_file, "--device", device,
                  "--batch-size", "2", "--no-progress")
        assert res.exit_code == 0, res.output
    for i in range(3):
        assert (mask(tmp_path / "cuda" / f"p{i}.png") == mask(tmp_path / "cpu" / f"p{i}.png")).mean() >= 0.99


def test_refine_on_cuda_with_the_torch_crf(tmp_path: Path, photo_file: Path, photo: np.ndarray) -> None:
    probs = tmp_path / "probs.npy"
    np.save(probs, random_smooth_probs(*photo.shape[:2], 21, seed=3))
    for backend, device in (("torch", "cuda"), ("pydensecrf", "cpu")):
        res = cli("refine", photo_file, probs, "-o", tmp_path / f"{backend}.png", "--crf-backend", backend,
                  "--device", device)
        assert res.exit_code == 0, res.output
    assert (mask(tmp_path / "torch.png") == mask(tmp_path / "pydensecrf.png")).mean() >= 0.999


def test_benchmark_on_cuda_reports_the_gpu_and_every_precision() -> None:
    res = cli("benchmark", "--fps", "--compare", "--size", "65", "--iters", "1", "--warmup", "0", "--device", "cuda",
              "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["environment"]["device"] == "cuda" and report["environment"]["precision"] == "fp16"
    assert {v["precision"] for v in report["variants"]} >= {"fp32", "fp16"}
    assert {(b["backend"], b["device"]) for b in report["crf_compare"]["backends"]} >= {("torch", "cuda")}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precisions_keep_fp32_labels(precision: str) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    model = random_model("largefov", seed=5)
    x = torch.randn((2, 3, 129, 129), generator=torch.Generator().manual_seed(0)).mul_(60).cuda()
    ref = Segmenter(model, device="cuda", precision="fp32", crf=None).scores(x)
    out = Segmenter(model, device="cuda", precision=precision, crf=None).scores(x)
    assert out.device.type == "cuda" and out.shape == ref.shape
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.98  # random weights: indicative only


def test_torch_crf_on_cuda_matches_pydensecrf(photo: np.ndarray) -> None:
    probs = random_smooth_probs(*photo.shape[:2], 21, seed=4)
    params = PRESETS["largefov"]
    q = dense_crf_torch(photo, probs, device="cuda", **params.as_dict())
    ref = dense_crf_pydensecrf(photo, probs, params)
    assert q.device.type == "cuda"
    q = q.cpu().numpy()
    assert (q.argmax(0) == ref.argmax(0)).mean() >= 0.999
    assert np.abs(q - ref).max() <= 1e-3


def test_host_to_device_copies_are_pinned(photo: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    pinned = []
    original = torch.Tensor.pin_memory

    def spy(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = original(self, *args, **kwargs)
        pinned.append(out.is_pinned())
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", spy)
    t = to_tensor(photo, "cuda")
    assert pinned == [True] and t.device.type == "cuda"
    assert torch.equal(t.cpu(), torch.from_numpy(photo).permute(2, 0, 1))


def test_out_of_memory_is_one_line(tmp_path: Path, photo_file: Path, weights_file: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Segmenter, "scores", oom)
    res = cli("segment", photo_file, "-o", tmp_path / "m.png", "--weights", weights_file, "--device", "cuda")
    assert "out of memory on cuda" in one_line_error(res, alone=False)
    assert not (tmp_path / "m.png").exists()


def test_batch_retries_image_by_image_after_out_of_memory(tmp_path: Path, photo: np.ndarray, weights_file: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(photo).save(folder / f"p{i}.png")
    original = Segmenter.scores
    emptied = []

    def scores(self, x):
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return original(self, x)

    monkeypatch.setattr(Segmenter, "scores", scores)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    res = cli("batch", folder, "-o", tmp_path / "out", "--weights", weights_file, "--device", "cuda",
              "--batch-size", "3", "--no-progress")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p0.png", "p1.png", "p2.png"]
    assert emptied
