"""The `deeplab` command: thin click wrappers over library calls.

Nothing heavy is imported at module level, so `deeplab --help` and `--version` answer without torch.
Progress, logs and the device in use go to stderr; stdout carries only data (`-o -`, `--json`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .archs import ARCHS
from .cpu import cpu_has_bf16
from .crf import AUTO_PRESET, BACKENDS, PRESETS
from .errors import DeeplabError, UsageError
from .options import crf_overrides, crf_params_from, ray_engine_from, segmenter_from
from .precision import BF16_NOTE, PRECISIONS, RUNTIMES
from .resolution import DEFAULT_MAX_SIDE


def fail(message: str, code: int) -> None:
    click.echo(f"deeplab: error: {message}", err=True)
    sys.exit(code)


class OneLineErrorsCommand(click.Command):
    """A command whose bad options (wrong type, unknown option) give one line and exit 2, like DeeplabError."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise UsageError(exc.format_message()) from None


class DeeplabGroup(click.Group):
    """Turns user errors into one line on stderr with the right exit code, never a traceback."""

    command_class = OneLineErrorsCommand
    group_class = type  # subgroups (`weights`) behave the same

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DeeplabError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            click.echo("deeplab: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(1)


@click.group(cls=DeeplabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deeplab")
def main() -> None:
    """DeepLab v1 semantic segmentation: atrous VGG16 + 8x bilinear upsampling + fully connected CRF."""


# ---------------------------------------------------------------------------------------------
# Options shared by several commands, declared once.


def _stack(*decorators: Callable) -> Callable:
    def apply(f: Callable) -> Callable:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


class MaxSide(click.ParamType):
    """--max-side: a positive number of pixels, or 'none' for full resolution."""

    name = "N|none"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | None:
        if value is None or isinstance(value, int):
            return value
        if str(value).strip().lower() in ("none", "full"):
            return None
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number < 1:
            self.fail(f"{value!r} is neither a positive number of pixels nor 'none'", param, ctx)
        return number


model_options = _stack(
    click.option("--weights", "weights", metavar="PATH", help="Weights file (.safetensors or PyTorch state dict). "
                 "Default: $DEEPLAB_WEIGHTS, then the cached default model, downloaded on first use."),
    click.option("--offline", is_flag=True, envvar="DEEPLAB_OFFLINE",
                 help="Never touch the network: fail instead of downloading the default model ($DEEPLAB_OFFLINE=1)."),
    click.option("--max-side", type=MaxSide(), default=str(DEFAULT_MAX_SIDE), show_default=True,
                 help="Working resolution: photos whose longer side exceeds N pixels run downscaled to N (the "
                      "paper's scale, network and CRF alike); masks and overlays stay at full size. "
                      "'none' = full resolution (refused up front when it would not fit in memory)."),
    click.option("--arch", type=click.Choice(list(ARCHS)), default=None,
                 help="Architecture (default: the weights file's metadata, else largefov)."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    click.option("--precision", type=click.Choice(list(PRECISIONS)), default=None,
                 help=f"Network precision (default: fp16 on CUDA, fp32 on CPU). {BF16_NOTE}"
                      f"{' (this CPU has them)' if cpu_has_bf16() else ''}."),
    click.option("--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True,
                 help="What runs the network on the CPU: torch (ours: oneDNN with weights packed once), onnxruntime "
                      "or openvino (optional extras: pip install 'deeplab-cli[openvino]'). auto: ours, unless "
                      "`deeplab benchmark` measured a peer faster here with labels as good."),
    click.option("--pad-to", type=click.IntRange(min=1), default=None,
                 help="Pad every image to this square size (513 reproduces the VOC test scripts)."),
    click.option("--classes", "classes_file", type=click.Path(dir_okay=False), default=None,
                 help="Text file of class names, one per line (default: the 21 VOC classes)."),
)

legend_option = click.option("--legend/--no-legend", default=True, show_default=True,
                             help="Draw the classes present (colour swatch + name) on overlays.")

crf_options = _stack(
    click.option("--no-crf", is_flag=True, help="Skip the CRF (argmax of the network's probabilities)."),
    click.option("--crf-preset", type=click.Choice([AUTO_PRESET, *PRESETS]), default=AUTO_PRESET, show_default=True,
                 help="CRF parameters cross-validated for a model (the paper's per-model values); auto: the one "
                 "recorded with the weights, else their architecture's (largefov without a model)."),
    click.option("--crf-iterations", type=click.IntRange(min=0), default=None, help="Mean-field iterations [10]."),
    click.option("--bi-w", type=float, default=None, help="Bilateral kernel weight w1 [preset]."),
    click.option("--bi-xy", type=float, default=None, help="Bilateral σα, pixels [preset]."),
    click.option("--bi-rgb", type=float, default=None, help="Bilateral σβ, intensity levels [preset]."),
    click.option("--pos-w", type=float, default=None, help="Gaussian kernel weight w2 [3]."),
    click.option("--pos-xy", type=float, default=None, help="Gaussian σγ, pixels [3]."),
    click.option("--crf-backend", type=click.Choice(list(BACKENDS)), default="auto", show_default=True,
                 help="CRF implementation (auto: torch, i.e. ours; pydensecrf in CPU worker pools if the compiled kernels are missing)."),
)


# How the streaming pipeline (batch.run_batch) uses the machine; keys match run_batch's keyword options.
crf_workers_option = click.option("--crf-workers", type=click.IntRange(min=0), default=None,
                                  help="CRF worker processes [core count]; 0 runs the CRF on one thread in this process.")
pipeline_options = _stack(
    click.option("--batch-size", type=click.IntRange(min=1), default=None,
                 help="Images of one padded size per network call [1 on CPU, 8 on CUDA]."),
    crf_workers_option,
    click.option("--net-threads", type=click.IntRange(min=1), default=None,
                 help="torch threads for the network [torch's default: the core count]."),
)


video_options = _stack(  # which frames of a video are segmented (video.FrameSelection.parse; keys every, start, end)
    click.option("--every", type=click.IntRange(min=1), default=1, metavar="N", help="Videos: every Nth frame [1]."),
    click.option("--start", metavar="TIME", help="Videos: first frame, a time (10s, 1m, 1:02.5) or a frame number (250f)."),
    click.option("--end", metavar="TIME", help="Videos: stop before this time or frame number (exclusive)."),
)


# ---------------------------------------------------------------------------------------------
# Commands


@main.command()
@click.argument("image", metavar="IMAGE|VIDEO")
@click.option("-o", "--output", required=True, metavar="OUT.png|DIR|OUT.mkv", help="Palette PNG mask ('-': stdout).")
@click.option("--overlay", metavar="PATH", default=None, help="Also write the image blended with the colour mask.")
@click.option("--save-probs", metavar="PATH.npy", default=None,
              help="Also save (C, h, w) float32 softmax probabilities before the CRF, at the working resolution "
                   "(the photo's size up to --max-side; the array's shape gives it).")
@click.option("--overwrite", is_flag=True, help="Videos: redo frames whose masks exist in -o DIR (default: resume).")
@legend_option
@video_options
@model_options
@crf_options
@pipeline_options
def segment(image: str, output: str, overlay: str | None, save_probs: str | None, overwrite: bool, legend: bool,
            batch_size: int | None, crf_workers: int | None, net_threads: int | None, **opts: Any) -> None:
    """Segment one IMAGE ('-' for stdin) into a VOC-coloured palette PNG mask, or every frame of a VIDEO.

    A VIDEO (.mp4 .mov .avi .mkv .webm …; audio is not carried) streams through `deeplab batch`'s pipeline, frames
    at --max-side like photos: -o DIR gets NNN.png masks (a rerun resumes at the first missing one), -o OUT.mkv
    (.avi, .mov) a lossless label video; --overlay an .mp4/.mov/.mkv/.avi video at the source rate ÷ --every, or
    a folder of NNN.jpg. Ctrl-C finishes the frames in flight and leaves a playable overlay video (exit code 130).
    """
    from .video import FrameSelection, is_video_path

    if is_video_path(image) and image != "-":
        from .console import segment_video_file

        selection = FrameSelection.parse(opts["start"], opts["end"], opts["every"])
        sys.exit(segment_video_file(image, output, overlay, save_probs, overwrite, selection, legend,
                                    lambda: segmenter_from(opts, in_pool=True), batch_size=batch_size,
                                    crf_workers=crf_workers, net_threads=net_threads))
    from .io import overlay_image, read_photo, same_file, write_image, write_mask, write_probs

    for out in (output, overlay, save_probs):
        if out and same_file(image, out):
            raise UsageError(f"{out}: refusing to overwrite the input image")
    if image != "-" and not Path(image).exists():
        raise UsageError(f"{image}: no such file")
    # Decode before loading the model: a bad image fails fast. The overlay needs every pixel; the mask
    # alone only the working resolution, so a large JPEG is decoded at a reduced scale.
    rgb, size = read_photo(image, None if overlay else opts.get("max_side"))
    seg = segmenter_from(opts)
    try:
        result = seg.segment(rgb, size)
    except DeeplabError as exc:
        raise type(exc)(f"{'<stdin>' if image == '-' else image}: {exc}") from None
    if save_probs:
        write_probs(save_probs, result.probs)
        if result.probs.shape[1:] != size:
            h, w = result.probs.shape[1:]
            click.echo(f"deeplab: {save_probs}: probabilities at the working resolution {w}×{h} "
                       f"(the photo is {size[1]}×{size[0]})", err=True)
    if overlay:
        write_image(overlay, overlay_image(rgb, result.labels, seg.class_names if legend else None))
    write_mask(output, result.labels)


@main.command()
@click.argument("inputs", nargs=-1, metavar="[FOLDER|GLOB|IMAGE|VIDEO]...")
@click.option("-o", "--output", default=None, metavar="DIR",
              help="Output folder; the input tree is mirrored in it. Default for a single input FOLDER: FOLDER_masks "
                   "beside it (required with several inputs, globs, images or --from-list).")
@click.option("--from-list", metavar="FILE|-", default=None,
              help="Also read input paths from FILE ('-' for stdin), one per line or NUL-separated.")
@click.option("--recursive/--no-recursive", default=True, show_default=True, help="Walk input folders recursively.")
@click.option("--overwrite", is_flag=True, help="Redo images whose outputs exist (default: skip them, so reruns resume).")
@click.option("--overlay", is_flag=True, help="Also write NAME.overlay.jpg: the image blended with the colour mask.")
@legend_option
@click.option("--save-probs", is_flag=True,
              help="Also write NAME.probs.npy: (C, h, w) float32 probabilities before the CRF, at the working resolution.")
@click.option("--report", metavar="FILE.jsonl", default=None,
              help="Write one JSON line per input: path, output, status, error, timings (videos: frames).")
@click.option("--no-progress", is_flag=True, help="No live progress bar (the summary is still printed).")
@video_options
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine's streaming pipeline. ray: Ray Data on $RAY_ADDRESS's cluster (else a private "
                   "local Ray); inputs and -o may then be s3:// or gs:// URLs. Needs pip install 'deeplab-cli[ray]'.")
@model_options
@crf_options
@pipeline_options
def batch(inputs: tuple[str, ...], output: str | None, from_list: str | None, recursive: bool, overwrite: bool, overlay: bool,
          legend: bool, save_probs: bool, report: str | None, batch_size: int | None, crf_workers: int | None,
          net_threads: int | None, no_progress: bool, engine: str, **opts: Any) -> None:
    """Segment every image and video in folders, globs or a list into masks mirroring the tree under -o.

    A video NAME.mp4 gives NAME/ of frame masks (000123.png; audio is not carried), with --overlay NAME.overlay.mp4.
    Resumable: complete outputs are skipped, a video resumes at its first missing frame. Exit code 0 when all
    succeeded, 1 when any image or video failed (listed in the summary and --report), 130 when interrupted
    (Ctrl-C finishes the images in flight).
    """
    from .batch import check_output_dir, default_output_dir, discover_inputs, exit_on_next_interrupt, segment_tree
    from .batch.remote_inputs import discover_urls, plan_url_jobs
    from .console import BatchProgress, describe_video, on_interrupt, print_summary, say, stderr_console
    from .storage import is_url
    from .video import FrameSelection

    if not inputs and from_list is None:
        raise UsageError("give input folders, globs or images, or --from-list FILE")
    console = stderr_console()

    if output is None:
        output = str(default_output_dir(inputs, from_list))
        say(console, f"writing to {output} (no -o given)")
    check_output_dir(output, inputs)
    urls = [source for source in inputs if is_url(source)]
    if engine != "ray" and (urls or is_url(output)):
        raise UsageError("inputs or outputs named by URL (s3://, gs://, ...) need --engine ray")
    local = [source for source in inputs if not is_url(source)]
    found = discover_inputs(local, recursive=recursive, from_list=from_list, exclude=output, videos=True,
                            warn=lambda message: say(console, message)) if local or from_list is not None else []
    found += discover_urls(urls, recursive=recursive)
    jobs = plan_url_jobs(found, output, overlay=overlay, save_probs=save_probs, legend=legend,
                         selection=FrameSelection.parse(opts["start"], opts["end"], opts["every"]))
    if not jobs:
        say(console, "no images or videos found")
    pipeline = dict(batch_size=batch_size, crf_workers=crf_workers, net_threads=net_threads)
    try:
        with BatchProgress(console, enabled=not no_progress) as progress:
            summary = segment_tree(
                jobs, lambda: segmenter_from(opts, in_pool=True), overwrite=overwrite, report=report,
                on_start=progress.on_start, on_result=progress.on_result, on_video=progress.on_video,
                on_video_result=lambda result, _: say(console, describe_video(result)), on_interrupt=on_interrupt(console),
                engine=ray_engine_from(opts, **pipeline) if engine == "ray" else None, **pipeline,
            )
    finally:
        exit_on_next_interrupt(130)  # the run is over (or aborted): another Ctrl-C just ends the process
    print_summary(summary, console)
    sys.exit(summary.exit_code)


@main.command()
@click.argument("root", required=False, metavar="[VOC_ROOT]")
@click.option("--split", default="val", show_default=True, help="ImageSets/Segmentation/<split>.txt of a VOC root.")
@click.option("--images", "images_dir", metavar="DIR", default=None,
              help="Folder of images (instead of a VOC root), matched to --labels by name without suffix.")
@click.option("--labels", "labels_dir", metavar="DIR", default=None,
              help="Folder of label PNGs (class index per pixel, 255 = void).")
@click.option("--crf", "crf_mode", type=click.Choice(["off", "on", "both"]), default="on", show_default=True,
              help="Score after the CRF, without it, or both from one network pass.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N images.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report (per-class IoU, confusion) as JSON.")
@click.option("--no-progress", is_flag=True, help="No live progress bar.")
@model_options
@crf_options
@pipeline_options
def evaluate(root: str | None, split: str, images_dir: str | None, labels_dir: str | None, crf_mode: str,
             limit: int | None, as_json: bool, no_progress: bool, batch_size: int | None, crf_workers: int | None,
             net_threads: int | None, **opts: Any) -> None:
    """Score a model on labelled images: per-class IoU, mIoU, pixel and mean class accuracy.

    VOC_ROOT is a PASCAL VOC-layout folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/).
    Files that cannot be scored are listed and skipped; the exit code is then 1.
    """
    import json

    from .console import evaluate_with_progress, results_table, say, stderr_console, stdout_console
    from .evaluate import CRF_CHOICES, dataset_from, evaluation_report
    from .weightfiles.cache import resolve_weights

    if opts.get("no_crf"):
        if crf_mode == "both":
            raise UsageError("--no-crf contradicts --crf both; use --crf off")
        crf_mode = "off"
    opts["no_crf"] = crf_mode == "off"
    dataset = dataset_from(root, split, images_dir, labels_dir)  # check the dataset before loading the model
    if not dataset.samples:
        raise UsageError(f"no labelled images found in {', '.join(str(v) for v in dataset.source.values())}")
    console = stderr_console()
    seg = segmenter_from(opts, in_pool=True)
    result = evaluate_with_progress(seg, dataset, CRF_CHOICES[crf_mode], limit, None if no_progress else console,
                                    batch_size=batch_size, crf_workers=crf_workers, net_threads=net_threads)
    for problem in result.problems:
        say(console, f"skipped {problem.path}: {problem.reason}")
    if as_json:
        report = evaluation_report(result, dataset, seg, limit, str(resolve_weights(opts.get("weights"))))
        click.echo(json.dumps(report, indent=2))
        means = ", ".join(f"{100 * result.scores(m).miou:.2f}% {m.replace('_', ' ')}" for m in result.modes)
        say(console, f"mIoU {means} over {len(result.scored)} images")
    else:
        stdout_console().print(results_table(result))
    if result.interrupted:
        fail(f"interrupted: the scores cover only {len(result.scored)} of {result.total} images", 130)
    if not result.scored:
        fail("no image could be scored", 1)
    if result.problems:
        fail(f"{len(result.problems)} of {result.total} images could not be scored (listed above)", 1)


@main.command()
@click.argument("image", metavar="IMAGE|IMAGES_DIR")
@click.argument("source", metavar="PROBS|PROBS_DIR")
@click.option("-o", "--output", required=True, metavar="OUT.png|OUT_DIR",
              help="Palette PNG mask ('-' for stdout); a folder when refining folders.")
@click.option("--overlay", metavar="PATH|DIR", default=None, help="Also write the image blended with the colour mask.")
@click.option("--save-probs", metavar="PATH.npy|DIR", default=None,
              help="Also save the refined (C, H, W) float32 marginals.")
@click.option("--logits", is_flag=True, help="The .npy holds raw scores: apply a softmax (a sigmoid for C = 1).")
@click.option("--labels-in", is_flag=True,
              help="The input is a (H, W) label image (class per pixel, 255 = unknown), not probabilities.")
@click.option("--confidence", type=float, default=0.7, show_default=True,
              help="With --labels-in: probability given to each pixel's label; the rest is shared by the other classes.")
@click.option("--num-classes", type=int, default=None,
              help="With --labels-in: number of classes (default: the largest label + 1).")
@click.option("--device", default="auto", show_default=True, help="Device of the torch CRF backend: auto, cpu, cuda[:N].")
@crf_workers_option
@crf_options
def refine(image: str, source: str, output: str, overlay: str | None, save_probs: str | None, logits: bool,
           labels_in: bool, confidence: float, num_classes: int | None, device: str, crf_workers: int | None,
           **opts: Any) -> None:
    """Refine another model's output with the dense CRF: IMAGE + its (C, H, W) .npy probabilities → mask.

    With two folders, every image is matched to the input of the same relative name (a/x.jpg ↔ a/x.npy)
    and the masks go to OUT_DIR/a/x.png.
    """
    from .refine import RefineOptions, check_file_run, check_folder_run, crf_runtime, refine_file, refine_folder

    backend, crf_device = crf_runtime(opts.get("crf_backend", "auto"), device, in_pool=Path(image).is_dir())
    options = RefineOptions(
        params=crf_params_from(opts), backend=backend, device=crf_device, logits=logits, labels_in=labels_in,
        confidence=confidence, num_classes=num_classes,
    ).validate()
    if not Path(image).is_dir():
        check_file_run(image, source, output, overlay, save_probs)
        refine_file(image, source, output, overlay, save_probs, options)
        return
    from .console import RefineProgress, say, stderr_console

    check_folder_run(image, source, output, overlay, save_probs)
    console = stderr_console()
    with RefineProgress(console) as progress:
        result = refine_folder(image, source, output, overlay, save_probs, options, crf_workers,
                               on_start=progress.on_start, on_pair=progress.on_pair)
    for path, reason in result.failures:
        say(console, f"failed {path}: {reason}")
    say(console, f"{len(result.written)} mask(s) written to {output}, {len(result.failures)} failed")
    if result.failures:
        sys.exit(1)


@main.group()
def weights() -> None:
    """Get, convert and inspect model weights (the authors' Caffe release, PyTorch state dicts)."""


@weights.command("convert")
@click.argument("model", metavar="MODEL.caffemodel")
@click.option("-o", "--output", metavar="OUT.safetensors", default=None,
              help="Where to write (default: the cached default model, which `deeplab segment` then uses).")
@click.option("--arch", type=click.Choice(list(ARCHS)), default=None,
              help="Architecture (default: detected from fc6's shape).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def weights_convert(model: str, output: str | None, arch: str | None, as_json: bool) -> None:
    """Convert a Caffe .caffemodel (no Caffe needed) to .safetensors with arch, classes and source sha256."""
    import json

    from .weightfiles.cache import cached_model_path
    from .weightfiles.caffe import convert_caffemodel

    if not Path(model).is_file():
        raise UsageError(f"{model}: no such file")
    out = Path(output) if output else cached_model_path()
    w = convert_caffemodel(model, out, arch)
    click.echo(f"deeplab: wrote {out} ({w.arch}, {w.num_classes} classes; source sha256 "
               f"{w.metadata['source_sha256']})" + ("; `deeplab segment` uses it by default" if not output else ""),
               err=True)
    if as_json:
        click.echo(json.dumps({"path": str(out), "arch": w.arch, "classes": w.num_classes, **w.metadata}, indent=2))


@weights.command("fetch")
@click.argument("name", required=False, metavar="[NAME]")
@click.option("--url", default=None, help="Download from this URL (a mirror) instead of the manifest's.")
@click.option("--sha256", default=None, metavar="HEX", help="Pin the expected sha256 of the downloaded file.")
@click.option("--arch", type=click.Choice(list(ARCHS)), default=None,
              help="Architecture (default: the manifest's, else detected from fc6's shape).")
@click.option("--force", is_flag=True, help="Download again even when the model is already in the cache.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def weights_fetch(name: str | None, url: str | None, sha256: str | None, arch: str | None, force: bool,
                  quiet: bool, as_json: bool) -> None:
    """Download a known model (default largefov-voc12), verify its sha256, convert it into the cache."""
    import json

    from .console import DownloadProgress, stderr_console
    from .weightfiles.fetch import fetch

    with DownloadProgress(stderr_console(), enabled=not quiet) as progress:
        result = fetch(name, url=url, sha256=sha256, force=force, quiet=quiet, arch=arch, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))


@weights.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def weights_list(as_json: bool) -> None:
    """The known models and what the cache holds (verified against the sha256 recorded by fetch)."""
    import json

    from .weightfiles.cache import cache_dir
    from .weightfiles.fetch import list_models

    rows = list_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from .console import models_table, stdout_console

    stdout_console().print(models_table(rows, cache_dir()))


@weights.command("info")
@click.argument("file", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def weights_info(file: str, as_json: bool) -> None:
    """What a weights file holds: format, arch, classes, parameter count, metadata, sha256."""
    import json

    from .weightfiles.info import describe_weights

    info = describe_weights(file)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "metadata":
            for mkey, mvalue in value.items():
                click.echo(f"metadata.{mkey}: {mvalue}")
        else:
            click.echo(f"{key}: {f'{value:,}' if key in ('parameters', 'size') else value}")


@main.command(name="export")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True,
              help="onnx: opset 17, input `data` (N, 3, H, W) mean-subtracted BGR, output `scores` (N, C, h, w); "
                   "batch and size are dynamic. ONNX Runtime and OpenVINO reproduce our fp32 scores.")
@click.option("-o", "--output", required=True, metavar="OUT.onnx", help="The file to write ('-' for stdout).")
@click.option("--weights", "weights", metavar="PATH", help="Weights file (default: as for segment).")
@click.option("--offline", is_flag=True, envvar="DEEPLAB_OFFLINE", help="Never download the default model.")
@click.option("--arch", type=click.Choice(list(ARCHS)), default=None, help="Architecture (default: the file's).")
def export_command(fmt: str, output: str, weights: str | None, offline: bool, arch: str | None) -> None:
    """Export the network (without the CRF) for other runtimes."""
    from .console import DownloadProgress, stderr_console
    from .peers import export_onnx
    from .weightfiles.fetch import resolve_or_fetch
    from .weightfiles.formats import build_model, load_weights

    with DownloadProgress(stderr_console()) as progress:
        path = resolve_or_fetch(weights, offline=offline, progress=progress)
    loaded = load_weights(path, arch=arch)
    export_onnx(build_model(loaded), output)
    click.echo(f"deeplab: wrote {output} ({fmt}, {loaded.arch}, {loaded.num_classes} classes, from {loaded.path})",
               err=True)


@main.command()
@click.option("--fps", is_flag=True, help="Time every stage of the pipeline (the default unless only --compare is given).")
@click.option("--compare", is_flag=True, help="Time the available CRF backends side by side on the same input.")
@click.option("--size", default="513x513", show_default=True, metavar="HxW",
              help="Image size, HEIGHTxWIDTH in pixels (one number for a square).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Images per network call.")
@click.option("--iters", type=int, default=5, show_default=True, help="Timed runs (figures are medians, with min/max).")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed runs first.")
@click.option("--images", "images_dir", metavar="DIR", default=None,
              help="Decode these images (at their working resolution, --max-side, as segment does; then resized "
                   "to --size, untimed) instead of generated ones.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="Run the network in channels_last memory format (segment and batch do).")
@click.option("--variants/--no-variants", default=True, show_default=True,
              help="Also time every precision / memory format / installed runtime of the device and its argmax "
                   "agreement with fp32; on the CPU, record which runtime `--runtime auto` then uses here.")
@click.option("--video", metavar="CLIP", default=None, help="Instead: decode and end-to-end frames/s of a video.")
@click.option("--frames", type=click.IntRange(min=1), default=30, show_default=True, help="With --video: frames timed.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object on stdout (keys: README).")
@model_options
@crf_options
def benchmark(fps: bool, compare: bool, size: str, batch_size: int, iters: int, warmup: int, images_dir: str | None,
              channels_last: bool, variants: bool, video: str | None, frames: int, as_json: bool, **opts: Any) -> None:
    """Measure the speed of every pipeline stage on this machine (random weights unless --weights)."""
    import json

    from .benchmark import BenchmarkOptions, parse_size, run_benchmark
    from .benchmark_video import run_video_benchmark
    from .console import render_benchmark, render_video_benchmark, say, stderr_console

    options = BenchmarkOptions(  # --compare times the CRF even with --no-crf
        size=parse_size(size), batch_size=batch_size, iters=iters, warmup=warmup, device=opts["device"],
        precision=opts["precision"], channels_last=channels_last, runtime=opts["runtime"], arch=opts["arch"],
        weights=opts["weights"], classes_file=opts["classes_file"], pad_to=opts["pad_to"], images=images_dir,
        max_side=opts["max_side"], crf_preset=opts["crf_preset"], crf_overrides=crf_overrides(opts),
        use_crf=not opts["no_crf"], crf_backend=opts["crf_backend"], fps=fps or not compare, variants=variants,
        compare=compare,
    )
    console = stderr_console()
    log = lambda message: say(console, message)  # noqa: E731
    report = run_video_benchmark(options, video, frames, log, batch_size=batch_size) if video else run_benchmark(options, log)
    (render_video_benchmark if video else render_benchmark)(report, console)
    if as_json:
        click.echo(json.dumps(report))


def run() -> None:
    """Console-script entry point."""
    main(prog_name="deeplab")


if __name__ == "__main__":
    run()
