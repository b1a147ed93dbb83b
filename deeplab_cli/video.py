"""Video files through OpenCV's FFmpeg (bundled in the opencv-python-headless wheel): probe, pick, decode, write.

    info = probe_video("clip.mp4")                         # frame count, fps, size as displayed, rotation
    frames = FrameSelection(parse_time("10s"), parse_time("1m"), every=5).resolve(info.fps)
    with FrameReader("clip.mp4", frames, info.frame_count) as reader:
        for frame in reader:                               # Frame(index, image (H, W, 3) uint8 RGB), in order
            ...
    reader.error                                           # None, or why decoding stopped early (truncated file)

Reading: frames are decoded on their own thread into a bounded queue, so decoding overlaps the network and
memory stays flat. Rotation metadata is applied by OpenCV (CAP_PROP_ORIENTATION_AUTO, on by default):
frames and sizes are as a player displays them. A frame's time is index / fps (constant frame rate).
A file whose stream ends before the frame count its container declares is reported as truncated; the
frames decoded before that point are delivered as usual.

Writing: masks as palette PNGs named by frame index (`frame_name`), zero-padded to the digits of the
frame count so the names sort in order; a lossless label video (class index per pixel as gray levels:
FFV1 in .mkv/.avi, PNG in .mov, each verified by reading it back in the tests); an overlay video (mp4v in
.mp4/.m4v/.mov/.mkv, Motion JPEG in .avi). Video files are written under a temporary name with the same
extension (FFmpeg picks the container by it) and renamed when finalised. Audio is not carried. OpenCV's
writer keeps even sizes only: an overlay of odd-sized frames loses its last row or column, and a label video
of such frames is refused (check_label_video_size).

Torch-free: cv2 and numpy only.
"""

from __future__ import annotations

import math
import os
import queue
import re
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DeeplabError, UsageError
from .io import atomic_path

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".wmv",
                              ".flv", ".3gp"})
# Codecs per output extension, as FFmpeg's fourcc tags. Label videos must be lossless (tests read them back).
LABEL_VIDEO_CODECS = {".mkv": "FFV1", ".avi": "FFV1", ".mov": "png "}
OVERLAY_VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
FALLBACK_FPS = 25.0  # for writing videos whose source declares no frame rate
DEFAULT_DIGITS = 6  # frame-name width when the frame count is unknown
# Containers without a frame count (mkv, webm) give one estimated from duration × fps, which may be one off.
FRAME_COUNT_SLACK = 1
SEEK_MIN_FRAMES = 300  # skip this many frames or more by seeking (checked) rather than decoding them
_FRAME_FILE = re.compile(r"^(\d+)(\.[^.]+)$")


def _cv2() -> Any:
    """cv2 with OpenCV's and FFmpeg's own logging off: errors reach the user as our one-line messages."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # read when FFmpeg is first used
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    return cv2


def is_video_path(path: str | os.PathLike) -> bool:
    """True when the file name has a video extension we decode."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


# ---------------------------------------------------------------------------------------------
# Probing


@dataclass(frozen=True)
class VideoInfo:
    """What a video declares: frames (None when unknown), fps (0.0 when unknown), size as displayed, rotation."""

    path: Path
    frame_count: int | None
    fps: float
    width: int
    height: int
    rotation: int = 0  # degrees the stored frames are turned to display them (metadata; already applied)
    codec: str = ""

    @property
    def duration(self) -> float | None:
        """Seconds, from the frame count and rate (None when either is unknown)."""
        return self.frame_count / self.fps if self.frame_count is not None and self.fps > 0 else None


def open_capture(path: str | os.PathLike) -> Any:
    """An opened cv2.VideoCapture on FFmpeg; UsageError when the file is missing, DeeplabError when unreadable."""
    cv2 = _cv2()
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise DeeplabError(f"{path}: is a directory, not a video")
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        detail = "empty file (0 bytes)" if path.stat().st_size == 0 else \
            "cannot open video (not a video, an unsupported codec, or truncated before its index)"
        raise DeeplabError(f"{path}: {detail}")
    return cap


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Open a video and read its frame count, frame rate, displayed size, rotation and codec."""
    cv2 = _cv2()
    cap = open_capture(path)
    try:
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        fps = cap.get(cv2.CAP_PROP_FPS)
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC))
        info = VideoInfo(
            Path(path),
            int(round(count)) if math.isfinite(count) and count > 0 else None,
            float(fps) if math.isfinite(fps) and 0 < fps < 1000 else 0.0,
            int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            int(cap.get(cv2.CAP_PROP_ORIENTATION_META)) % 360,
            fourcc.to_bytes(4, "little").decode("ascii", "replace").strip("\0 ") if fourcc > 0 else "",
        )
    finally:
        cap.release()
    if info.width <= 0 or info.height <= 0:
        raise DeeplabError(f"{path}: the video has no picture size (no video stream?)")
    return info


# ---------------------------------------------------------------------------------------------
# Choosing frames: --start / --end / --every


@dataclass(frozen=True)
class TimePoint:
    """A point in a video, given in seconds or as a frame index."""

    seconds: float | None = None
    frame: int | None = None

    def to_frame(self, fps: float) -> int:
        """The index of the first frame at or after this point (a frame's time is index / fps)."""
        if self.frame is not None:
            return self.frame
        if fps <= 0:
            raise UsageError("the video declares no frame rate: give --start/--end as frame numbers (e.g. 250f)")
        return max(0, math.ceil(self.seconds * fps - 1e-6))

    def __str__(self) -> str:
        return f"{self.frame}f" if self.frame is not None else f"{self.seconds:g}s"


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER_UNIT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|min|m|h|f)?$")
_CLOCK = re.compile(r"^(?:(\d+):)?(\d+):(\d+(?:\.\d*)?)$")


def parse_time(text: str) -> TimePoint:
    """'250f' (frame), '10s', '1.5s', '500ms', '2m', '1h', '1:02.5' (m:s), '1:00:02' (h:m:s), '12.5' (seconds)."""
    spec = text.strip().lower()
    match = _NUMBER_UNIT.match(spec)
    if match:
        value, unit = match.groups()
        if unit == "f":
            if "." in value:
                raise ValueError(f"{text!r}: a frame number is a whole number (e.g. 250f)")
            return TimePoint(frame=int(value))
        return TimePoint(seconds=float(value) * _UNITS[unit or "s"])
    match = _CLOCK.match(spec)
    if match:
        hours, minutes, seconds = match.groups()
        if (hours is not None and int(minutes) >= 60) or float(seconds) >= 60:
            raise ValueError(f"{text!r}: minutes and seconds of a clock time are below 60")
        return TimePoint(seconds=int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds))
    raise ValueError(f"{text!r}: not a time; use e.g. 10s, 1m, 1:02.5, 1:00:00 or a frame number like 250f")


@dataclass(frozen=True)
class FrameRange:
    """Frame indices start, start + step, … below stop (None: to the end of the video)."""

    start: int = 0
    stop: int | None = None
    step: int = 1

    def __contains__(self, index: int) -> bool:
        return index >= self.start and (self.stop is None or index < self.stop) and (index - self.start) % self.step == 0

    def limit(self, frame_count: int | None) -> int | None:
        """Where the selection ends in a video of frame_count frames: stop or the count (None when both are unknown)."""
        known = [x for x in (self.stop, frame_count) if x is not None]
        return min(known) if known else None

    def indices(self, frame_count: int | None) -> range | None:
        """The selected indices in a video of frame_count frames (None when both the count and stop are unknown)."""
        stop = self.limit(frame_count)
        return None if stop is None else range(self.start, max(stop, self.start), self.step)

    def from_index(self, index: int) -> FrameRange:
        """The same selection, from the first selected frame at or after index on."""
        start = self.start if index <= self.start else self.start + -(-(index - self.start) // self.step) * self.step
        return FrameRange(start, self.stop, self.step)


@dataclass(frozen=True)
class FrameSelection:
    """What --start, --end (exclusive) and --every ask for, resolved against a video's frame rate."""

    start: TimePoint | None = None
    end: TimePoint | None = None
    every: int = 1

    def resolve(self, fps: float) -> FrameRange:
        """The frames this selection picks in a video of this frame rate; UsageError when none can be."""
        if self.every < 1:
            raise UsageError("--every must be at least 1")
        start = self.start.to_frame(fps) if self.start else 0
        stop = self.end.to_frame(fps) if self.end else None
        if stop is not None and stop <= start:
            raise UsageError(f"--end {self.end} is not after --start {self.start or '0s'}: no frames selected")
        return FrameRange(start, stop, self.every)

    @classmethod
    def parse(cls, start: str | None = None, end: str | None = None, every: int = 1) -> FrameSelection:
        """From the texts of --start and --end (see parse_time) and --every; UsageError naming the bad option."""
        points = []
        for option, text in (("--start", start), ("--end", end)):
            try:
                points.append(None if text is None else parse_time(text))
            except ValueError as exc:
                raise UsageError(f"{option} {exc}") from None
        return cls(points[0], points[1], every)


# ---------------------------------------------------------------------------------------------
# Decoding on a thread


@dataclass(eq=False)
class Frame:
    """One decoded frame: its index in the video and the picture (H, W, 3) uint8 RGB as displayed."""

    index: int
    image: np.ndarray
    seconds: float = 0.0  # decoding it, and the frames skipped since the previous one


_END = object()


class FrameReader:
    """Decode the selected frames of a video on a background thread into a bounded queue; iterate them in order.

    After the iteration, `error` says why decoding stopped early (None when the selection was read to its
    end) and `position` is the index of the first frame not reached. Iterate once; close() stops the thread.
    """

    def __init__(self, path: str | os.PathLike, frames: FrameRange = FrameRange(), frame_count: int | None = None,
                 queue_size: int = 4) -> None:
        self.path = Path(path)
        self.frames = frames
        self.frame_count = frame_count
        self.error: str | None = None
        self.position = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        if self._thread is not None:
            raise RuntimeError("a FrameReader can be iterated only once")
        self._thread = threading.Thread(target=self._decode, name="deeplab-video-decode", daemon=True)
        self._thread.start()
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set() and not self._thread.is_alive():
                    return
                continue
            if item is _END:
                return
            yield item

    def close(self) -> None:
        """Stop decoding and wait for the thread (frames still queued are dropped)."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _decode(self) -> None:
        cv2 = _cv2()
        cap = None
        try:
            cap = open_capture(self.path)
            frames, pos = self.frames, 0
            if frames.start >= SEEK_MIN_FRAMES:
                cap, pos = self._seek(cap, frames.start)
            ended, t0 = False, time.perf_counter()
            while not self._stop.is_set() and (frames.stop is None or pos < frames.stop):
                if not cap.grab():
                    ended = True
                    break
                if pos in frames:
                    ok, bgr = cap.retrieve()
                    if not ok or bgr is None:
                        self.error = f"frame {pos} cannot be decoded (corrupt file?); the frames before it were kept"
                        break
                    frame = Frame(pos, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), time.perf_counter() - t0)
                    if not self._put(frame):
                        break
                    t0 = time.perf_counter()
                pos += 1
                self.position = pos
            expected = frames.limit(self.frame_count)
            if ended and expected is not None and pos < expected - FRAME_COUNT_SLACK:
                self.error = (f"the video ends at frame {pos} although it declares {self.frame_count} frames "
                              f"(truncated or corrupt file); the frames before it were kept")
        except DeeplabError as exc:
            self.error = str(exc).removeprefix(f"{self.path}: ")
        except Exception as exc:  # noqa: BLE001 - a decoder failure is this file's failure, reported by the caller
            self.error = f"decoding failed: {' '.join(str(exc).split()) or type(exc).__name__}"
        finally:
            if cap is not None:
                cap.release()
            self._put(_END)

    def _seek(self, cap: Any, target: int) -> tuple[Any, int]:
        """Seek to frame target; when OpenCV cannot say it landed exactly there, reopen and decode from 0."""
        cv2 = _cv2()
        if cap.set(cv2.CAP_PROP_POS_FRAMES, target) and int(round(cap.get(cv2.CAP_PROP_POS_FRAMES))) == target:
            self.position = target
            return cap, target
        cap.release()
        return open_capture(self.path), 0


# ---------------------------------------------------------------------------------------------
# Frame folders: names, resume


def frame_digits(frame_count: int | None) -> int:
    """Zero-padding of frame names: the digits of the frame count (6 when unknown), so names sort in order."""
    return len(str(frame_count)) if frame_count else DEFAULT_DIGITS


def frame_name(index: int, digits: int, suffix: str = ".png") -> str:
    """'000123.png' for index 123 with 6 digits."""
    return f"{index:0{digits}d}{suffix}"


def existing_frames(folder: str | os.PathLike, suffix: str = ".png") -> set[int]:
    """Indices of the non-empty frame files (NNN.suffix) in folder (outputs are only ever renamed in whole)."""
    found = set()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return found
    for entry in entries:
        match = _FRAME_FILE.match(entry.name)
        if match and match.group(2) == suffix:
            try:
                if entry.stat().st_size > 0:
                    found.add(int(match.group(1)))
            except OSError:
                continue
    return found


def first_missing(frames: FrameRange, done: set[int], frame_count: int | None) -> int | None:
    """The first selected frame not in done (where a rerun resumes); None when every selected frame is done."""
    index = frames.start
    while index in done:
        index += frames.step
    limit = frames.limit(frame_count)
    return None if limit is not None and index >= limit else index


# ---------------------------------------------------------------------------------------------
# Video files out


def check_video_output(path: str | os.PathLike, labels: bool) -> None:
    """UsageError unless the extension names a container we write (lossless ones only for label videos)."""
    table = LABEL_VIDEO_CODECS if labels else OVERLAY_VIDEO_CODECS
    if Path(path).suffix.lower() not in table:
        what = "a lossless label video" if labels else "an overlay video"
        raise UsageError(f"{path}: {what} is written as {', '.join(sorted(table))}")


def check_label_video_size(path: str | os.PathLike, height: int, width: int) -> None:
    """DeeplabError unless height and width are even: OpenCV's FFmpeg writer drops an odd last row or column,
    which an overlay can lose but a label video cannot."""
    if height % 2 or width % 2:
        raise DeeplabError(f"{path}: OpenCV writes videos of even width and height only, and frames of "
                           f"{width}×{height} would lose a row or column; write the masks to a folder (-o DIR)")


class VideoFileWriter:
    """Frames in order to a video file at fps, under a temporary name; close() finalises the container and renames it.

    labels=True: (H, W) uint8 class indices as gray levels in a lossless codec; else (H, W, 3) uint8 RGB.
    The size comes from the first frame. close(), a clean exit from a `with` block and an exit by Ctrl-C
    (KeyboardInterrupt) keep what was written, finalised, so an interrupted run leaves a playable video;
    any other exception deletes the temporary file.
    """

    def __init__(self, path: str | os.PathLike, fps: float, labels: bool = False) -> None:
        check_video_output(path, labels)
        self.path = Path(path)
        self.fps = fps if fps > 0 else FALLBACK_FPS
        self.labels = labels
        self.frames = 0
        self._writer: Any = None
        self._size: tuple[int, int] | None = None
        self._stack = ExitStack()

    def __enter__(self) -> VideoFileWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._release()
        if exc_type is KeyboardInterrupt:
            self._stack.close()
        else:
            self._stack.__exit__(exc_type, exc, tb)

    def write(self, frame: np.ndarray) -> None:
        """Append one frame: labels (H, W) uint8, or an image (H, W, 3) uint8 RGB."""
        cv2 = _cv2()
        height, width = frame.shape[:2]
        if self._writer is None:
            if self.labels:
                check_label_video_size(self.path, height, width)
            tmp = self._stack.enter_context(atomic_path(self.path, keep_suffix=True))
            codec = (LABEL_VIDEO_CODECS if self.labels else OVERLAY_VIDEO_CODECS)[self.path.suffix.lower()]
            writer = cv2.VideoWriter(str(tmp), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*codec), self.fps,
                                     (width, height), not self.labels)
            if not writer.isOpened():
                raise DeeplabError(f"{self.path}: OpenCV cannot write {codec.strip()} video here")
            self._writer, self._size = writer, (height, width)
        elif (height, width) != self._size:
            raise DeeplabError(f"{self.path}: frame of {width}×{height} in a video of {self._size[1]}×{self._size[0]}")
        if self.labels:
            self._writer.write(np.ascontiguousarray(frame, dtype=np.uint8))
        else:
            self._writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def _release(self) -> None:
        if self._writer is not None:
            self._writer.release()  # writes the container's index: the file is playable from here on
            self._writer = None

    def close(self) -> None:
        """Finalise and rename onto the path (nothing is written when no frame was)."""
        self._release()
        self._stack.close()


def read_label_video(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """The frames of a label video as (H, W) uint8 class indices."""
    cap = open_capture(path)
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            yield np.ascontiguousarray(frame[..., 0] if frame.ndim == 3 else frame)
    finally:
        cap.release()


# ---------------------------------------------------------------------------------------------
# Ordered output


class InOrder:
    """Values arriving by sequence number in any order, released in order: push(0..n-1) → the run now due."""

    def __init__(self) -> None:
        self.next = 0
        self._waiting: dict[int, Any] = {}

    def push(self, seq: int, value: Any) -> list[Any]:
        """Add value number seq; return the values that are now next in order (possibly none)."""
        self._waiting[seq] = value
        due = []
        while self.next in self._waiting:
            due.append(self._waiting.pop(self.next))
            self.next += 1
        return due

    @property
    def held(self) -> int:
        """Values waiting for an earlier one."""
        return len(self._waiting)
