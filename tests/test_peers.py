"""The optional runtimes (peers.py): the ONNX export against our scores, ONNX Runtime and OpenVINO behind
Segmenter, `deeplab export`, and what --runtime auto picks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli, one_line_error
from PIL import Image

from deeplab_cli import peers
from deeplab_cli.errors import UsageError
from deeplab_cli.peers import choose_runtimes, recorded_runtime, resolve_runtime
from deeplab_cli.pipeline import Segmenter
from deeplab_cli.testing import random_model

ort = pytest.importorskip("onnxruntime")


def preprocessed(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 60


def test_exported_file_reproduces_our_fp32_scores_on_onnxruntime(tmp_path: Path, weights_file: Path) -> None:
    out = tmp_path / "model.onnx"
    res = cli("export", "--format", "onnx", "-o", out, "--weights", weights_file)
    assert res.exit_code == 0, res.output
    assert "wrote" in res.stderr and res.stdout == ""
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    seg = Segmenter.from_weights(weights_file, device="cpu", crf=None)
    for shape in [(1, 3, 65, 49), (2, 3, 33, 41)]:  # batch and size are dynamic
        x = preprocessed(*shape)
        ours = seg.scores(x).numpy()
        theirs = session.run(None, {"data": x.numpy()})[0]
        assert theirs.shape == ours.shape
        assert np.abs(theirs - ours).max() <= 1e-4 * np.abs(ours).max()
        assert (theirs.argmax(1) == ours.argmax(1)).all()


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_segmenter_on_a_peer_gives_our_scores(runtime: str) -> None:
    pytest.importorskip(runtime)
    model = random_model("largefov", seed=4)
    x = preprocessed(1, 3, 57, 41)
    ours = Segmenter(model, device="cpu", crf=None).scores(x)
    seg = Segmenter(model, device="cpu", crf=None, runtime=runtime)
    assert seg.runtime == runtime and seg.network is not None
    theirs = seg.scores(x)
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4 * float(ours.abs().max()))


def test_openvino_bf16_runs_in_bf16() -> None:
    pytest.importorskip("openvino")
    model = random_model("largefov", seed=4)
    x = preprocessed(1, 3, 65, 65)
    ref = Segmenter(model, device="cpu", crf=None).scores(x)
    out = Segmenter(model, device="cpu", crf=None, runtime="openvino", precision="bf16").scores(x)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.9


def test_segment_cli_on_onnxruntime_gives_the_torch_mask(tmp_path: Path, photo_file: Path, weights_file: Path) -> None:
    for runtime in ("torch", "onnxruntime"):
        res = cli("segment", photo_file, "-o", tmp_path / f"{runtime}.png", "--weights", weights_file, "--device", "cpu",
                  "--runtime", runtime)
        assert res.exit_code == 0, res.output
    assert "on onnxruntime" in res.stderr.splitlines()[0]
    assert np.array_equal(np.array(Image.open(tmp_path / "torch.png")), np.array(Image.open(tmp_path / "onnxruntime.png")))


def test_unusable_runtimes_are_one_line_errors(tmp_path: Path, photo_file: Path, weights_file: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    res = cli("segment", photo_file, "-o", tmp_path / "m.png", "--weights", weights_file, "--device", "cpu",
              "--runtime", "onnxruntime", "--precision", "bf16")
    assert "onnxruntime runs fp32 only" in one_line_error(res, code=2, alone=False)
    monkeypatch.setattr(peers, "missing", lambda runtime: f"--runtime {runtime} needs {runtime}: pip install x")
    res = cli("segment", photo_file, "-o", tmp_path / "m.png", "--weights", weights_file, "--device", "cpu",
              "--runtime", "openvino")
    assert "pip install" in one_line_error(res, code=2, alone=False)
    with pytest.raises(UsageError, match="runs on the CPU"):
        resolve_runtime("openvino", "cuda", "fp32")
    with pytest.raises(UsageError, match="unknown runtime"):
        resolve_runtime("tensorrt", "cpu", "fp32")


def variant(precision: str, runtime: str, ms: float, agreement: float) -> dict:
    return {"precision": precision, "channels_last": True, "packed": runtime == "torch", "runtime": runtime,
            "network": {"median_ms": ms}, "agreement": agreement}


def test_auto_follows_what_the_benchmark_measured_with_equal_labels(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPLAB_CACHE", str(tmp_path))
    assert resolve_runtime("auto", "cpu", "fp32") == "torch"  # nothing measured yet
    chosen = choose_runtimes([variant("fp32", "torch", 100, 1.0), variant("fp32", "onnxruntime", 90, 1.0),
                              variant("fp32", "openvino", 80, 0.9999),  # faster, but not the same labels
                              variant("bf16", "torch", 50, 0.996), variant("bf16", "openvino", 45, 0.997)],
                             {"size": [513, 513]})
    assert chosen == {"fp32": "onnxruntime", "bf16": "openvino"}
    record = json.loads((tmp_path / peers.CHOICE_FILE).read_text())
    assert any(r["runtime"] == "onnxruntime" and r["ours_ms"] == 100 and r["size"] == [513, 513]
               for r in record.values())
    assert resolve_runtime("auto", "cpu", "fp32") == "onnxruntime"
    assert resolve_runtime("auto", "cuda", "fp32") == "torch"  # peers run on the CPU only
    monkeypatch.setattr(peers, "missing", lambda runtime: "not installed")
    assert recorded_runtime("fp32") is None and resolve_runtime("auto", "cpu", "fp32") == "torch"
    monkeypatch.undo()
    monkeypatch.setenv("DEEPLAB_CACHE", str(tmp_path))
    choose_runtimes([variant("fp32", "torch", 80, 1.0), variant("fp32", "onnxruntime", 90, 1.0)], {})
    assert resolve_runtime("auto", "cpu", "fp32") == "torch"  # a later measurement overrides the record


def test_benchmarks_on_tiny_inputs_report_but_do_not_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPLAB_CACHE", str(tmp_path))
    chosen = choose_runtimes([variant("fp32", "torch", 14, 1.0), variant("fp32", "onnxruntime", 5, 1.0)],
                             {"size": [33, 41]}, record=False)
    assert chosen == {"fp32": "onnxruntime"} and not (tmp_path / peers.CHOICE_FILE).exists()
    res = cli("benchmark", "--fps", "--no-crf", "--size", "33x41", "--iters", "1", "--warmup", "0", "--device", "cpu",
              "--json")
    assert res.exit_code == 0, res.output
    assert "runtime_choice" in json.loads(res.stdout) and not (tmp_path / peers.CHOICE_FILE).exists()
