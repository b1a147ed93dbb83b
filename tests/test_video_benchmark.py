"""`deeplab benchmark --video CLIP`: decode and end-to-end frames/s through the real CLI (no timing thresholds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from helpers import cli, one_line_error

from deeplab_cli.stages import BATCH_STAGES
from deeplab_cli.testing import CLIP_SIZE, make_clip


def test_benchmark_video_reports_frames_per_second(tmp_path: Path, photo: np.ndarray, weights_file: Path) -> None:
    clip = make_clip(tmp_path / "clip.avi", photo, frames=6)
    res = cli("benchmark", "--video", clip, "--frames", "4", "--weights", weights_file, "--device", "cpu",
              "--crf-iterations", "2", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["video"]["size"] == [CLIP_SIZE[1], CLIP_SIZE[0]] and report["video"]["frames_timed"] == 4
    assert report["decode_fps"] > 0 and report["environment"]["crf_iterations"] == 2
    for run in report["end_to_end"].values():
        assert run["frames"] == 4 and run["fps"] > 0 and set(run["ms_per_frame"]) == set(BATCH_STAGES)
    assert report["end_to_end"]["with_crf"]["ms_per_frame"]["crf"] > 0
    assert "frames/s" in res.stderr

    res = cli("benchmark", "--video", clip, "--frames", "2", "--weights", weights_file, "--device", "cpu",
              "--no-crf", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["end_to_end"]["with_crf"] is None


def test_benchmark_video_bad_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.mp4").write_bytes(b"nothing")
    assert "cannot open video" in one_line_error(cli("benchmark", "--video", tmp_path / "bad.mp4"))
    assert "no such file" in one_line_error(cli("benchmark", "--video", tmp_path / "none.mp4"), code=2)
