"""What the shared command-line options build: CRF parameters, weights (fetched on first use), the Segmenter and
the Ray engine, each saying on stderr what it uses. `opts` is a command's keyword arguments (cli.py's option
stacks: model_options, crf_options); nothing heavy is imported until a function runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from .crf import AUTO_PRESET
from .errors import UsageError
from .precision import faster_precision_note
from .resolution import DEFAULT_MAX_SIDE


def crf_overrides(opts: dict[str, Any]) -> dict[str, Any]:
    """The CRFParams fields the shared CRF options set (None: the preset's value)."""
    return {"iterations": opts.get("crf_iterations"), "bi_w": opts.get("bi_w"), "bi_xy": opts.get("bi_xy"),
            "bi_rgb": opts.get("bi_rgb"), "pos_w": opts.get("pos_w"), "pos_xy": opts.get("pos_xy")}


def crf_params_from(opts: dict[str, Any], model_preset: str = "largefov"):
    """CRFParams from the shared CRF options ('auto' → model_preset), or None with --no-crf."""
    from .crf import crf_params

    if opts.get("no_crf"):
        return None
    try:
        return crf_params(opts.get("crf_preset", AUTO_PRESET), model_preset, **crf_overrides(opts))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def weights_from(opts: dict[str, Any]):
    """(weights, class names or None for VOC's) that the shared model options name; the default model is fetched
    on first use, with a progress bar."""
    from .console import DownloadProgress, stderr_console
    from .palette import load_class_names
    from .weightfiles.fetch import resolve_or_fetch
    from .weightfiles.formats import load_weights

    with DownloadProgress(stderr_console()) as progress:  # shown only when the first run downloads the model
        path = resolve_or_fetch(opts.get("weights"), offline=opts.get("offline", False), progress=progress)
    weights = load_weights(path, arch=opts.get("arch"))
    names = load_class_names(opts.get("classes_file"), weights.num_classes) if opts.get("classes_file") else None
    return weights, names


def segmenter_from(opts: dict[str, Any], log: bool = True, in_pool: bool = False):
    """Build the Segmenter that the shared model and CRF options describe, saying on stderr what it uses.

    in_pool: the CRF will run in worker processes (batch, evaluate), which decides what 'auto' picks on the CPU.
    """
    from .crf import resolve_backend
    from .pipeline import Segmenter, select_device

    weights, names = weights_from(opts)
    device = select_device(opts.get("device", "auto"))
    seg = Segmenter.from_weights(
        weights, device=device, precision=opts.get("precision"), pad_to=opts.get("pad_to"),
        crf=crf_params_from(opts, weights.crf_preset),
        crf_backend=resolve_backend(opts.get("crf_backend", "auto"), str(device), in_pool), class_names=names,
        max_side=opts.get("max_side", DEFAULT_MAX_SIDE), runtime=opts.get("runtime", "auto"),
    )
    if log:
        preset = weights.crf_preset if opts.get("crf_preset", AUTO_PRESET) == AUTO_PRESET else opts["crf_preset"]
        crf = f"CRF {seg.crf_backend} ({preset} preset)" if seg.crf else "no CRF"
        runtime = f" on {seg.runtime}" if seg.runtime != "torch" else ""
        note = faster_precision_note(seg.device.type, seg.precision)
        click.echo(f"deeplab: {weights.path} ({weights.arch}, {weights.num_classes} classes) on {seg.device} "
                   f"{seg.precision}{runtime}, {crf}, {_side_text(seg.max_side)}" + (f" ({note})" if note else ""),
                   err=True)
    return seg


def _side_text(max_side: int | None) -> str:
    return f"max side {max_side}" if max_side else "full resolution"


def ray_engine_from(opts: dict[str, Any], **pipeline: Any) -> Callable[[list], Any]:
    """engine(jobs) → a batch.ray_engine.RayRun for `batch --engine ray`; the weights load at the call (nothing to
    do: never)."""
    from .batch.ray_engine import RayOptions, RayRun

    def engine(jobs: list) -> RayRun:
        weights, names = weights_from(opts)
        click.echo(f"deeplab: {weights.path} ({weights.arch}, {weights.num_classes} classes), "
                   f"{_side_text(opts.get('max_side', DEFAULT_MAX_SIDE))}, on Ray", err=True)
        return RayRun(jobs, weights, device=opts.get("device", "auto"), precision=opts.get("precision"),
                      pad_to=opts.get("pad_to"), crf=crf_params_from(opts, weights.crf_preset),
                      crf_backend=opts.get("crf_backend", "auto"),
                      max_side=opts.get("max_side", DEFAULT_MAX_SIDE), class_names=names, options=RayOptions(**pipeline),
                      log=lambda message: click.echo(f"deeplab: {message}", err=True))

    return engine
