"""`deeplab batch` with videos in the tree: folders of frame masks, overlay videos, one report line per video,
bad videos reported per file, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import cli
from PIL import Image

from deeplab_cli.batch import Job, VideoJob, discover_inputs, plan_jobs
from deeplab_cli.testing import decode_all, make_clip
from deeplab_cli.video import FrameSelection, parse_time, probe_video

FRAMES = 8
FAST = ("--device", "cpu", "--crf-workers", "1", "--crf-iterations", "3", "--crf-backend", "pydensecrf",
        "--no-progress")


@pytest.fixture()
def footage(tmp_path: Path, photo: np.ndarray) -> Path:
    """footage/: two photos, an AVI and an MP4 clip (the MP4 beside a folder of its own name), a truncated
    clip and a file that is no video."""
    root = tmp_path / "footage"
    (root / "clip" / "inner").mkdir(parents=True)
    Image.fromarray(photo).save(root / "photo.jpg")
    Image.fromarray(photo).save(root / "clip" / "inner" / "still.png")
    make_clip(root / "walk.avi", photo, frames=FRAMES)
    make_clip(root / "clip.mp4", photo, frames=FRAMES)
    whole = make_clip(tmp_path / "whole.avi", photo, frames=FRAMES)
    (root / "cut.avi").write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    (root / "junk.mp4").write_bytes(b"not a video" * 40)
    return root


def read_report(path: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in map(json.loads, path.read_text().splitlines())}


def test_plan_names_video_folders_beside_mirrored_images(footage: Path, tmp_path: Path) -> None:
    found = discover_inputs([footage], videos=True)
    assert len(found) == 6 and len(discover_inputs([footage])) == 2  # videos only when asked for
    selection = FrameSelection(parse_time("2f"))
    jobs = {job.path.name: job for job in plan_jobs(found, tmp_path / "out", overlay=True, selection=selection)}
    assert isinstance(jobs["photo.jpg"], Job) and isinstance(jobs["walk.avi"], VideoJob)
    out = tmp_path / "out"
    assert jobs["walk.avi"].outputs.masks == out / "walk" and jobs["walk.avi"].selection == selection
    assert jobs["walk.avi"].outputs.overlay == out / "walk.overlay.mp4"
    # clip.mp4 sits beside the folder clip/ whose images are mirrored into out/clip/: it keeps its whole name
    assert jobs["clip.mp4"].outputs.masks == out / "clip.mp4"
    assert jobs["still.png"].outputs.mask == out / "clip" / "inner" / "still.png"


def test_tree_with_videos_end_to_end_and_resume(footage: Path, tmp_path: Path, weights_file: Path) -> None:
    out, report = tmp_path / "out", tmp_path / "report.jsonl"
    args = (footage, "-o", out, "--overlay", "--every", "3", "--report", report, "--weights", weights_file, *FAST)
    res = cli("batch", *args)
    assert res.exit_code == 1, res.output  # the bad videos fail; everything else is done
    records = read_report(report)
    assert sorted(records) == ["clip.mp4", "cut.avi", "junk.mp4", "photo.jpg", "still.png", "walk.avi"]
    assert records["walk.avi"]["status"] == "done"
    assert records["walk.avi"]["frames"] == {"total": 3, "done": 3, "failed": 0, "skipped": 0}  # frames 0, 3, 6
    assert sorted(p.name for p in (out / "walk").glob("*.png")) == ["0.png", "3.png", "6.png"]
    assert probe_video(out / "walk.overlay.mp4").frame_count == 3
    assert sorted(p.name for p in (out / "clip.mp4").glob("*.png")) == ["0.png", "3.png", "6.png"]
    assert (out / "clip" / "inner" / "still.png").exists() and (out / "photo.png").exists()
    decoded = len(decode_all(footage / "cut.avi"))
    cut = records["cut.avi"]
    assert cut["status"] == "failed" and "truncated" in cut["error"]
    assert cut["frames"]["done"] == len(range(0, decoded, 3)) and cut["frames"]["done"] < 3
    assert len(list((out / "cut").glob("*.png"))) == cut["frames"]["done"]  # the frames that decoded are kept
    assert records["junk.mp4"]["status"] == "failed" and "cannot open video" in records["junk.mp4"]["error"]
    assert "frames segmented / failed" in res.stderr and "Traceback" not in res.output

    # The frames equal `deeplab segment` of the same video (one pipeline for both commands).
    res = cli("segment", footage / "walk.avi", "-o", tmp_path / "walk", "--every", "3", "--weights", weights_file,
              *FAST[:-1])
    assert res.exit_code == 0, res.output
    for name in ("0.png", "3.png", "6.png"):
        assert np.array_equal(np.array(Image.open(out / "walk" / name)), np.array(Image.open(tmp_path / "walk" / name)))

    (out / "walk" / "3.png").unlink()
    res = cli("batch", *args)
    assert res.exit_code == 1, res.output
    records = read_report(report)
    assert records["clip.mp4"]["status"] == "skipped" and records["photo.jpg"]["status"] == "skipped"
    assert records["walk.avi"]["status"] == "done"
    assert records["walk.avi"]["frames"] == {"total": 3, "done": 1, "failed": 0, "skipped": 2}
    assert probe_video(out / "walk.overlay.mp4").frame_count == 3  # rebuilt whole
    assert records["junk.mp4"]["status"] == "failed"
