"""Videos through the batch engine: every selected frame is a job; video outputs are written in frame order.

    job = VideoJob(Path("clip.mp4"), VideoOutputs(masks=Path("clip_masks"), overlay=Path("clip_overlay.mp4")),
                   FrameSelection(every=5))
    result = segment_video(segmenter, job, crf_workers=2)   # VideoResult: frames done / failed / skipped, error
    result.report_record()                                  # the --report line of this video

Frames are decoded on video.FrameReader's thread and handed to batch.run_batch as jobs that carry their
picture, so they take exactly the path of photos: network batches on the device, the CRF in the worker
pool, masks (NNN.png) written atomically by the engine's writer threads. Overlay frames (NNN.jpg) and
videos are written by the run as results arrive (`FrameSink`); label and overlay *videos* need frames in
order: results arriving in completion order wait in a reorder buffer (at most `window` frames ahead, at most
REORDER_BYTES; the frame feed waits beyond that, so memory stays flat) and are appended by one writer. Audio is not carried.

A mask folder holds one video's masks: `video.json` in it records the source, its frame count, rate and
size, and another video (another count, rate or size) is refused there unless overwrite is given.
Resume: in a mask folder, frames whose masks exist are not segmented again. Without video outputs the
reader starts at the first missing frame (seeking); with them it decodes the selection from its start and
blends the existing masks (read back from their PNGs) into the overlay, so the video is whole again.
A Ctrl-C finishes the frames in flight, then finalises the videos (playable, holding the frames so far).
A video that cannot be opened, or ends before its declared frame count, is a failed result with its
reason; the frames that decoded are segmented and kept.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DeeplabError, UsageError
from ..io import overlay_image, read_label_image, write_bytes, write_image
from ..video import (
    Frame,
    FrameRange,
    FrameReader,
    FrameSelection,
    InOrder,
    VideoFileWriter,
    VideoInfo,
    existing_frames,
    first_missing,
    frame_digits,
    frame_name,
    is_video_path,
    probe_video,
)
from .engine import run_batch
from .results import report_line
from .inputs import Job, OutputPaths, VideoJob, VideoOutputs, remove_stale_parts

if TYPE_CHECKING:
    from ..pipeline import Segmenter

FOLDER_RECORD = "video.json"  # in a mask folder: which video the masks are of
SAME_VIDEO_KEYS = ("frame_count", "fps", "width", "height")  # what must match for a folder to be resumed
FAILED_LABEL = 255  # a frame whose segmentation failed is void (VOC's ignore label) in a label video
REORDER_BYTES = 1 << 30  # frames (picture + labels) the reorder buffer may hold in the worst case
MAX_FRAME_ERRORS = 5  # per-frame failures kept in a result (the count covers all)


@dataclass(eq=False)
class VideoResult:
    """One video's outcome: status 'done', 'failed' (error says why) or 'skipped'; frame counts; seconds per stage.

    total: frames selected (None when the video declares no frame count); done / failed: segmented in this
    run; skipped: masks already there. frame_errors: (frame index, reason) of the first failed frames.
    """

    job: VideoJob
    status: str = "done"
    error: str | None = None
    info: VideoInfo | None = None
    total: int | None = None
    done: int = 0
    failed: int = 0
    skipped: int = 0
    frame_errors: list[tuple[int, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def report_record(self) -> dict[str, Any]:
        """The --report line: path, outputs, status, error, frames (total, done, failed, skipped), size, fps."""
        outputs = self.job.outputs
        record = report_line(self.job.path, outputs.masks or outputs.labels, self.status, self.error, self.timings)
        record["frames"] = {"total": self.total, "done": self.done, "failed": self.failed, "skipped": self.skipped}
        if self.frame_errors:
            record["frame_errors"] = [{"frame": i, "error": e} for i, e in self.frame_errors]
        if self.info is not None:
            record["size"] = [self.info.width, self.info.height]
            record["fps"] = self.info.fps
        if outputs.overlay:
            record["overlay"] = str(outputs.overlay)
        return record


class FrameSink:
    """What a run writes itself (the engine writes the masks): overlay frames as they come, and the label and
    overlay videos, fed by sequence number from any thread and appended in order."""

    def __init__(self, outputs: VideoOutputs, fps: float, digits: int) -> None:
        self.class_names: list[str] | None = None  # set to draw a legend on overlays (io.overlay_image)
        self.frames = outputs.overlay_frames
        self.digits = digits
        self.labels = VideoFileWriter(outputs.labels, fps, labels=True) if outputs.labels else None
        self.overlay = VideoFileWriter(outputs.overlay_video, fps) if outputs.overlay_video else None
        self._order = InOrder()
        self._cv = threading.Condition()

    @property
    def ordered(self) -> bool:
        """True when there is a video to write (else frames need not be kept or ordered)."""
        return self.labels is not None or self.overlay is not None

    def put(self, seq: int, index: int, image: np.ndarray, labels: np.ndarray | None) -> None:
        """Frame `index`, number seq of this run: image (H, W, 3) RGB, labels (H, W) uint8 (None: it failed)."""
        if self.frames is not None and labels is not None:
            write_image(self.frames / frame_name(index, self.digits, ".jpg"), self._overlay(image, labels))
        if not self.ordered:
            return
        with self._cv:
            for image, labels in self._order.push(seq, (image, labels)):
                if self.labels is not None:
                    self.labels.write(labels if labels is not None else np.full(image.shape[:2], FAILED_LABEL, np.uint8))
                if self.overlay is not None:
                    self.overlay.write(self._overlay(image, labels) if labels is not None else image)
            self._cv.notify_all()

    def _overlay(self, image: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return overlay_image(image, labels, self.class_names)

    def wait_for_room(self, seq: int, window: int, stopping: Callable[[], bool]) -> None:
        """Block the feed while frame seq would be more than window frames ahead of the next to write."""
        with self._cv:
            while seq - self._order.next >= window and not stopping():
                self._cv.wait(timeout=0.1)

    def __enter__(self) -> FrameSink:
        return self

    def __exit__(self, *exc: Any) -> None:
        for writer in (self.labels, self.overlay):
            if writer is not None:
                writer.__exit__(*exc)


def claim_mask_folder(folder: Path, info: VideoInfo, overwrite: bool = False) -> None:
    """Record in folder/video.json which video its masks are of; DeeplabError when it holds another video's
    (another frame count, rate or size), unless overwrite."""
    path = folder / FOLDER_RECORD
    record = {"source": str(info.path), "frame_count": info.frame_count, "fps": info.fps, "width": info.width,
              "height": info.height}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None  # none yet (or unreadable: rewritten)
    if isinstance(old, dict) and not overwrite and any(old.get(k) != record[k] for k in SAME_VIDEO_KEYS):
        raise DeeplabError(f"{folder}: holds the masks of another video ({old.get('source')}: "
                           f"{old.get('frame_count')} frames of {old.get('width')}×{old.get('height')} at "
                           f"{old.get('fps')} fps); choose another folder, or --overwrite to replace them")
    if old != record:
        write_bytes(path, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def is_video_complete(job: VideoJob, info: VideoInfo) -> bool:
    """True when every output exists: each selected frame's mask (and overlay frame), the video files."""
    outputs = job.outputs
    if any(not p.exists() for p in (outputs.labels, outputs.overlay_video) if p is not None):
        return False
    selected = job.selection.resolve(info.fps).indices(info.frame_count)
    if selected is None:
        return outputs.masks is None and outputs.overlay_frames is None
    for folder, suffix in ((outputs.masks, ".png"), (outputs.overlay_frames, ".jpg")):
        if folder is not None and not set(selected) <= existing_frames(folder, suffix):
            return False
    return True


def segment_video(
    segmenter: Segmenter | Callable[[], Segmenter],
    job: VideoJob,
    overwrite: bool = False,
    info: VideoInfo | None = None,
    progress: Callable[[VideoResult], None] | None = None,
    window: int | None = None,
    **options: Any,
) -> VideoResult:
    """Segment the selected frames of a video into job.outputs through batch.run_batch (options: its options).

    segmenter may be a callable building it, so a video with nothing left to do never loads the model.
    overwrite: redo frames whose masks exist (default: resume). progress(result) is called once the frames
    are counted and after every frame. window: frames the reorder buffer of video outputs may run ahead
    (default: REORDER_BYTES worth, 8 to 64). Failures (unreadable file, truncated stream, failed frames) are in
    the result, never raised; a selection that cannot be resolved (times without a frame rate) raises UsageError.
    """
    t0 = time.perf_counter()
    result = VideoResult(job)
    try:
        info = info or probe_video(job.path)
    except DeeplabError as exc:
        result.status, result.error = "failed", str(exc).removeprefix(f"{job.path}: ")
        return result
    result.info = info
    frames = job.selection.resolve(info.fps)
    selected = frames.indices(info.frame_count)
    result.total = len(selected) if selected is not None else None
    outputs = job.outputs
    digits = frame_digits(info.frame_count)
    done: set[int] = set()
    if not overwrite and (outputs.masks or outputs.overlay_frames):
        folders = [(f, s) for f, s in ((outputs.masks, ".png"), (outputs.overlay_frames, ".jpg")) if f is not None]
        done = set.intersection(*(existing_frames(f, s) for f, s in folders))
    try:
        if outputs.masks is not None:
            claim_mask_folder(outputs.masks, info, overwrite)
    except DeeplabError as exc:
        result.status, result.error = "failed", str(exc)
        return result
    remove_stale_parts([p for p in (outputs.masks, outputs.overlay_frames) if p is not None]
                       + [p.parent for p in (outputs.labels, outputs.overlay_video) if p is not None])
    sink = FrameSink(outputs, info.fps / frames.step if info.fps > 0 else 0.0, digits)
    window = window or max(8, min(64, REORDER_BYTES // (4 * info.width * info.height)))  # RGB + labels
    if not sink.ordered:
        resume_at = first_missing(frames, done, info.frame_count)
        if resume_at is None:  # only when the selection's end is known
            result.status, result.skipped = "skipped", len(selected or ())
            return result
        result.skipped = sum(1 for i in done if i in FrameRange(frames.start, resume_at, frames.step))
        frames = frames.from_index(resume_at)
    if progress:
        progress(result)

    def job_for(seq: int, frame: Frame) -> Job:
        paths = OutputPaths(outputs.masks / frame_name(frame.index, digits)) if outputs.masks else None
        return Job(job.path, paths, tag=(seq, frame.index), image=frame.image)

    reader = FrameReader(job.path, frames, info.frame_count)
    run: Any = None

    def feed() -> Iterator[Job]:
        for seq, frame in enumerate(reader):  # seq: the frame's place in this run's order
            result.timings["decode"] = result.timings.get("decode", 0.0) + frame.seconds
            if sink.ordered:
                sink.wait_for_room(seq, window, lambda: run.stopping)
                if run.stopping:
                    return
            if frame.index in done:
                result.skipped += 1
                if sink.ordered:
                    sink.put(seq, frame.index, frame.image, _read_mask(outputs.masks / frame_name(frame.index, digits))
                             if outputs.masks else None)
                if progress:
                    progress(result)
                continue
            yield job_for(seq, frame)

    seg = segmenter() if callable(segmenter) else segmenter
    if outputs.legend:
        sink.class_names = seg.class_names
    run = run_batch(seg, feed(), **options)
    with sink, reader, contextlib.closing(run):
        for frame_result in run:
            seq, index = frame_result.job.tag
            if frame_result.ok:
                result.done += 1
            else:
                result.failed += 1
                if len(result.frame_errors) < MAX_FRAME_ERRORS:
                    result.frame_errors.append((index, frame_result.error or "failed"))
            for stage, seconds in frame_result.timings.items():  # decode: the reader's, counted in feed()
                if stage != "decode":
                    result.timings[stage] = result.timings.get(stage, 0.0) + seconds
            sink.put(seq, index, frame_result.job.image, frame_result.labels)
            if progress:
                progress(result)
        result.interrupted = run.interrupted
    result.wall = time.perf_counter() - t0
    if reader.error:
        result.error = reader.error
    elif result.failed:
        index, reason = result.frame_errors[0]
        result.error = f"{result.failed} frame(s) failed; frame {index}: {reason}"
    if result.error:
        result.status = "failed"
    return result


def process_video(segmenter: Segmenter | Callable[[], Segmenter], job: VideoJob, overwrite: bool = False,
                  progress: Callable[[VideoResult], None] | None = None, **options: Any) -> VideoResult:
    """What `deeplab batch` does with one video: probe it, skip it when its outputs are complete, else
    segment_video (options: its options). Every failure, a selection it cannot resolve included, is a result."""
    try:
        info = probe_video(job.path)
        if not overwrite and is_video_complete(job, info):
            total = len(job.selection.resolve(info.fps).indices(info.frame_count) or ())
            return VideoResult(job, "skipped", info=info, total=total, skipped=total)
        return segment_video(segmenter, job, overwrite, info, progress, **options)
    except DeeplabError as exc:
        return VideoResult(job, "failed", str(exc).removeprefix(f"{job.path}: "))


def _read_mask(path: Path) -> np.ndarray | None:
    """A mask written by an earlier run, for the overlay; None if it cannot be read (the frame shows unblended)."""
    try:
        return read_label_image(path)
    except DeeplabError:
        return None


def plan_video(source: str | Path, output: str, overlay: str | None = None, save_probs: str | None = None,
               legend: bool = True, selection: FrameSelection = FrameSelection()) -> tuple[VideoJob, VideoInfo]:
    """`deeplab segment VIDEO -o OUT [--overlay OV]` → the job and the probed video (before any model is loaded).

    -o / --overlay with a video extension name a file, else a folder. UsageError for '-', an image extension
    (a video gives one mask per frame), a lossy label video, an output that is the input, --save-probs, or a
    selection that picks no frame; DeeplabError for a video that cannot be opened.
    """
    from ..io import STDIO, is_image_path
    from ..video import check_label_video_size, check_video_output

    if save_probs:
        raise UsageError("--save-probs is for images; for a video use -o DIR (masks) or -o OUT.mkv (labels)")

    def target(text: str, what: str, labels: bool) -> Path:
        if text == STDIO:
            raise UsageError(f"a video gives one {what} per frame: {what}s cannot go to stdout; name a folder or a video")
        path = Path(text)
        if is_video_path(path):
            check_video_output(path, labels)
        elif is_image_path(path):
            example = "clip_masks/ or clip_labels.mkv" if labels else "clip_overlay/ or clip_overlay.mp4"
            raise UsageError(f"{text}: a video gives one {what} per frame; name a folder or a video ({example})")
        elif path.exists() and not path.is_dir():
            raise UsageError(f"{text}: exists and is not a folder")
        if path.resolve() == Path(source).resolve():
            raise UsageError(f"{text}: refusing to overwrite the input video")
        return path

    out = target(output, "mask", labels=True)
    ov = target(overlay, "overlay", labels=False) if overlay else None
    if ov is not None and ov.resolve() == out.resolve():
        raise UsageError(f"{overlay}: -o and --overlay name the same place")
    outputs = VideoOutputs(masks=None if is_video_path(out) else out, labels=out if is_video_path(out) else None,
                           overlay=ov, legend=legend)
    info = probe_video(source)
    selection.resolve(info.fps)
    if outputs.labels is not None:
        check_label_video_size(outputs.labels, info.height, info.width)
    return VideoJob(Path(source), outputs, selection), info
