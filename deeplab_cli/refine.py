"""Refine any segmentation model's output with the dense CRF: probabilities, logits or a label mask → mask.

    probs = load_unary("probs.npy", image.shape[:2])             # (C, H, W) float32, checked
    labels, q = refine(image, probs, CRFParams())                  # (H, W) uint8, (C, H, W) float32

Inputs the CRF accepts, all checked against the image's size:
- `.npy` (C, H, W) softmax probabilities (float16/32/64, summing to 1 over C); (1, H, W) is read as a
  binary foreground probability p and becomes the two classes (1 − p, p);
- the same array of raw scores with `logits=True` (softmax over C; a sigmoid for C = 1);
- a (H, W) label image (palette or grayscale PNG) with `labels_in=True`: each pixel's label gets
  probability `confidence` and the other classes share the rest equally (pydensecrf's
  `unary_from_labels` idea). Unlike pydensecrf's `zero_unsure`, 0 is an ordinary class (VOC's
  background) and the value 255 (VOC's void) means "unknown": a uniform distribution, so the CRF
  fills such pixels from their surroundings.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .crf import CRFParams, dense_crf, resolve_backend
from .errors import DeeplabError, UsageError
from .io import (
    IMAGE_EXTENSIONS, index_by_stem, overlay_image, read_image, read_label_image, read_probs, write_image, write_mask, write_probs,
)
from .palette import VOID

DEFAULT_CONFIDENCE = 0.7
MAX_CLASSES = 255  # argmax labels are stored in a palette PNG, where 255 stays reserved for void
SUM_TOLERANCE = 1e-2  # fp16 softmax outputs sum to 1 within ~1e-3


@dataclass(frozen=True)
class RefineOptions:
    """How to read the CRF's input and run it: params None skips the CRF (argmax of the input)."""

    params: CRFParams | None = CRFParams()
    backend: str = "pydensecrf"
    device: str = "cpu"
    logits: bool = False
    labels_in: bool = False
    confidence: float = DEFAULT_CONFIDENCE
    num_classes: int | None = None  # labels_in only: default max label + 1

    def validate(self) -> "RefineOptions":
        """Raise UsageError for contradictory or impossible options."""
        if self.logits and self.labels_in:
            raise UsageError("--logits and --labels-in exclude each other: the input is either scores or labels")
        if not 0.0 < self.confidence < 1.0:
            raise UsageError(f"--confidence must lie strictly between 0 and 1, got {self.confidence}")
        if self.num_classes is not None and not 2 <= self.num_classes <= MAX_CLASSES:
            raise UsageError(f"--num-classes must lie in 2..{MAX_CLASSES}, got {self.num_classes}")
        if self.params is not None:
            try:
                self.params.validate()
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        return self


def probs_from_logits(logits: np.ndarray) -> np.ndarray:
    """logits: (C, H, W) float → softmax over C as float32 (C ≥ 2); (1, H, W) → sigmoid as (2, H, W)."""
    x = np.asarray(logits, dtype=np.float64)
    if x.shape[0] == 1:
        x = np.concatenate([np.zeros_like(x), x])  # softmax of (0, z) is (1 − σ(z), σ(z))
    x = x - x.max(axis=0, keepdims=True)
    e = np.exp(x)
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)


def probs_from_labels(
    labels: np.ndarray, num_classes: int | None = None, confidence: float = DEFAULT_CONFIDENCE, unknown: int = VOID
) -> np.ndarray:
    """labels: (H, W) class indices → (C, H, W) float32: `confidence` on the label, the rest shared; 255 uniform."""
    labels = np.asarray(labels)
    known = labels != unknown
    present = labels[known]
    if num_classes is None:
        num_classes = max(2, int(present.max(initial=0)) + 1)
    if present.size and int(present.max()) >= num_classes:
        raise ValueError(f"label value {int(present.max())} does not fit {num_classes} classes")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if confidence <= 1.0 / num_classes:
        raise ValueError(f"confidence {confidence} must exceed 1/{num_classes} for the given labels to count at all")
    h, w = labels.shape
    probs = np.full((num_classes, h, w), (1.0 - confidence) / (num_classes - 1), dtype=np.float32)
    ys, xs = np.nonzero(known)
    probs[labels[known].astype(np.intp), ys, xs] = confidence
    probs[:, ~known] = 1.0 / num_classes
    return probs


def _describe(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)


def check_scores(array: np.ndarray, image_hw: tuple[int, int], name: str, logits: bool = False) -> None:
    """Raise DeeplabError (naming the file) unless array is finite float (C, H, W) matching the image's (H, W)."""
    h, w = image_hw
    if array.dtype == object or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise DeeplabError(f"{name}: unsupported array dtype {array.dtype}; expected float (C, H, W) probabilities")
    if not np.issubdtype(array.dtype, np.floating):
        raise DeeplabError(
            f"{name}: {array.dtype} array; expected float (C, H, W) {'scores' if logits else 'probabilities'} "
            "(for a label mask, pass a PNG with --labels-in)"
        )
    if array.ndim == 2:
        raise DeeplabError(
            f"{name}: a 2-D {_describe(array.shape)} array; expected (C, H, W) "
            "(save a binary foreground probability as (1, H, W); a label mask as a PNG with --labels-in)"
        )
    if array.ndim != 3:
        raise DeeplabError(f"{name}: a {array.ndim}-D {_describe(array.shape)} array; expected 3-D (C, H, W)")
    if array.shape[1:] != (h, w):
        if array.shape[:2] == (h, w):
            raise DeeplabError(
                f"{name}: shape {_describe(array.shape)} looks like (H, W, C); expected (C, H, W) — "
                "save np.moveaxis(a, -1, 0)"
            )
        raise DeeplabError(
            f"{name}: {array.shape[2]}×{array.shape[1]} (W×H) scores but the image is {w}×{h}; "
            "they must match pixel for pixel"
        )
    if array.shape[0] > MAX_CLASSES:
        raise DeeplabError(f"{name}: {array.shape[0]} classes; at most {MAX_CLASSES} fit a palette mask")
    if array.shape[0] == 0:
        raise DeeplabError(f"{name}: no classes (first axis is 0)")
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)
        c, y, x = (int(v) for v in bad[0])
        kinds = " and ".join(k for k, m in (("NaN", np.isnan(array)), ("inf", np.isinf(array))) if m.any())
        raise DeeplabError(f"{name}: {len(bad)} {kinds} value(s) (first at class {c}, y {y}, x {x})")
    if logits:
        return
    lo, hi = float(array.min()), float(array.max())
    if lo < -1e-6 or hi > 1.0 + 1e-3:
        raise DeeplabError(
            f"{name}: values range {lo:.4g}..{hi:.4g}, outside [0, 1]: not probabilities (pass --logits for raw scores)"
        )
    if array.shape[0] > 1:
        sums = array.sum(axis=0, dtype=np.float64)
        smin, smax = float(sums.min()), float(sums.max())
        if smin < 1.0 - SUM_TOLERANCE or smax > 1.0 + SUM_TOLERANCE:
            raise DeeplabError(
                f"{name}: probabilities sum to {smin:.4g}..{smax:.4g} over the first axis, not 1: expected softmax "
                "outputs as (C, H, W) (pass --logits for raw scores)"
            )


def as_probs(array: np.ndarray, image_hw: tuple[int, int], name: str, logits: bool = False) -> np.ndarray:
    """Check (C, H, W) probabilities (or logits) against the image → (C', H, W) float32 probs (C' = 2 when C = 1)."""
    check_scores(array, image_hw, name, logits)
    if logits:
        return probs_from_logits(array)
    probs = np.asarray(array, dtype=np.float32)
    if probs.shape[0] == 1:
        probs = np.concatenate([1.0 - probs, probs])
    return np.ascontiguousarray(probs)


def load_unary(
    path: str | os.PathLike, image_hw: tuple[int, int], options: RefineOptions = RefineOptions()
) -> np.ndarray:
    """Read the CRF's input, a .npy (or a label image with options.labels_in) → checked (C, H, W) float32 probs."""
    name = str(path)
    if not options.labels_in:
        return as_probs(read_probs(path), image_hw, name, options.logits)
    labels = read_label_image(path)
    if labels.shape != tuple(image_hw):
        raise DeeplabError(
            f"{name}: {labels.shape[1]}×{labels.shape[0]} (W×H) label image "
            f"but the image is {image_hw[1]}×{image_hw[0]}"
        )
    try:
        return probs_from_labels(labels, options.num_classes, options.confidence)
    except ValueError as exc:
        raise DeeplabError(f"{name}: {exc}") from None


def refine(
    image: np.ndarray, probs: np.ndarray, params: CRFParams | None = CRFParams(), backend: str = "pydensecrf",
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """image (H, W, 3) uint8 RGB, probs (C, H, W) → (labels (H, W) uint8, refined Q (C, H, W) float32)."""
    q = probs if params is None else dense_crf(image, probs, params, backend, device)
    return q.argmax(axis=0).astype(np.uint8), q


def refine_file(
    image_path: str | os.PathLike, source_path: str | os.PathLike, output: str | os.PathLike,
    overlay: str | os.PathLike | None = None, save_probs: str | os.PathLike | None = None,
    options: RefineOptions = RefineOptions(),
) -> np.ndarray:
    """Refine one image's probabilities (or labels), write the palette mask (and overlay, refined Q); returns labels."""
    image = read_image(image_path)
    probs = load_unary(source_path, image.shape[:2], options)
    try:
        labels, q = refine(image, probs, options.params, options.backend, options.device)
    except ValueError as exc:  # the CRF's own checks, should anything slip past ours
        raise DeeplabError(f"{source_path}: {exc}") from None
    if save_probs:
        write_probs(save_probs, q)
    if overlay:
        write_image(overlay, overlay_image(image, labels))
    write_mask(output, labels)
    return labels


@dataclass
class FolderPlan:
    """Pairs of (image, CRF input) matched by path relative to their folders, minus the suffix; and the leftovers."""

    pairs: list[tuple[str, Path, Path]] = field(default_factory=list)  # (key, image, source)
    images_without_source: list[Path] = field(default_factory=list)
    sources_without_image: list[Path] = field(default_factory=list)
    ambiguous: list[tuple[str, list[Path]]] = field(default_factory=list)  # one key, several files


def match_folders(
    images_dir: str | os.PathLike, sources_dir: str | os.PathLike, source_suffixes: frozenset[str]
) -> FolderPlan:
    """Match images to CRF inputs by relative path without suffix (photos/a/x.jpg ↔ probs/a/x.npy)."""
    images = index_by_stem(images_dir, IMAGE_EXTENSIONS)
    sources = index_by_stem(sources_dir, source_suffixes)
    plan = FolderPlan()
    for key in sorted(images.keys() | sources.keys()):
        ims, srcs = images.get(key, []), sources.get(key, [])
        if len(ims) > 1 or len(srcs) > 1:
            plan.ambiguous.append((key, ims + srcs))
        elif not srcs:
            plan.images_without_source.append(ims[0])
        elif not ims:
            plan.sources_without_image.append(srcs[0])
        else:
            plan.pairs.append((key, ims[0], srcs[0]))
    return plan


@dataclass
class FolderResult:
    """What a folder run did: outputs written, and (path, reason) for each pair that failed."""

    written: list[Path] = field(default_factory=list)
    failures: list[tuple[Path, str]] = field(default_factory=list)


def refine_pair(
    image_path: Path, source_path: Path, output: Path, overlay: Path | None, save_probs: Path | None,
    options: RefineOptions,
) -> str | None:
    """refine_file for one pair of a folder run: None when written, else the one-line reason it failed."""
    try:
        refine_file(image_path, source_path, output, overlay, save_probs, options)
        return None
    except DeeplabError as exc:
        return str(exc)
    except OSError as exc:  # an unwritable output, a full disk: reported against this pair, the others go on
        return f"{output}: {exc.strerror or exc}"


def _ignore_sigint() -> None:
    """Worker set-up: Ctrl-C is the parent's to handle (it cancels what has not started)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def iter_refine_folder(
    plan: FolderPlan, out_dir: str | os.PathLike, overlay_dir: str | os.PathLike | None = None,
    probs_dir: str | os.PathLike | None = None, options: RefineOptions = RefineOptions(), workers: int = 0,
) -> Iterator[tuple[Path, Path, str | None]]:
    """Refine each matched pair into out_dir/<key>.png (overlays, refined .npy in theirs); yield (image, output, error).

    workers > 1 runs that many processes (pydensecrf is single-threaded), yielding in completion order.
    """
    tasks = [
        (image_path, source_path, Path(out_dir) / f"{key}.png",
         Path(overlay_dir) / f"{key}.png" if overlay_dir else None,
         Path(probs_dir) / f"{key}.npy" if probs_dir else None, options)
        for key, image_path, source_path in plan.pairs
    ]
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield task[0], task[2], refine_pair(*task)
        return
    from .batch import mp_context  # the start method `deeplab batch` uses for its CRF processes

    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=mp_context(), initializer=_ignore_sigint) as pool:
        futures = {pool.submit(refine_pair, *task): task for task in tasks}
        try:
            for future in as_completed(futures):
                task = futures[future]
                try:
                    error = future.result()
                except BrokenProcessPool:
                    error = "CRF worker process died (out of memory?)"
                yield task[0], task[2], error
        finally:
            for future in futures:
                future.cancel()


def source_suffixes(options: RefineOptions) -> frozenset[str]:
    """The file suffixes a folder of CRF inputs is searched for: .npy, or image suffixes with labels_in."""
    return IMAGE_EXTENSIONS if options.labels_in else frozenset({".npy"})


def refine_folder(
    images_dir: str | os.PathLike, sources_dir: str | os.PathLike, out_dir: str | os.PathLike,
    overlay_dir: str | os.PathLike | None = None, probs_dir: str | os.PathLike | None = None,
    options: RefineOptions = RefineOptions(), console=None, workers: int | None = None,
) -> FolderResult:
    """Refine every image in images_dir whose input in sources_dir has the same relative name; progress on console.

    workers: CRF processes (default the core count; 0 or 1 runs here); the torch backend always runs here.
    """
    plan = match_folders(images_dir, sources_dir, source_suffixes(options))
    if not plan.pairs:
        raise UsageError(f"no image in {images_dir} has a matching {'label image' if options.labels_in else '.npy'} "
                         f"in {sources_dir} (files are matched by name without suffix)")
    result = FolderResult()
    result.failures.extend((paths[0], f"ambiguous: {', '.join(p.name for p in paths)} share the name {key!r}")
                           for key, paths in plan.ambiguous)
    if console is not None and (plan.images_without_source or plan.sources_without_image):
        console.print(f"deeplab: {len(plan.images_without_source)} image(s) without input and "
                      f"{len(plan.sources_without_image)} input(s) without image left aside")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("refine"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, disable=console is None, transient=True) as bar:
        task = bar.add_task("refine", total=len(plan.pairs))
        if workers is None:
            workers = os.cpu_count() or 1
        if options.backend != "pydensecrf":
            workers = 0  # one device, one stream of work
        for image_path, output, error in iter_refine_folder(plan, out_dir, overlay_dir, probs_dir, options, workers):
            if error:
                result.failures.append((image_path, error))
            else:
                result.written.append(output)
            bar.advance(task)
    return result


def crf_runtime(backend: str, device: str, in_pool: bool = False) -> tuple[str, str]:
    """Resolve (backend, device) for the CRF (in_pool: folders, run by CRF worker processes)."""
    if backend == "auto" and in_pool and (device or "auto").strip().lower() == "cpu":
        return "pydensecrf", "cpu"  # no torch import (seconds) where it would not be used
    from .pipeline import select_device

    resolved = str(select_device(device))
    try:
        backend = resolve_backend(backend, resolved, in_pool)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return backend, resolved if backend == "torch" else "cpu"
