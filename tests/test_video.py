"""Video I/O (deeplab_cli.video): probing, frame selection, threaded decoding, writers, resume helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deeplab_cli import video
from deeplab_cli.errors import DeeplabError, UsageError
from deeplab_cli.video import (
    FrameRange,
    FrameReader,
    FrameSelection,
    InOrder,
    TimePoint,
    VideoFileWriter,
    existing_frames,
    first_missing,
    frame_digits,
    frame_name,
    parse_time,
    probe_video,
    read_label_video,
)
from deeplab_cli.testing import CLIP_FPS, CLIP_FRAMES, CLIP_SIZE, decode_all, make_clip, rotate_mp4

FRAMES, FPS, SIZE = CLIP_FRAMES, CLIP_FPS, CLIP_SIZE


@pytest.fixture(params=[".avi", ".mp4"])
def clip(request, tmp_path: Path, photo: np.ndarray) -> Path:
    return make_clip(tmp_path / f"clip{request.param}", photo)


def test_probe_reports_count_rate_size_and_codec(clip: Path) -> None:
    info = probe_video(clip)
    assert (info.frame_count, info.fps, info.height, info.width, info.rotation) == (FRAMES, FPS, *SIZE, 0)
    assert info.codec == {".avi": "MJPG", ".mp4": "FMP4"}[clip.suffix]  # FFmpeg names MPEG-4 part 2 FMP4
    assert info.duration == pytest.approx(FRAMES / FPS)


def test_reader_yields_every_frame_as_decoded_sequentially(clip: Path) -> None:
    reference = decode_all(clip)
    assert len(reference) == FRAMES
    with FrameReader(clip, frame_count=FRAMES, queue_size=2) as reader:
        frames = list(reader)
    assert reader.error is None and reader.position == FRAMES
    assert [f.index for f in frames] == list(range(FRAMES))
    assert all(f.image.shape == (*SIZE, 3) and f.image.dtype == np.uint8 for f in frames)
    assert all(np.array_equal(f.image, r) for f, r in zip(frames, reference))


@pytest.mark.parametrize(("text", "expected"), [
    ("250f", TimePoint(frame=250)), ("10s", TimePoint(seconds=10.0)), ("1.5s", TimePoint(seconds=1.5)),
    ("500ms", TimePoint(seconds=0.5)), ("2m", TimePoint(seconds=120.0)), ("1h", TimePoint(seconds=3600.0)),
    ("1:02.5", TimePoint(seconds=62.5)), ("1:00:02", TimePoint(seconds=3602.0)), ("12.5", TimePoint(seconds=12.5)),
    (" 3S ", TimePoint(seconds=3.0)), ("0", TimePoint(seconds=0.0)),
])
def test_parse_time(text: str, expected: TimePoint) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize("text", ["", "-1s", "abc", "1.5f", "1:75", "10 years", "1:2:3:4"])
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="e.g.|whole number|below 60"):
        parse_time(text)


def test_selection_resolves_times_to_frames() -> None:
    # A frame's time is index / fps: --start picks the first frame at or after it, --end is exclusive.
    sel = FrameSelection(parse_time("1s"), parse_time("2.05s"), every=3)
    assert sel.resolve(10.0) == FrameRange(10, 21, 3)
    assert list(sel.resolve(10.0).indices(None)) == [10, 13, 16, 19]
    assert FrameSelection(parse_time("10s")).resolve(29.97) == FrameRange(300, None, 1)  # 299 is at 9.977 s
    assert FrameSelection(parse_time("5f"), parse_time("9f")).resolve(0.0) == FrameRange(5, 9, 1)
    assert list(FrameRange(4, None, 5).indices(22)) == [4, 9, 14, 19]
    assert FrameRange(4, None, 5).indices(None) is None
    with pytest.raises(UsageError, match="no frame rate"):
        FrameSelection(parse_time("1s")).resolve(0.0)
    with pytest.raises(UsageError, match="not after"):
        FrameSelection(parse_time("2s"), parse_time("1s")).resolve(10.0)


def test_reader_picks_start_end_every(clip: Path) -> None:
    reference = decode_all(clip)
    frames = FrameSelection(parse_time("0.7s"), parse_time("25f"), every=4).resolve(FPS)
    with FrameReader(clip, frames, FRAMES) as reader:
        got = list(reader)
    assert reader.error is None
    assert [f.index for f in got] == [7, 11, 15, 19, 23]
    assert all(np.array_equal(f.image, reference[f.index]) for f in got)


def test_seeking_lands_on_the_same_frames_as_decoding(clip: Path, monkeypatch) -> None:
    reference = decode_all(clip)
    monkeypatch.setattr(video, "SEEK_MIN_FRAMES", 1)
    with FrameReader(clip, FrameRange(17, None, 2), FRAMES) as reader:
        got = list(reader)
    assert reader.error is None
    assert [f.index for f in got] == list(range(17, FRAMES, 2))
    assert all(np.array_equal(f.image, reference[f.index]) for f in got)


def test_truncated_avi_keeps_the_decoded_frames_and_says_why(tmp_path: Path, photo: np.ndarray) -> None:
    whole = make_clip(tmp_path / "whole.avi", photo)
    reference = decode_all(whole)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    info = probe_video(cut)
    assert info.frame_count == FRAMES  # the header still says 30
    with FrameReader(cut, frame_count=info.frame_count) as reader:
        got = list(reader)
    assert 0 < len(got) < FRAMES
    assert all(np.array_equal(f.image, reference[f.index]) for f in got)
    assert reader.error is not None and f"ends at frame {len(got)}" in reader.error and "truncated" in reader.error


def test_unreadable_videos_give_one_line_errors(tmp_path: Path, photo: np.ndarray) -> None:
    whole = make_clip(tmp_path / "whole.mp4", photo)
    cut = tmp_path / "cut.mp4"  # mp4v/MP4 keeps its index at the end: half a file cannot be opened at all
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 50)
    (tmp_path / "empty.avi").write_bytes(b"")
    for name, reason in (("cut.mp4", "cannot open video"), ("junk.mp4", "cannot open video"),
                         ("empty.avi", "empty file")):
        with pytest.raises(DeeplabError, match=reason) as exc:
            probe_video(tmp_path / name)
        assert "\n" not in str(exc.value) and str(exc.value).startswith(str(tmp_path / name))
        with FrameReader(tmp_path / name) as reader:
            assert list(reader) == []
        assert reason in reader.error
    with pytest.raises(UsageError, match="no such file"):
        probe_video(tmp_path / "missing.mp4")


def test_rotation_metadata_is_applied(tmp_path: Path, photo: np.ndarray) -> None:
    plain = make_clip(tmp_path / "plain.mp4", photo, frames=5)
    turned = rotate_mp4(plain, tmp_path / "turned.mp4")
    info = probe_video(turned)
    assert (info.rotation, info.height, info.width) == (90, SIZE[1], SIZE[0])
    with FrameReader(turned) as reader:
        got = list(reader)
    assert [np.array_equal(f.image, np.rot90(r, k=-1)) for f, r in zip(got, decode_all(plain))] == [True] * 5


@pytest.mark.parametrize("suffix", [".mkv", ".avi", ".mov"])
def test_label_video_is_lossless(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 21, SIZE, dtype=np.uint8) for _ in range(6)]
    labels.append(np.arange(SIZE[0] * SIZE[1]).reshape(SIZE).astype(np.uint8))  # every value 0..255
    path = tmp_path / f"labels{suffix}"
    with VideoFileWriter(path, FPS, labels=True) as writer:
        for frame in labels:
            writer.write(frame)
        assert not path.exists()  # written under a temporary name until finalised
    back = list(read_label_video(path))
    assert len(back) == len(labels) and all(np.array_equal(a, b) for a, b in zip(back, labels))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert probe_video(path).fps == FPS


def test_odd_sizes_refused_for_label_videos_cropped_for_overlays(tmp_path: Path) -> None:
    # OpenCV's FFmpeg writer keeps even sizes only, whatever the codec: a label video would lose a row.
    with pytest.raises(DeeplabError, match="even width and height"), \
            VideoFileWriter(tmp_path / "labels.mkv", FPS, labels=True) as writer:
        writer.write(np.zeros((95, 127), np.uint8))
    assert list(tmp_path.iterdir()) == []
    with VideoFileWriter(tmp_path / "overlay.mp4", FPS) as writer:
        writer.write(np.zeros((95, 127, 3), np.uint8))
    info = probe_video(tmp_path / "overlay.mp4")
    assert (info.height, info.width) == (94, 126)


def test_overlay_video_is_finalised_when_closed_early_and_removed_on_error(tmp_path: Path, photo: np.ndarray) -> None:
    frames = decode_all(make_clip(tmp_path / "src.avi", photo))
    path = tmp_path / "out" / "overlay.mp4"
    writer = VideoFileWriter(path, 7.5)
    for frame in frames[:4]:
        writer.write(frame)
    writer.close()  # as after Ctrl-C: the frames so far, in a playable file
    info = probe_video(path)
    assert (info.frame_count, info.fps, info.height, info.width) == (4, 7.5, *SIZE)
    assert len(decode_all(path)) == 4
    with pytest.raises(RuntimeError), VideoFileWriter(tmp_path / "bad.avi", FPS) as bad:
        bad.write(frames[0])
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.avi"]
    with pytest.raises(UsageError, match="lossless label video is written as .avi, .mkv, .mov"):
        VideoFileWriter(tmp_path / "labels.mp4", FPS, labels=True)
    with pytest.raises(DeeplabError, match="frame of 10×10"), VideoFileWriter(tmp_path / "o.avi", FPS) as w:
        w.write(frames[0])
        w.write(np.zeros((10, 10, 3), np.uint8))


def test_frame_names_and_resume_point(tmp_path: Path) -> None:
    assert (frame_digits(30), frame_digits(100), frame_digits(9), frame_digits(None)) == (2, 3, 1, 6)
    assert frame_name(7, 3) == "007.png" and frame_name(123, 6, ".jpg") == "000123.jpg"
    for i in (0, 2, 4, 8):
        (tmp_path / frame_name(i, 2)).write_bytes(b"x")
    (tmp_path / frame_name(6, 2)).write_bytes(b"")  # empty: not done
    (tmp_path / "10.jpg").write_bytes(b"x")
    (tmp_path / ".12.png.abcdefgh.part").write_bytes(b"x")
    done = existing_frames(tmp_path)
    assert done == {0, 2, 4, 8}
    assert first_missing(FrameRange(0, None, 2), done, 30) == 6
    assert first_missing(FrameRange(0, 6, 2), done, 30) is None
    assert first_missing(FrameRange(0, None, 2), done | {6, 10}, 11) is None
    assert first_missing(FrameRange(0, None, 2), done | {6}, None) == 10
    assert FrameRange(3, 20, 4).from_index(9) == FrameRange(11, 20, 4)
    assert FrameRange(3, 20, 4).from_index(0) == FrameRange(3, 20, 4)


def test_in_order_releases_runs() -> None:
    order = InOrder()
    assert order.push(1, "b") == [] and order.push(2, "c") == [] and order.held == 2
    assert order.push(0, "a") == ["a", "b", "c"] and order.held == 0
    assert order.push(3, "d") == ["d"] and order.next == 4


def test_video_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, deeplab_cli.video; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
