"""Everything the commands show people, with rich: progress bars, tables, summaries (all on stderr except
`evaluate`'s results table). The library modules report progress through callbacks; this module turns
them into bars, and `cli.py` stays a thin parser.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from .evaluate import Evaluation, evaluate
from .stages import BATCH_STAGES

if TYPE_CHECKING:
    from .batch import BatchSummary, ImageResult, VideoJob, VideoResult
    from .evaluate import Dataset
    from .pipeline import Segmenter
    from .refine import FolderPlan
    from .video import FrameSelection

INTERRUPTED = "[yellow]interrupted: finishing the {} in flight (Ctrl-C again to abort)[/]"


def stderr_console() -> Console:
    """A rich console on stderr (progress, logs, tables meant for people)."""
    return Console(stderr=True, soft_wrap=True)  # a long path stays on one line


def stdout_console() -> Console:
    """A rich console on stdout, for tables that are the command's data (`evaluate`, `weights list`)."""
    return Console(highlight=False)


def say(console: Console, message: str) -> None:
    """One plain line `deeplab: message` (no markup, no highlighting)."""
    console.print(f"deeplab: {message}", markup=False, highlight=False)


def on_interrupt(console: Console, what: str = "images") -> Callable[[], None]:
    """The engine's on_interrupt callback: say that a first Ctrl-C finishes the images (frames) in flight."""
    return lambda: console.print(INTERRUPTED.format(what))


class _Bar:
    """A rich Progress started on demand and stopped on exit (a context manager)."""

    def __init__(self) -> None:
        self.progress: Progress | None = None

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.progress is not None:
            self.progress.stop()


# ---------------------------------------------------------------------------------------------
# deeplab batch


class BatchProgress(_Bar):
    """segment_tree's callbacks as live bars: images done/total, images/s, ETA, failures (on_start, on_result);
    then one bar per video in frames (on_video, also what `deeplab segment VIDEO` shows)."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        super().__init__()
        self.console, self.enabled = console, enabled

    def _started(self) -> Progress:
        if self.progress is None:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                       TextColumn("{task.fields[failures]}"))
            self.progress = Progress(*columns, console=self.console, disable=not self.enabled, transient=False)
            self.progress.start()
        return self.progress

    def on_start(self, total: int) -> None:
        self.task = self._started().add_task("segmenting", total=total, rate="", failures="")
        self.t0 = time.perf_counter()
        self.count = 0

    def on_result(self, result: ImageResult, summary: BatchSummary) -> None:
        self.count += 1
        elapsed = time.perf_counter() - self.t0
        self.progress.update(self.task, advance=1, rate=f"{self.count / elapsed:.2f} img/s" if elapsed > 0 else "",
                             failures=f"[red]{len(summary.failed)} failed[/]" if summary.failed else "")


    def on_video(self, job: VideoJob) -> Callable[[VideoResult], None]:
        """A bar for one video: the progress callback of batch.segment_video (frames, frames/s, ETA)."""
        progress = self._started()
        task = progress.add_task(f"{job.path.name} (frames)", total=None, rate="", failures="")
        started: list[float] = []

        def update(result: VideoResult) -> None:
            if not started:  # frames already done count as completed from the start, not in the speed
                started.append(time.perf_counter())
                progress.reset(task, total=result.total, completed=result.skipped)
                return
            elapsed = time.perf_counter() - started[0]
            segmented = result.done + result.failed
            progress.update(task, total=result.total, completed=segmented + result.skipped,
                            rate=f"{segmented / elapsed:.2f} frames/s" if elapsed > 0 and segmented else "",
                            failures=f"[red]{result.failed} failed[/]" if result.failed else "")

        return update


def segment_video_file(source: str, output: str, overlay: str | None, save_probs: str | None, overwrite: bool,
                       selection: FrameSelection, legend: bool, segmenter: Callable[[], Segmenter],
                       **pipeline: Any) -> int:
    """`deeplab segment VIDEO`: plan (fail fast, before the model loads), batch.segment_video with a bar in frames,
    its closing line; returns the exit code (130 interrupted, 1 failed, 0). pipeline: run_batch's options."""
    from .batch import exit_on_next_interrupt, segment_video
    from .batch.videos import plan_video

    job, info = plan_video(source, output, overlay, save_probs, legend, selection)
    console = stderr_console()
    try:
        with BatchProgress(console) as bar:
            result = segment_video(segmenter, job, overwrite, info, bar.on_video(job),
                                   on_interrupt=on_interrupt(console, "frames"), **pipeline)
    finally:
        exit_on_next_interrupt(130)  # the run is over (or aborted): another Ctrl-C just ends the process
    say(console, describe_video(result))
    return 130 if result.interrupted else 0 if result.ok else 1


def describe_video(result: VideoResult) -> str:
    """One line for people: frames segmented / failed / already done, seconds, frames/s, where, the error."""
    if result.info is None:
        return f"{result.job.path}: {result.error}"
    if result.status == "skipped":
        return f"{result.job.path}: all {result.total} frames already done"
    where = ", ".join(str(p) for p in result.job.outputs.paths())
    total = "?" if result.total is None else str(result.total)
    segmented = result.done + result.failed
    rate = f", {segmented / result.wall:.2f} frames/s" if result.wall > 0 and segmented else ""
    text = (f"{result.job.path}: {result.done} of {total} frames segmented, {result.failed} failed, "
            f"{result.skipped} already done ({result.wall:.1f} s{rate}) → {where}")
    return text + (f"; error: {result.error}" if result.error else "")


def print_summary(summary: BatchSummary, console: Console | None = None, max_failures: int = 20) -> None:
    """The summary on stderr: images (and videos, frames) done / skipped / failed, seconds per stage, wall time,
    rate, failures."""
    console = console or stderr_console()
    table = Table(title="deeplab batch", title_justify="left", header_style="bold")
    table.add_column("")
    table.add_column("count / seconds", justify="right")
    table.add_column("seconds per image", justify="right")
    videos, frames = sum(summary.videos.values()), summary.frames
    table.add_row("done", str(summary.done), "")
    table.add_row("skipped", str(summary.skipped), "")
    failed_images = len(summary.failed) - summary.videos["failed"]
    table.add_row("failed", str(failed_images), "", style="red" if failed_images else None)
    if videos:
        table.add_section()
        table.add_row("videos done / skipped", f"{summary.videos['done']} / {summary.videos['skipped']}", "")
        table.add_row("videos failed", str(summary.videos["failed"]), "", style="red" if summary.videos["failed"] else None)
        table.add_row("frames segmented / failed", f"{frames['done']} / {frames['failed']}", "",
                      style="red" if frames["failed"] else None)
        table.add_row("frames already done", str(frames["skipped"]), "")
    if summary.interrupted:
        table.add_row("not started (interrupted)", str(summary.total - summary.started), "", style="yellow")
    table.add_section()
    n = summary.done + frames["done"] or None  # images and frames segmented
    for stage in BATCH_STAGES:
        seconds = summary.stage_seconds.get(stage, 0.0)
        table.add_row(f"{stage} (sum over images)", f"{seconds:.2f}", f"{seconds / n:.3f}" if n else "")
    table.add_section()
    table.add_row("wall", f"{summary.wall:.2f}", f"{summary.wall / n:.3f}" if n else "")
    table.add_row("images/s" + (" (frames included)" if videos else ""),
                  f"{n / summary.wall:.2f}" if n and summary.wall > 0 else "-", "")
    console.print(table)
    for path, reason in summary.failed[:max_failures]:
        console.print(Text(f"failed: {path}: {reason}", style="red"), soft_wrap=True)
    if len(summary.failed) > max_failures:
        console.print(f"… and {len(summary.failed) - max_failures} more failures (see --report)")


# ---------------------------------------------------------------------------------------------
# deeplab evaluate


def evaluate_with_progress(
    segmenter: Segmenter, dataset: Dataset, modes: Sequence[str], limit: int | None = None,
    console: Console | None = None, **pipeline: Any,
) -> Evaluation:
    """evaluate() with a progress bar (images, running mIoU, ETA) on console (a stderr Console), if given."""
    if console is not None:
        pipeline.setdefault("on_interrupt", on_interrupt(console))
    total = min(len(dataset.samples), limit) if limit is not None else len(dataset.samples)
    mode = "crf" if "crf" in modes else modes[0]
    with Progress(
        TextColumn("evaluate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=console is None, transient=True,
    ) as bar:
        task = bar.add_task("evaluate", total=total, status="")

        def update(ev: Evaluation) -> None:
            miou = ev.scores(mode).miou
            status = f"mIoU {100 * miou:.2f}%" if not math.isnan(miou) else ""
            skipped = len(ev.problems) - len(dataset.problems)
            if skipped:
                status += f"  skipped {skipped}"
            bar.update(task, completed=len(ev.scored) + skipped, status=status)

        return evaluate(segmenter, dataset, modes, limit, update, **pipeline)


MODE_TITLES = {"no_crf": "no CRF", "crf": "CRF"}


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.2f}"


def results_table(evaluation: Evaluation) -> Table:
    """Per-class IoU (%) for each mode, then mIoU, pixel accuracy and mean class accuracy."""
    scores = {m: evaluation.scores(m) for m in evaluation.modes}
    table = Table(title=f"{len(evaluation.scored)} images scored, IoU %", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("class")
    for mode in evaluation.modes:
        table.add_column(f"{MODE_TITLES[mode]}", justify="right")
    for i, name in enumerate(evaluation.class_names):
        table.add_row(str(i), name, *(_pct(scores[m].iou[i]) for m in evaluation.modes))
    table.add_section()
    for label, attr in (("mean IoU", "miou"), ("pixel accuracy", "pixel_accuracy"),
                        ("mean class accuracy", "mean_class_accuracy")):
        table.add_row("", label, *(_pct(getattr(scores[m], attr)) for m in evaluation.modes), style="bold")
    return table


# ---------------------------------------------------------------------------------------------
# deeplab refine (folders)


class RefineProgress(_Bar):
    """refine_folder's callbacks: the files left aside, then a transient bar over the pairs."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def on_start(self, plan: FolderPlan) -> None:
        if plan.images_without_source or plan.sources_without_image:
            self.console.print(f"deeplab: {len(plan.images_without_source)} image(s) without input and "
                               f"{len(plan.sources_without_image)} input(s) without image left aside")
        self.progress = Progress(TextColumn("refine"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=self.console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task("refine", total=len(plan.pairs))

    def on_pair(self, image: Path, output: Path, error: str | None) -> None:
        self.progress.advance(self.task)


# ---------------------------------------------------------------------------------------------
# deeplab weights


class DownloadProgress(_Bar):
    """fetch's progress callback as a bar (size, speed, time left); shown once the server answers."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        super().__init__()
        self.console, self.enabled = console, enabled

    def __call__(self, name: str, received: int, total: int | None) -> None:
        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(), console=self.console,
                                     disable=not self.enabled)
            self.progress.start()
            self.task: TaskID = self.progress.add_task(name, total=total)
        self.progress.update(self.task, total=total, completed=received)


def models_table(rows: list[dict], cache: Path) -> Table:
    """`deeplab weights list`: name, arch, CRF preset, status and sha256 (published or recorded) of each model."""
    table = Table(title=f"cache: {cache}", title_justify="left")
    for col in ("name", "arch", "CRF preset", "status", "sha256"):
        table.add_column(col, no_wrap=col != "status")
    for r in rows:
        sha = r["published_sha256"] or r["recorded_sha256"]
        sha = f"{sha[:16]}… ({'published' if r['published_sha256'] else 'recorded'})" if sha else "none published"
        table.add_row(r["name"], r["arch"] or "-", r["crf_preset"] or "-", r["status"], sha)
    return table


# ---------------------------------------------------------------------------------------------
# deeplab benchmark


def _ms(stats: dict[str, float] | None) -> tuple[str, str, str]:
    if stats is None:
        return ("skipped", "", "")
    return (f"{stats['median_ms']:.1f}", f"{stats['min_ms']:.1f}", f"{stats['max_ms']:.1f}")


def render_benchmark(report: dict[str, Any], console: Console) -> None:
    """Print `deeplab benchmark`'s report (benchmark.run_benchmark) as tables on a console (meant for stderr)."""
    from .benchmark import STAGE_LABELS, STAGES, format_size, variant_name

    env = report["environment"]
    info = Table(title="deeplab benchmark", show_header=False, box=None, pad_edge=False)
    info.add_column(style="bold", no_wrap=True)
    info.add_column()
    load = env.get("load_average")
    rows = [
        ("device", f"{env['device']} ({env['device_name']})"),
        ("torch", f"{env['torch']}, {env['threads']} threads, {env['cpu_count']} CPUs"
                  + (f", load {load[0]:.2f}" if load else "")),
        ("model", f"{env['arch']}, {env['num_classes']} classes, "
                  + ("random weights" if env["random_weights"] else str(env["weights"]))),
        ("precision", variant_name(env)),
        ("size", f"{format_size(env['image_size'])} (network input {format_size(env['input_size'])}), batch {env['batch_size']}"),
        ("runs", f"{env['iters']} timed (medians, min/max) after {env['warmup']} warm-up; images: {env['images']}"),
        ("CRF", f"{env['crf_backend']}, preset {env['crf_preset']}, {env['crf']['iterations']} iterations"
                if env["crf_backend"] else "off"),
    ]
    if env["device"].startswith("cuda"):
        rows.append(("CUDA", f"{env['cuda']}, cuDNN {env['cudnn']}, TF32 conv {env['tf32_conv']} / matmul {env['tf32_matmul']}"))
    for key, value in rows:
        info.add_row(key, value)
    console.print(info)

    if "stages" in report:
        stages = Table(title="ms per image")
        stages.add_column("stage", no_wrap=True)
        for name in ("median", "min", "max"):
            stages.add_column(name, justify="right")
        for stage in STAGES:
            stages.add_row(STAGE_LABELS[stage], *_ms(report["stages"][stage]))
        stages.add_section()
        stages.add_row("end to end, no CRF", *_ms(report["end_to_end"]["without_crf"]))
        stages.add_row("end to end, with CRF", *_ms(report["end_to_end"]["with_crf"]))
        console.print(stages)
        fps, g = report["fps"], report["gflops"]
        e2e = f"{fps['end_to_end']:.2f} fps with CRF, " if fps["end_to_end"] is not None else ""
        console.print(f"network {fps['network']:.2f} fps; end to end {e2e}{fps['end_to_end_without_crf']:.2f} fps without")
        console.print(f"network {g['network_gflop_per_image']:.1f} GFLOP/image at {g['network']:.1f} GFLOP/s = "
                      f"{100 * g['fraction_of_matmul']:.0f}% of this device's {g['matmul_dtype']} matmul "
                      f"{g['matmul']:.1f} GFLOP/s (measured in this run)")

    if report.get("variants"):
        table = Table(title="network by precision (same input)")
        table.add_column("variant", no_wrap=True)
        for name in ("ms/image", "min-max", "GFLOP/s", "% matmul", "agree fp32"):
            table.add_column(name, justify="right")
        for v in report["variants"]:
            n = v["network"]
            name = variant_name(v)
            table.add_row(name, f"{n['median_ms']:.1f}", f"{n['min_ms']:.0f}-{n['max_ms']:.0f}", f"{v['gflops']:.1f}",
                          f"{100 * v['fraction_of_matmul']:.0f}%", f"{100 * v['agreement']:.2f}%")
        console.print(table)
        rec = report["recommended"]
        console.print(f"fastest with ≥ {100 * rec['agreement_threshold']:.1f}% argmax agreement: "
                      f"{variant_name(rec)}"
                      + (" (random weights: agreement is only indicative)" if env["random_weights"] else ""))
        if report.get("runtime_choice"):
            console.print("--runtime auto will use here: " + ", ".join(
                f"{precision} → {runtime}" for precision, runtime in report["runtime_choice"].items()))

    if "crf_compare" in report:
        cmp = report["crf_compare"]
        for backend, why in cmp["unavailable"].items():
            console.print(f"CRF backend {backend} is not available: {why}", markup=False, highlight=False)
        table = Table(title=f"CRF backends, {format_size(cmp['image_size'])}")
        table.add_column("backend", no_wrap=True)
        for name in ("median ms", "min", "max", f"speed vs {cmp['reference']}", "agree"):
            table.add_column(name, justify="right")
        for r in cmp["backends"]:
            table.add_row(f"{r['backend']} ({r['device']})", *_ms(r["crf"]), f"{r['speedup']:.2f}x",
                          f"{100 * r['agreement']:.2f}%")
        console.print(table)
        if len(cmp["available"]) < 2:
            console.print(f"only {', '.join(cmp['available']) or 'no backend'} available: nothing to compare side by side")


def render_video_benchmark(report: dict[str, Any], console: Console) -> None:
    """Print `deeplab benchmark --video`'s report (benchmark_video.run_video_benchmark) on a console (stderr)."""
    env, video = report["environment"], report["video"]
    load = env.get("load_average")
    console.print(f"deeplab benchmark --video: {env['device']} ({env['device_name']}), {env['cpu_count']} CPUs"
                  + (f", load {load[0]:.2f}" if load else "") + f"; {env['arch']}, "
                  + ("random weights" if env["random_weights"] else str(env["weights"])) + f", {env['precision']}",
                  markup=False, highlight=False)
    width, height = video["size"]
    console.print(f"{video['path']}: {width}×{height} ({video['codec']}, {video['fps']:g} fps), network and CRF at "
                  f"{video['working_size'][0]}×{video['working_size'][1]}; {video['frames_timed']} frames timed",
                  markup=False, highlight=False)
    table = Table(title="frames/s and ms per frame (stages summed over threads and processes)")
    table.add_column("run", no_wrap=True)
    table.add_column("frames/s", justify="right")
    for stage in BATCH_STAGES:
        table.add_column(stage, justify="right")
    table.add_row("decode alone", f"{report['decode_fps']:.1f}", *[""] * len(BATCH_STAGES))
    for name, run in report["end_to_end"].items():
        label = f"end to end, {'with' if name == 'with_crf' else 'no'} CRF"
        if run is None:
            table.add_row(label, "-", *[""] * len(BATCH_STAGES))
        else:
            table.add_row(label, f"{run['fps']:.2f}", *(f"{run['ms_per_frame'][s]:.0f}" for s in BATCH_STAGES))
    console.print(table)
