"""`deeplab benchmark`: runs end to end on the CPU at a tiny size, reports every stage, rejects bad options in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli
from PIL import Image

from deeplab_cli.benchmark import (
    STAGE_LABELS,
    STAGES,
    BenchmarkOptions,
    available_crf_backends,
    parse_size,
    run_benchmark,
    spread_ms,
)
from deeplab_cli.errors import UsageError

TINY = ["--size", "33x41", "--iters", "1", "--warmup", "0", "--device", "cpu"]
SPREAD_KEYS = {"median_ms", "min_ms", "max_ms"}
ENV_KEYS = {
    "device", "device_name", "torch", "threads", "cpu_count", "load_average", "precision", "channels_last", "arch",
    "num_classes", "weights", "random_weights", "image_size", "input_size", "batch_size", "iters", "warmup", "images",
    "crf_backend", "crf",
}


@pytest.fixture(autouse=True)
def no_default_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Random weights unless a test names some: no $DEEPLAB_WEIGHTS, an empty cache."""
    monkeypatch.delenv("DEEPLAB_WEIGHTS", raising=False)
    monkeypatch.setenv("DEEPLAB_CACHE", str(tmp_path / "cache"))


def invoke(*args: str):
    return cli("benchmark", *args)


def test_fps_end_to_end_prints_every_stage_and_documented_json() -> None:
    result = invoke("--fps", *TINY, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert ENV_KEYS <= report["environment"].keys()
    env = report["environment"]
    assert env["random_weights"] is True and env["image_size"] == [33, 41] and env["precision"] == "fp32"
    assert set(report["stages"]) == set(STAGES)
    for stage in STAGES:
        assert set(report["stages"][stage]) == SPREAD_KEYS
    assert set(report["end_to_end"]["with_crf"]) == SPREAD_KEYS
    assert set(report["end_to_end"]["without_crf"]) == SPREAD_KEYS
    assert report["fps"]["network"] > 0 and report["fps"]["end_to_end"] > 0 and report["fps"]["end_to_end_without_crf"] > 0
    assert report["gflops"]["network"] > 0 and report["gflops"]["matmul"] > 0
    assert report["gflops"]["network_gflop_per_image"] > 0
    variants = report["variants"]
    assert (variants[0]["precision"], variants[0]["channels_last"]) == ("fp32", False)
    assert variants[0]["agreement"] == 1.0
    assert variants[0]["matmul_gflops"] == report["gflops"]["matmul"]  # one matmul measurement per dtype and run
    assert {(v["precision"], v["channels_last"]) for v in variants} >= {("fp32", False), ("fp32", True)}
    for v in variants:
        assert set(v["network"]) == SPREAD_KEYS and 0.0 <= v["agreement"] <= 1.0 and v["matmul_gflops"] > 0
    assert report["recommended"]["precision"] in {"fp32", "bf16"}
    for label in STAGE_LABELS.values():
        assert label in result.stderr
    assert "randomly initialised weights" in result.stderr
    assert "fps" in result.stderr and "GFLOP/s" in result.stderr


def test_no_crf_with_weights_file_and_batch(weights_file: Path) -> None:
    result = invoke(*TINY, "--no-crf", "--no-variants", "--batch-size", "2", "--weights", str(weights_file), "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["environment"]["weights"] == str(weights_file)
    assert report["environment"]["random_weights"] is False
    assert report["environment"]["batch_size"] == 2
    assert report["stages"]["crf"] is None and report["end_to_end"]["with_crf"] is None
    assert report["fps"]["end_to_end"] is None and report["fps"]["end_to_end_without_crf"] > 0
    assert "variants" not in report
    assert "randomly initialised" not in result.stderr
    assert "skipped" in result.stderr  # the CRF row is still printed


def test_default_weights_from_the_environment(weights_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPLAB_WEIGHTS", str(weights_file))
    result = invoke(*TINY, "--no-crf", "--no-variants", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["environment"]["weights"] == str(weights_file)
    monkeypatch.setenv("DEEPLAB_WEIGHTS", str(weights_file.parent / "missing.safetensors"))
    result = invoke(*TINY)
    assert result.exit_code == 2 and "missing.safetensors" in result.stderr


def test_images_folder_is_decoded_and_fitted(tmp_path: Path, photo_file: Path, photo: np.ndarray) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo_file.read_bytes())
    Image.fromarray(photo[:50, :60]).save(folder / "b.png")
    (folder / "notes.txt").write_text("not an image")
    result = invoke(*TINY, "--no-variants", "--batch-size", "2", "--images", str(folder), "--json")
    assert result.exit_code == 0, result.stderr
    env = json.loads(result.stdout)["environment"]
    assert env["images"] == str(folder) and env["image_count"] == 2


def test_compare_times_every_available_crf_backend() -> None:
    result = invoke("--compare", *TINY, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert "stages" not in report  # --compare alone does not time the pipeline
    cmp = report["crf_compare"]
    status = available_crf_backends()
    assert cmp["available"] == [b for b, why in status.items() if why is None]
    assert set(cmp["unavailable"]) == {b for b, why in status.items() if why is not None}
    assert "pydensecrf" in cmp["available"]
    assert [r["backend"] for r in cmp["backends"]] == cmp["available"]
    assert cmp["backends"][0]["agreement"] == 1.0 and cmp["backends"][0]["speedup"] == 1.0
    for r in cmp["backends"]:
        assert set(r["crf"]) == SPREAD_KEYS
    for backend in cmp["unavailable"]:
        assert f"CRF backend {backend} is not available" in result.stderr


BAD_OPTIONS = [
    (["--size", "0"], "--size"),
    (["--size", "0x41"], "--size"),
    (["--size", "33x"], "--size"),
    (["--iters", "-1"], "--iters"),
    (["--iters", "0"], "--iters"),
    (["--iters", "two"], "--iters"),
    (["--warmup", "-1"], "--warmup"),
    (["--batch-size", "0"], "--batch-size"),
    (["--device", "tpu"], "tpu"),
    (["--device", "cpu", "--precision", "fp16"], "fp16"),
    (["--images", "/nonexistent/photos"], "/nonexistent/photos"),
    (["--no-such-option"], "--no-such-option"),
]


@pytest.mark.parametrize("args, named", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_give_one_line_and_exit_2(args: list[str], named: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deeplab: error:"), result.stderr
    assert named in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_exits_2() -> None:
    result = invoke("--device", "cuda")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0]


def test_parse_size() -> None:
    assert parse_size("513") == (513, 513)
    assert parse_size("375x500") == (375, 500)
    assert parse_size("375×500") == (375, 500)
    for bad in ("0", "-3x4", "3x4x5", "", "ax4"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_spread_is_per_image() -> None:
    assert spread_ms([0.2, 0.4, 0.6], per=2) == {"median_ms": 200.0, "min_ms": 100.0, "max_ms": 300.0}


def test_library_api_without_the_cli() -> None:
    opts = BenchmarkOptions(size=(33, 41), iters=1, warmup=0, device="cpu", use_crf=False, variants=False)
    messages: list[str] = []
    report = run_benchmark(opts, log=messages.append)
    assert report["environment"]["crf_backend"] is None
    assert report["stages"]["network"]["median_ms"] > 0
    assert any("randomly initialised" in m for m in messages)
    with pytest.raises(UsageError):
        run_benchmark(BenchmarkOptions(fps=False, compare=False))


def test_images_are_decoded_at_the_working_resolution(tmp_path: Path, photo: np.ndarray, monkeypatch) -> None:
    from deeplab_cli import benchmark

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo).resize((900, 600)).save(folder / "big.jpg")
    decoded = []
    real = benchmark.decode_all
    monkeypatch.setattr(benchmark, "decode_all", lambda files, side: decoded.append(real(files, side)) or decoded[-1])
    result = invoke(*TINY, "--no-variants", "--images", str(folder), "--max-side", "90", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["environment"]["max_side"] == 90
    assert {im.shape for batch in decoded for im in batch} == {(60, 90, 3)}  # what segment runs it at
