"""What the tests share: run `deeplab` in-process through the real click group, check a one-line error, and run
a network in OpenCV's independent Caffe implementation to compare scores with ours."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner, Result

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
