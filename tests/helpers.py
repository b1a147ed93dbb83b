"""What the tests share: run `deeplab` in-process through the real click group, check a one-line error, and run
a network in OpenCV's independent Caffe implementation to compare scores with ours."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import torch
from click.testing import CliRunner, Result
from PIL import Image

from deeplab_cli.cli import main


def cli(*args: object, input: bytes | str | None = None, env: dict | None = None) -> Result:
    """`deeplab ARGS...` (each argument str()-ed) with CliRunner; stdout and stderr kept apart; exceptions raise."""
    return CliRunner().invoke(main, [str(a) for a in args], input=input, env=env, catch_exceptions=False)


def one_line_error(result: Result, code: int = 1, alone: bool = True) -> str:
    """The CLI failed with `code` and exactly one `deeplab: error:` line, the last on stderr, and no traceback;
    alone: stderr holds nothing else (else progress lines may come first). Returns the error line."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("deeplab: error: "), result.stderr
    assert sum(line.startswith("deeplab: error:") for line in lines) == 1 and "Traceback" not in result.output
    if alone:
        assert len(lines) == 1, result.stderr
    return lines[-1]


def opencv_caffe(prototxt: Path, caffemodel: Path, x: torch.Tensor, blobs: list[str]) -> list[torch.Tensor]:
    """The named blobs of a Caffe net run by OpenCV's `cv2.dnn.readNetFromCaffe` on input x (N, 3, H, W)."""
    import cv2

    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    net.setInput(x.numpy())
    return [torch.from_numpy(a) for a in net.forward(blobs)]


def assert_same_scores(ours: torch.Tensor, theirs: torch.Tensor, argmax: bool = True) -> None:
    """Same shape, within 1e-4 of the largest score (relative), and (argmax) the same class at every position."""
    assert ours.shape == theirs.shape
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-4
    if argmax:
        assert torch.equal(ours.argmax(1), theirs.argmax(1))


# Options that keep a batch run small and quick on the CPU.
FAST = ("--device", "cpu", "--crf-workers", "1", "--net-threads", "1", "--crf-iterations", "3", "--no-progress")


def batch_cli(*args: object, input: bytes | None = None) -> Result:
    """`deeplab batch ARGS...` in-process (see cli)."""
    return cli("batch", *args, input=input)


def resized(photo: np.ndarray, width: int, height: int) -> Image.Image:
    """The photo resized to width × height (bilinear), as a PIL image."""
    return Image.fromarray(photo).resize((width, height), Image.BILINEAR)


def mask_name(rel: str) -> str:
    """Expected mask path for the tree: cat.jpg / cat.png share a stem, so they keep their whole names."""
    p = Path(rel)
    return str(p.with_name(p.name + ".png") if p.stem == "cat" else p.with_suffix(".png"))


def read_report(path: Path) -> dict[str, dict]:
    """A --report JSONL file as path → record (each path once)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    by_path = {r["path"]: r for r in records}
    assert len(by_path) == len(records)
    return by_path
