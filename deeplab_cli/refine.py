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
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .batch.crf_pool import CRFPool
from .crf import CRFParams, dense_crf, resolve_backend
from .errors import DeeplabError, UsageError
from .io import (
    IMAGE_EXTENSIONS, STDIO, FolderMatch, match_folders as match_files, overlay_image, read_image, read_label_image,
    read_probs, same_file, write_image, write_mask, write_probs,
)
from .palette import VOID
from .unary import check_probs

DEFAULT_CONFIDENCE = 0.7
MAX_CLASSES = 255  # argmax labels are stored in a palette PNG, where 255 stays reserved for void


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


def check_scores(array: np.ndarray, image_hw: tuple[int, int], name: str, logits: bool = False) -> None:
    """Raise DeeplabError (naming the file) unless array is finite float (C, H, W) matching the image's (H, W):
    probabilities in [0, 1] summing to 1 over C, or any finite scores with logits; at most 255 classes."""
    try:
        check_probs(array, image_hw, name, logits=logits, distribution=not logits)
    except ValueError as exc:
        raise DeeplabError(str(exc)) from None
    if array.shape[0] > MAX_CLASSES:
        raise DeeplabError(f"{name}: {array.shape[0]} classes; at most {MAX_CLASSES} fit a palette mask")


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


class FolderPlan(FolderMatch):
    """Images paired with their CRF inputs by relative path without suffix; and the files left aside."""

    @property
    def images_without_source(self) -> list[Path]:
        return [path for _, path in self.only_first]

    @property
    def sources_without_image(self) -> list[Path]:
        return [path for _, path in self.only_second]


def match_folders(
    images_dir: str | os.PathLike, sources_dir: str | os.PathLike, source_suffixes: frozenset[str]
) -> FolderPlan:
    """Match images to CRF inputs by relative path without suffix (photos/a/x.jpg ↔ probs/a/x.npy)."""
    return FolderPlan(**vars(match_files(images_dir, sources_dir, IMAGE_EXTENSIONS, source_suffixes)))


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


def iter_refine_folder(
    plan: FolderPlan, out_dir: str | os.PathLike, overlay_dir: str | os.PathLike | None = None,
    probs_dir: str | os.PathLike | None = None, options: RefineOptions = RefineOptions(), workers: int = 0,
) -> Iterator[tuple[Path, Path, str | None]]:
    """Refine each matched pair into out_dir/<key>.png (overlays, refined .npy in theirs); yield (image, output, error).

    workers > 1 runs that many CRF processes (batch.crf_pool: pydensecrf is single-threaded), yielding in
    completion order, with at most two pairs per worker submitted ahead.
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
    pool = CRFPool(min(workers, len(tasks)))
    pool.start()
    todo = iter(tasks)
    pending: dict[Future, tuple] = {}
    try:
        while True:
            while len(pending) < 2 * pool.workers and (task := next(todo, None)) is not None:
                try:
                    pending[pool.submit(refine_pair, *task)] = task
                except DeeplabError as exc:  # no worker process could be started
                    yield task[0], task[2], str(exc)
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                try:
                    error = CRFPool.result(future)
                except DeeplabError as exc:  # its worker died: this pair fails, a fresh pool takes the rest
                    error = str(exc)
                yield task[0], task[2], error
    finally:
        pool.shutdown(wait=True)  # what has not started is cancelled


def source_suffixes(options: RefineOptions) -> frozenset[str]:
    """The file suffixes a folder of CRF inputs is searched for: .npy, or image suffixes with labels_in."""
    return IMAGE_EXTENSIONS if options.labels_in else frozenset({".npy"})


def check_folder_run(images_dir: str, sources_dir: str, output: str, overlay: str | None, save_probs: str | None) -> None:
    """Raise UsageError unless the CRF inputs are a folder too and no output folder is an input folder."""
    if not Path(sources_dir).is_dir():
        raise UsageError(f"{sources_dir}: not a directory (IMAGE is a folder, so the inputs must be one too)")
    if output == STDIO or Path(output).is_file():
        raise UsageError(f"{output}: with folders, -o names an output folder")
    out_dirs = [Path(d).resolve() for d in (output, overlay, save_probs) if d]
    if any(d in (Path(images_dir).resolve(), Path(sources_dir).resolve()) for d in out_dirs):
        raise UsageError("output folders must differ from the input folders")


def check_file_run(image: str, source: str, output: str, overlay: str | None, save_probs: str | None) -> None:
    """Raise UsageError for a missing input, an output that is an input, or both inputs from stdin."""
    for inp in (image, source):
        if inp != STDIO and not Path(inp).exists():
            raise UsageError(f"{inp}: no such file")
        for out in (output, overlay, save_probs):
            if out and same_file(inp, out):
                raise UsageError(f"{out}: refusing to overwrite the input {inp}")
    if image == STDIO and source == STDIO:
        raise UsageError("only one of IMAGE and PROBS can be read from stdin")


def refine_folder(
    images_dir: str | os.PathLike, sources_dir: str | os.PathLike, out_dir: str | os.PathLike,
    overlay_dir: str | os.PathLike | None = None, probs_dir: str | os.PathLike | None = None,
    options: RefineOptions = RefineOptions(), workers: int | None = None,
    on_start: Callable[[FolderPlan], None] | None = None,
    on_pair: Callable[[Path, Path, str | None], None] | None = None,
) -> FolderResult:
    """Refine every image in images_dir whose input in sources_dir has the same relative name.

    workers: CRF processes (default the core count; 0 or 1 runs here); the torch backend always runs here.
    on_start(plan) is called once the folders are matched, on_pair(image, output, error or None) after each pair.
    """
    plan = match_folders(images_dir, sources_dir, source_suffixes(options))
    if not plan.pairs:
        raise UsageError(f"no image in {images_dir} has a matching {'label image' if options.labels_in else '.npy'} "
                         f"in {sources_dir} (files are matched by name without suffix)")
    result = FolderResult()
    result.failures.extend((paths[0], f"ambiguous: {', '.join(p.name for p in paths)} share the name {key!r}")
                           for key, paths in plan.ambiguous)
    if on_start:
        on_start(plan)
    if workers is None:
        workers = os.cpu_count() or 1
    if options.backend != "pydensecrf":
        workers = 0  # one device, one stream of work
    for image_path, output, error in iter_refine_folder(plan, out_dir, overlay_dir, probs_dir, options, workers):
        if error:
            result.failures.append((image_path, error))
        else:
            result.written.append(output)
        if on_pair:
            on_pair(image_path, output, error)
    return result


def crf_runtime(backend: str, device: str, in_pool: bool = False) -> tuple[str, str]:
    """Resolve (backend, device) for the CRF (in_pool: folders, run by CRF worker processes)."""
    if backend == "auto" and in_pool and (device or "auto").strip().lower() == "cpu":
        return resolve_backend(backend, "cpu", in_pool), "cpu"  # the workers run it: no torch import here
    from .pipeline import select_device

    resolved = str(select_device(device))
    try:
        backend = resolve_backend(backend, resolved, in_pool)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return backend, resolved if backend == "torch" else "cpu"
