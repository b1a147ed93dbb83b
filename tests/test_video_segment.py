"""`deeplab segment VIDEO`: frame masks, label and overlay videos, frame selection, bad files, Ctrl-C and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import cli, one_line_error
from PIL import Image

from deeplab_cli.pipeline import Segmenter
from deeplab_cli.video import probe_video, read_label_video
from deeplab_cli.batch import VideoJob, VideoOutputs, segment_video
from deeplab_cli.testing import CLIP_FPS, CLIP_SIZE, decode_all, make_clip, rotate_mp4

FRAMES = 8
# The same CRF and torch threads for the video run and the per-frame reference: `segment` of one image picks
# torch's CRF on the CPU, a video pydensecrf in the worker pool, and another thread count sums convolutions in
# another order; each agrees to float rounding only, which can flip a near-tied pixel.
CRF = ("--crf-backend", "pydensecrf", "--crf-iterations", "3", "--device", "cpu")
FAST = (*CRF, "--crf-workers", "1")


def run(*args: object):
    return cli("segment", *args)


def masks_in(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.array(Image.open(p)) for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory, photo: np.ndarray) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    return {suffix: make_clip(root / f"clip{suffix}", photo, frames=FRAMES) for suffix in (".avi", ".mp4")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, clips: dict[str, Path], weights_file: Path):
    """reference(suffix, index): `deeplab segment` of that decoded frame saved as a PNG (computed once)."""
    root = tmp_path_factory.mktemp("reference")
    cache: dict[tuple[str, int], np.ndarray] = {}
    frames = {suffix: decode_all(path) for suffix, path in clips.items()}

    def get(suffix: str, index: int) -> np.ndarray:
        if (suffix, index) not in cache:
            png, mask = root / f"{suffix[1:]}{index}.png", root / f"{suffix[1:]}{index}.mask.png"
            Image.fromarray(frames[suffix][index]).save(png)
            res = run(png, "-o", mask, "--weights", weights_file, *CRF)
            assert res.exit_code == 0, res.output
            cache[suffix, index] = np.array(Image.open(mask))
        return cache[suffix, index]

    return get


def test_masks_and_overlay_video_equal_segment_of_each_frame(tmp_path: Path, clips, reference, weights_file) -> None:
    out, overlay = tmp_path / "masks", tmp_path / "overlay.mp4"
    res = run(clips[".avi"], "-o", out, "--overlay", overlay, "--weights", weights_file, *FAST)
    assert res.exit_code == 0, res.output
    assert res.stdout == "" and f"{FRAMES} of {FRAMES} frames segmented" in res.stderr
    masks = masks_in(out)
    assert list(masks) == [f"{i}.png" for i in range(FRAMES)]
    for i, (name, mask) in enumerate(masks.items()):
        assert Image.open(out / name).mode == "P"
        assert np.array_equal(mask, reference(".avi", i)), name
    info = probe_video(overlay)
    assert (info.frame_count, info.fps, info.height, info.width) == (FRAMES, CLIP_FPS, *CLIP_SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks", "overlay.mp4"]  # no temporary files left


def test_label_video_equals_the_masks_and_selection_picks_frames(tmp_path: Path, clips, reference,
                                                                  weights_file) -> None:
    selection = ("--every", "3", "--start", "0.15s", "--end", "8f")  # frames 2, 5 (8 is excluded)
    labels, out, overlay = tmp_path / "labels.mkv", tmp_path / "masks", tmp_path / "overlay.avi"
    res = run(clips[".mp4"], "-o", labels, "--overlay", overlay, *selection, "--weights", weights_file, *FAST)
    assert res.exit_code == 0, res.output
    res = run(clips[".mp4"], "-o", out, *selection, "--weights", weights_file, *FAST)
    assert res.exit_code == 0, res.output
    masks = masks_in(out)
    assert list(masks) == ["2.png", "5.png"]  # zero-padded to the digits of 8
    assert np.array_equal(masks["2.png"], reference(".mp4", 2))
    assert np.array_equal(masks["5.png"], reference(".mp4", 5))
    back = list(read_label_video(labels))
    assert len(back) == 2 and all(np.array_equal(a, b) for a, b in zip(back, masks.values()))
    info = probe_video(overlay)
    assert info.frame_count == 2 and info.fps == pytest.approx(CLIP_FPS / 3, rel=1e-3)  # the selection plays at its pace


def test_truncated_video_is_reported_and_its_decoded_frames_kept(tmp_path: Path, clips, reference,
                                                                 weights_file) -> None:
    cut = tmp_path / "cut.avi"
    data = clips[".avi"].read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    frames, whole = decode_all(cut), decode_all(clips[".avi"])
    decoded = len(frames)
    assert 0 < decoded < FRAMES
    res = run(cut, "-o", tmp_path / "masks", "--weights", weights_file, *FAST)
    assert res.exit_code == 1
    last = res.stderr.strip().splitlines()[-1]
    assert f"{decoded} of {FRAMES} frames segmented" in last and "truncated" in last and "Traceback" not in res.output
    masks = masks_in(tmp_path / "masks")
    assert len(masks) == decoded
    intact = [i for i in range(decoded) if np.array_equal(frames[i], whole[i])]  # the last one may be cut short
    assert len(intact) >= decoded - 1
    assert all(np.array_equal(masks[f"{i}.png"], reference(".avi", i)) for i in intact)


@pytest.mark.parametrize(("content", "reason"), [(b"", "empty file"), (b"not a video" * 40, "cannot open video")])
def test_unreadable_video_is_one_line(tmp_path: Path, weights_file: Path, content: bytes, reason: str) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(content)
    line = one_line_error(run(bad, "-o", tmp_path / "masks", "--weights", weights_file))
    assert reason in line and str(bad) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.mp4"]


@pytest.mark.parametrize(("args", "message"), [
    (("-o", "m.png"), "one mask per frame"), (("-o", "-"), "stdout"), (("-o", "l.mp4"), "lossless"),
    (("-o", "m", "--overlay", "o.jpg"), "one overlay per frame"), (("-o", "m", "--save-probs", "p.npy"), "images"),
    (("-o", "m", "--start", "2s", "--end", "1s"), "not after"), (("-o", "m", "--end", "soon"), "not a time"),
    (("-o", "m", "--every", "0"), "--every"),
])
def test_bad_video_options_are_usage_errors(tmp_path: Path, clips, args: tuple[str, ...], message: str) -> None:
    assert message in one_line_error(run(clips[".avi"], *args), code=2)


@pytest.mark.slow
def test_interrupted_video_leaves_a_playable_overlay_and_resumes(tmp_path: Path, photo: np.ndarray,
                                                                 weights_file: Path) -> None:
    clip = make_clip(tmp_path / "long.mp4", photo, frames=60)
    out, overlay = tmp_path / "masks", tmp_path / "overlay.mp4"
    args = [str(clip), "-o", str(out), "--overlay", str(overlay), "--weights", str(weights_file), *FAST,
            "--crf-iterations", "10"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deeplab_cli.cli", "segment", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.exists() and len(list(out.glob("*.png"))) >= 3):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no masks appeared in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (130, -signal.SIGINT), err.decode()[-2000:]
    assert "interrupted" in err.decode() and "Traceback" not in err.decode()
    written = sorted(p.name for p in out.glob("*.png"))
    assert 3 <= len(written) < 60
    assert written == [f"{i:02d}.png" for i in range(len(written))]  # the frames in flight were finished, in order
    assert len(decode_all(overlay)) == len(written)  # finalised: playable, holding the frames done
    assert not list(tmp_path.rglob(".*.part*"))

    res = run(*args)
    assert res.exit_code == 0, res.output
    assert f"{60 - len(written)} of 60 frames segmented, 0 failed, {len(written)} already done" in res.stderr
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:02d}.png" for i in range(60)]
    assert len(decode_all(overlay)) == 60  # rebuilt whole: the earlier masks blended from their PNGs


def test_frames_use_the_working_resolution_of_photos(tmp_path: Path, clips, weights_file: Path) -> None:
    frame = decode_all(clips[".avi"])[4]
    Image.fromarray(frame).save(tmp_path / "frame.png")
    small = ("--max-side", "64", *CRF)  # the 96×128 frames run at 48×64, as a photo of that size would
    assert run(tmp_path / "frame.png", "-o", tmp_path / "ref.png", "--weights", weights_file, *small).exit_code == 0
    res = run(clips[".avi"], "-o", tmp_path / "masks", "--start", "4f", "--end", "5f", "--weights", weights_file,
              *small, "--crf-workers", "1")
    assert res.exit_code == 0, res.output
    mask = np.array(Image.open(tmp_path / "masks" / "4.png"))
    assert mask.shape == CLIP_SIZE
    assert np.array_equal(mask, np.array(Image.open(tmp_path / "ref.png")))


def test_rotated_video_gives_masks_as_displayed(tmp_path: Path, clips, weights_file: Path) -> None:
    turned = rotate_mp4(clips[".mp4"], tmp_path / "turned.mp4")
    res = run(turned, "-o", tmp_path / "labels.mkv", "--overlay", tmp_path / "frames", "--end", "2f",
              "--weights", weights_file, *FAST)
    assert res.exit_code == 0, res.output
    assert [m.shape for m in read_label_video(tmp_path / "labels.mkv")] == [CLIP_SIZE[::-1]] * 2
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["0.jpg", "1.jpg"]  # an overlay folder
    assert Image.open(tmp_path / "frames" / "1.jpg").size == CLIP_SIZE  # (W, H) of the displayed frame


def test_a_failing_frame_fails_alone_and_a_rerun_redoes_it(tmp_path: Path, clips, weights_file: Path) -> None:
    seg = Segmenter.from_weights(weights_file, device="cpu", crf=None)
    original, calls = seg.scores, []

    def flaky(x):
        calls.append(len(calls))
        if len(calls) == 3:  # one frame per network call on the CPU, in order: frame 2
            raise RuntimeError("simulated failure")
        return original(x)

    seg.scores = flaky
    out, labels = tmp_path / "masks", tmp_path / "labels.mkv"
    job = VideoJob(clips[".avi"], VideoOutputs(masks=out, labels=labels))
    result = segment_video(seg, job, handle_sigint=False, crf_workers=0)
    assert (result.status, result.done, result.failed, result.total) == ("failed", FRAMES - 1, 1, FRAMES)
    assert result.error == "1 frame(s) failed; frame 2: network failed: simulated failure"
    assert result.report_record()["frames"] == {"total": FRAMES, "done": FRAMES - 1, "failed": 1, "skipped": 0}
    assert {"decode", "network", "write"} <= set(result.timings) and all(v >= 0 for v in result.timings.values())
    assert "2.png" not in masks_in(out) and len(masks_in(out)) == FRAMES - 1
    back = list(read_label_video(labels))
    assert len(back) == FRAMES and (back[2] == 255).all()  # void where the frame failed; the others in place
    assert all(np.array_equal(back[i], np.array(Image.open(out / f"{i}.png"))) for i in range(FRAMES) if i != 2)

    seg.scores = original
    again = segment_video(seg, VideoJob(clips[".avi"], VideoOutputs(masks=out)), handle_sigint=False, crf_workers=0)
    assert (again.status, again.done, again.skipped) == ("done", 1, FRAMES - 1)
    assert len(masks_in(out)) == FRAMES
    assert segment_video(seg, VideoJob(clips[".avi"], VideoOutputs(masks=out))).status == "skipped"


def test_a_mask_folder_holds_one_video(tmp_path: Path, clips, photo: np.ndarray, weights_file: Path) -> None:
    out = tmp_path / "masks"
    assert run(clips[".avi"], "-o", out, "--end", "2f", "--weights", weights_file, *FAST).exit_code == 0
    record = json.loads((out / "video.json").read_text())
    assert record == {"source": str(clips[".avi"]), "frame_count": FRAMES, "fps": CLIP_FPS,
                      "width": CLIP_SIZE[1], "height": CLIP_SIZE[0]}
    other = make_clip(tmp_path / "other.avi", photo, frames=FRAMES + 3)
    res = run(other, "-o", out, "--end", "2f", "--weights", weights_file, *FAST)
    assert res.exit_code == 1 and "holds the masks of another video" in res.stderr and "--overwrite" in res.stderr
    res = run(other, "-o", out, "--end", "2f", "--overwrite", "--weights", weights_file, *FAST)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "video.json").read_text())["frame_count"] == FRAMES + 3
    assert "2 of 2 frames segmented" in res.stderr


def test_video_outputs_stay_in_frame_order_with_a_tiny_reorder_window(tmp_path: Path, clips, weights_file: Path) -> None:
    # Two CRF workers finish frames out of order; a window of one frame makes the feed wait for each write.
    seg = Segmenter.from_weights(weights_file, device="cpu", crf_backend="pydensecrf")
    out, labels = tmp_path / "masks", tmp_path / "labels.mkv"
    job = VideoJob(clips[".mp4"], VideoOutputs(masks=out, labels=labels, overlay=tmp_path / "overlay.mp4"))
    result = segment_video(seg, job, handle_sigint=False, crf_workers=2, window=1)
    assert (result.status, result.done) == ("done", FRAMES)
    back = list(read_label_video(labels))
    assert len(back) == FRAMES and all(np.array_equal(b, np.array(Image.open(out / f"{i}.png"))) for i, b in enumerate(back))
    assert probe_video(tmp_path / "overlay.mp4").frame_count == FRAMES
