"""The `deeplab` command: thin click wrappers over library calls.

Nothing heavy is imported at module level, so `deeplab --help` and `--version` answer without torch.
Progress, logs and the device in use go to stderr; stdout carries only data (`-o -`, `--json`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import DeeplabError, UsageError

CRF_PRESET_NAMES = ("largefov", "msc-largefov", "deeplab", "msc")  # keys of crf.PRESETS (kept light here)


def stderr_console():
    """A rich console on stderr (progress, logs, tables meant for people)."""
    from rich.console import Console

    return Console(stderr=True)


def fail(message: str, code: int) -> None:
    click.echo(f"deeplab: error: {message}", err=True)
    sys.exit(code)


class DeeplabGroup(click.Group):
    """Turns user errors into one line on stderr with the right exit code, never a traceback."""

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


model_options = _stack(
    click.option("--weights", "weights", metavar="PATH", help="Weights file (.safetensors or PyTorch state dict). "
                 "Default: $DEEPLAB_WEIGHTS, then the cached default model."),
    click.option("--arch", type=click.Choice(["largefov", "deeplab"]), default=None,
                 help="Architecture (default: the weights file's metadata, else largefov)."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
                 help="Network precision (default: fp16 on CUDA, fp32 on CPU)."),
    click.option("--pad-to", type=click.IntRange(min=1), default=None,
                 help="Pad every image to this square size (513 reproduces the VOC test scripts)."),
    click.option("--classes", "classes_file", type=click.Path(dir_okay=False), default=None,
                 help="Text file of class names, one per line (default: the 21 VOC classes)."),
)

crf_options = _stack(
    click.option("--no-crf", is_flag=True, help="Skip the CRF (argmax of the network's probabilities)."),
    click.option("--crf-preset", type=click.Choice(CRF_PRESET_NAMES), default="largefov", show_default=True,
                 help="CRF parameters cross-validated for a model (the paper's per-model values)."),
    click.option("--crf-iterations", type=click.IntRange(min=0), default=None, help="Mean-field iterations [10]."),
    click.option("--bi-w", type=float, default=None, help="Bilateral kernel weight w1 [preset]."),
    click.option("--bi-xy", type=float, default=None, help="Bilateral σα, pixels [preset]."),
    click.option("--bi-rgb", type=float, default=None, help="Bilateral σβ, intensity levels [preset]."),
    click.option("--pos-w", type=float, default=None, help="Gaussian kernel weight w2 [3]."),
    click.option("--pos-xy", type=float, default=None, help="Gaussian σγ, pixels [3]."),
    click.option("--crf-backend", type=click.Choice(["auto", "pydensecrf", "torch"]), default="auto", show_default=True,
                 help="CRF implementation (auto: torch on CUDA, pydensecrf on CPU)."),
)


def crf_params_from(opts: dict[str, Any]):
    """CRFParams from the shared CRF options, or None with --no-crf."""
    from .crf import PRESETS

    if opts.get("no_crf"):
        return None
    params = PRESETS[opts["crf_preset"]].with_overrides(
        iterations=opts.get("crf_iterations"), bi_w=opts.get("bi_w"), bi_xy=opts.get("bi_xy"),
        bi_rgb=opts.get("bi_rgb"), pos_w=opts.get("pos_w"), pos_xy=opts.get("pos_xy"),
    )
    try:
        return params.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def segmenter_from(opts: dict[str, Any], log: bool = True):
    """Build the Segmenter that the shared model and CRF options describe, saying on stderr what it uses."""
    from .palette import load_class_names
    from .pipeline import Segmenter
    from .weights import load_weights, resolve_weights

    weights = load_weights(resolve_weights(opts.get("weights")), arch=opts.get("arch"))
    names = load_class_names(opts.get("classes_file"), weights.num_classes) if opts.get("classes_file") else None
    seg = Segmenter.from_weights(
        weights, device=opts.get("device", "auto"), precision=opts.get("precision"), pad_to=opts.get("pad_to"),
        crf=crf_params_from(opts), crf_backend=opts.get("crf_backend", "auto"), class_names=names,
    )
    if log:
        crf = f"CRF {seg.crf_backend}" if seg.crf else "no CRF"
        click.echo(f"deeplab: {weights.path} ({weights.arch}, {weights.num_classes} classes) on {seg.device} "
                   f"{seg.precision}, {crf}", err=True)
    return seg


def _same_file(a: str, b: str) -> bool:
    try:
        return a != "-" and b != "-" and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Commands


@main.command()
@click.argument("image", metavar="IMAGE")
@click.option("-o", "--output", required=True, metavar="OUT.png", help="Palette PNG mask ('-' for stdout).")
@click.option("--overlay", metavar="PATH", default=None, help="Also write the image blended with the colour mask.")
@click.option("--save-probs", metavar="PATH.npy", default=None,
              help="Also save (C, H, W) float32 softmax probabilities before the CRF.")
@model_options
@crf_options
def segment(image: str, output: str, overlay: str | None, save_probs: str | None, **opts: Any) -> None:
    """Segment one IMAGE ('-' for stdin) into a VOC-coloured palette PNG mask."""
    from .io import overlay_image, read_image, write_image, write_mask, write_probs

    for out in (output, overlay, save_probs):
        if out and _same_file(image, out):
            raise UsageError(f"{out}: refusing to overwrite the input image")
    if image != "-" and not Path(image).exists():
        raise UsageError(f"{image}: no such file")
    rgb = read_image(image)  # decode before loading the model: a bad image fails fast
    result = segmenter_from(opts).segment(rgb)
    if save_probs:
        write_probs(save_probs, result.probs)
    if overlay:
        write_image(overlay, overlay_image(rgb, result.labels))
    write_mask(output, result.labels)


def run() -> None:
    """Console-script entry point."""
    main(prog_name="deeplab")


if __name__ == "__main__":
    run()
