"""What `deeplab batch` does with a planned tree of jobs: skip the complete ones, clear what a killed run left,
stream the rest through the engine, write the --report, and sum it all up (`BatchSummary`). Images go first,
in one stream; then each video in turn (batch.videos), one --report line per video.

Progress reaches the caller through callbacks (the command draws the bar and the summary table, console.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..io import atomic_path
from ..stages import BATCH_STAGES as STAGES
from .engine import run_batch
from .results import ImageResult, skipped_result
from .inputs import Job, VideoJob, is_complete, remove_stale_parts
from .videos import VideoResult, process_video

if TYPE_CHECKING:
    from ..pipeline import Segmenter


@dataclass
class BatchSummary:
    """Images done / skipped, failures of images and videos (path, reason), per-stage seconds summed over images
    and frames, wall seconds; videos by status and their frames segmented / failed / already done."""

    total: int = 0  # inputs: images and videos
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    wall: float = 0.0
    interrupted: bool = False
    videos: dict[str, int] = field(default_factory=lambda: {"done": 0, "skipped": 0, "failed": 0})
    frames: dict[str, int] = field(default_factory=lambda: {"done": 0, "failed": 0, "skipped": 0})

    @property
    def started(self) -> int:
        """Inputs finished, skipped or failed (the rest were not started, after an interrupt)."""
        return self.done + self.skipped + len(self.failed) + self.videos["done"] + self.videos["skipped"]

    @property
    def exit_code(self) -> int:
        """130 when interrupted, 1 when any image failed, else 0."""
        return 130 if self.interrupted else (1 if self.failed else 0)

    def add(self, result: ImageResult | VideoResult) -> None:
        if isinstance(result, VideoResult):
            self.videos[result.status] += 1
            for key in self.frames:
                self.frames[key] += getattr(result, key)
            self.wall += result.wall
        elif result.status == "done":
            self.done += 1
        elif result.status == "skipped":
            self.skipped += 1
        if result.status == "failed":
            self.failed.append((str(result.job.path), result.error or "failed"))
        for stage, seconds in result.timings.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds


class ReportWriter:
    """--report FILE: one JSON line per input, written to a temporary name and renamed when closed."""

    def __init__(self, path: str | None) -> None:
        self._stack = contextlib.ExitStack()
        self._file = None
        if path:
            tmp = self._stack.enter_context(atomic_path(path))
            self._file = self._stack.enter_context(open(tmp, "w", encoding="utf-8", errors="backslashreplace"))

    def write(self, result: ImageResult | VideoResult) -> None:
        if self._file is not None:
            self._file.write(json.dumps(result.report_record(), ensure_ascii=False) + "\n")

    def close(self) -> None:
        with interrupts_deferred():  # a Ctrl-C now would delete the temporary file instead of renaming it
            self._stack.close()  # kept even after an abort: it is the record of what was done


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back SIGINT for the block, then deliver it to the previous handler (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, None)


def exit_on_next_interrupt(code: int = 130) -> None:
    """From now on a Ctrl-C ends the process at once with `code`: for a command whose run is over, so an
    interrupt during interpreter shutdown gives no traceback (unfinished writes leave only temporary files)."""

    def handler(signum: int, frame: Any) -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)


def segment_tree(
    jobs: Sequence[Job | VideoJob],
    segmenter: Segmenter | Callable[[], Segmenter] | None,
    overwrite: bool = False,
    report: str | None = None,
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[ImageResult, BatchSummary], None] | None = None,
    on_video: Callable[[VideoJob], Callable[[VideoResult], None] | None] | None = None,
    on_video_result: Callable[[VideoResult, BatchSummary], None] | None = None,
    engine: Callable[[list[Job]], Any] | None = None,
    **options: Any,
) -> BatchSummary:
    """Run `deeplab batch` over planned jobs (images, then videos): skip complete ones, stream the rest, write
    the report.

    segmenter may be a callable building it, so a run with nothing to do never loads the model.
    on_start(images to segment) is called before the first, on_result(result, summary so far) after each
    streamed image; on_video(job) before each video returns its progress callback (see segment_video),
    on_video_result(result, summary) follows it. options are run_batch's (on_interrupt included). engine(jobs
    to do), when given, replaces run_batch for the images: it returns a run like BatchRun's (iterable of
    ImageResult, `wall`, `interrupted`, `close()`), e.g. ray_engine.RayRun; videos run on the local engine only
    and are refused with it (UsageError).
    """
    summary = BatchSummary(total=len(jobs))
    built: list[Segmenter] = []

    def get_segmenter() -> Segmenter:
        if not built:
            built.append(segmenter() if callable(segmenter) else segmenter)
        return built[0]

    todo: list[Job] = []
    skipped: list[Job] = []
    videos = [job for job in jobs if isinstance(job, VideoJob)]
    if videos and engine is not None:
        raise UsageError(f"{videos[0].path}: videos run on the local engine only; segment them without --engine ray")
    for job in jobs:
        if isinstance(job, Job):
            (skipped if not overwrite and is_complete(job) else todo).append(job)
    remove_stale_parts({job.outputs.mask.parent for job in todo if job.outputs})
    out = ReportWriter(report)
    try:
        for job in skipped:
            result = skipped_result(job)
            summary.add(result)
            out.write(result)
        if todo:
            if engine is not None:
                run = engine(todo)
            else:
                run = run_batch(get_segmenter(), todo, **options)
            if on_start:
                on_start(len(todo))
            with contextlib.closing(run):
                for result in run:
                    summary.add(result)
                    out.write(result)
                    if on_result:
                        on_result(result, summary)
            summary.wall = run.wall
            summary.interrupted = run.interrupted
        for video in videos:
            if summary.interrupted:
                break
            result = process_video(get_segmenter, video, overwrite, on_video(video) if on_video else None, **options)
            summary.add(result)
            out.write(result)
            summary.interrupted = result.interrupted
            if on_video_result:
                on_video_result(result, summary)
    finally:
        out.close()
    return summary
