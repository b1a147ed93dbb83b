"""Score a model on a labelled dataset: per-class IoU, mean IoU, pixel and mean class accuracy.

    dataset = voc_dataset("VOCdevkit/VOC2012", "val")
    result = evaluate(segmenter, dataset, modes=("no_crf", "crf"))
    result.scores("crf").miou                                   # fraction in [0, 1]

A confusion matrix (rows = ground truth, columns = prediction) is accumulated over all pixels of all
images, as the VOC devkit does; void pixels (255) are ignored. A class's IoU is TP / (TP + FP + FN);
a class absent from both the labels and the predictions has no IoU (NaN, null in JSON) and is left
out of the means. Labels that cannot be scored (unreadable, a size other than the image's, class
values beyond the model's) are reported per file and skipped, never fatal.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import batch
from .errors import DeeplabError, UsageError
from .io import IMAGE_EXTENSIONS, match_folders, read_label_image
from .palette import VOID

if TYPE_CHECKING:
    from .pipeline import Segmenter

MODES = ("no_crf", "crf")  # scored without and with the CRF
CRF_CHOICES: dict[str, tuple[str, ...]] = {"off": ("no_crf",), "on": ("crf",), "both": ("no_crf", "crf")}
VOC_IMAGE_SUFFIX = ".jpg"
VOC_LABEL_SUFFIX = ".png"


# ---------------------------------------------------------------------------------------------
# Datasets


@dataclass(frozen=True)
class Sample:
    """One labelled image: a key (name in the split, or relative path without suffix) and its two files."""

    key: str
    image: Path
    label: Path


@dataclass(frozen=True)
class Problem:
    """A file that could not be scored, and why."""

    key: str
    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "path": self.path, "reason": self.reason}


@dataclass
class Dataset:
    """The samples to score, the problems already found while listing them, and where they came from."""

    samples: list[Sample]
    problems: list[Problem] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # for the JSON report: layout, folders, split
    unmatched_images: list[str] = field(default_factory=list)  # keys with an image but no label (folder pairs)
    unmatched_labels: list[str] = field(default_factory=list)


def voc_splits(root: str | os.PathLike) -> list[str]:
    """Names of the split files under root/ImageSets/Segmentation (e.g. train, val, trainval)."""
    folder = Path(root) / "ImageSets" / "Segmentation"
    return sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []


def voc_dataset(root: str | os.PathLike, split: str = "val") -> Dataset:
    """The VOC layout: ImageSets/Segmentation/<split>.txt naming JPEGImages/<id>.jpg and SegmentationClass/<id>.png."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root}: no such directory")
    missing = [d for d in ("JPEGImages", "SegmentationClass") if not (root / d).is_dir()]
    if missing:
        raise UsageError(
            f"{root}: not a VOC-layout dataset (no {' or '.join(missing)}/ folder); "
            "point at e.g. VOCdevkit/VOC2012, or use --images DIR --labels DIR"
        )
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        known = voc_splits(root)
        hint = f"; available: {', '.join(known)}" if known else ""
        raise UsageError(f"{split_file}: split {split!r} not found{hint}")
    try:
        ids = [line.split()[0] for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DeeplabError(f"{split_file}: cannot read split list ({exc})") from None
    dataset = Dataset([], source={"layout": "voc", "root": str(root), "split": split})
    for key in dict.fromkeys(ids):  # keeps the file's order, drops repeats
        image = root / "JPEGImages" / f"{key}{VOC_IMAGE_SUFFIX}"
        label = root / "SegmentationClass" / f"{key}{VOC_LABEL_SUFFIX}"
        if not image.is_file():
            dataset.problems.append(Problem(key, str(image), "image listed in the split but missing"))
        elif not label.is_file():
            dataset.problems.append(Problem(key, str(label), "label listed in the split but missing"))
        else:
            dataset.samples.append(Sample(key, image, label))
    return dataset


def folder_dataset(images_dir: str | os.PathLike, labels_dir: str | os.PathLike) -> Dataset:
    """Any two folders (searched recursively), images matched to label images by relative path without suffix."""
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for folder, option in ((images_dir, "--images"), (labels_dir, "--labels")):
        if not folder.is_dir():
            raise UsageError(f"{folder}: no such directory ({option})")
    match = match_folders(images_dir, labels_dir, IMAGE_EXTENSIONS, IMAGE_EXTENSIONS)
    dataset = Dataset([], source={"layout": "folders", "images": str(images_dir), "labels": str(labels_dir)})
    for key, paths in match.ambiguous:
        names = ", ".join(p.name for p in paths)
        where = str(paths[0].parent / key)
        dataset.problems.append(Problem(key, where, f"ambiguous: several files share this name ({names})"))
    dataset.unmatched_images = [key for key, _ in match.only_first]
    dataset.unmatched_labels = [key for key, _ in match.only_second]
    dataset.samples = [Sample(key, image, label) for key, image, label in match.pairs]
    return dataset


# ---------------------------------------------------------------------------------------------
# Metrics


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore: int = VOID) -> np.ndarray:
    """gt, pred: (H, W) class indices → (C, C) int64 counts, rows = ground truth, columns = predicted; no void."""
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    gt = gt.ravel()
    pred = pred.ravel()
    keep = gt != ignore
    gt = gt[keep].astype(np.int64)
    pred = pred[keep].astype(np.int64)
    if gt.size and (gt.max() >= num_classes or gt.min() < 0):
        raise ValueError(f"ground truth values outside 0..{num_classes - 1} (and {ignore} = void)")
    if pred.size and (pred.max() >= num_classes or pred.min() < 0):
        raise ValueError(f"predicted values outside 0..{num_classes - 1}")
    return np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class Scores:
    """Metrics of one confusion matrix; fractions in [0, 1], NaN for a class with nothing to score."""

    iou: np.ndarray  # (C,) per class
    class_accuracy: np.ndarray  # (C,) recall per class: TP / ground-truth pixels
    miou: float
    pixel_accuracy: float
    mean_class_accuracy: float
    pixels: int  # non-void pixels scored


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def scores_from_confusion(conf: np.ndarray) -> Scores:
    """(C, C) confusion matrix (rows = ground truth) → per-class IoU and accuracy, their means, and pixel accuracy."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    gt_pixels = conf.sum(axis=1)
    pred_pixels = conf.sum(axis=0)
    union = gt_pixels + pred_pixels - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        class_acc = np.where(gt_pixels > 0, tp / gt_pixels, np.nan)
    total = conf.sum()
    return Scores(
        iou=iou, class_accuracy=class_acc, miou=_nanmean(iou),
        pixel_accuracy=float(tp.sum() / total) if total else math.nan,
        mean_class_accuracy=_nanmean(class_acc), pixels=int(total),
    )


def label_problem(label: np.ndarray, image_hw: tuple[int, int], num_classes: int) -> str | None:
    """Why a (H, W) uint8 label cannot score a prediction for an image of image_hw, or None when it can."""
    if label.shape != tuple(image_hw):
        return (f"label is {label.shape[1]}×{label.shape[0]} (W×H) but the image is "
                f"{image_hw[1]}×{image_hw[0]}")
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=VOID + 1))  # label is uint8
    bad = present[(present >= num_classes) & (present != VOID)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (", …" if bad.size > 8 else "")
        return (f"class values {shown} outside the model's {num_classes} classes "
                f"(0..{num_classes - 1}, {VOID} = void)")
    return None


def _json_number(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 6)


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class Evaluation:
    """Confusion matrices per mode ('no_crf', 'crf') over the images scored, and the files skipped."""

    class_names: list[str]
    modes: tuple[str, ...]
    confusion: dict[str, np.ndarray]
    scored: list[str] = field(default_factory=list)  # sample keys
    problems: list[Problem] = field(default_factory=list)
    total: int = 0  # samples considered (after --limit), scored or not
    interrupted: bool = False  # Ctrl-C: the scores cover the images finished before it

    @classmethod
    def empty(cls, class_names: Sequence[str], modes: Sequence[str]) -> "Evaluation":
        c = len(class_names)
        return cls(list(class_names), tuple(modes), {m: np.zeros((c, c), dtype=np.int64) for m in modes})

    def add(self, key: str, gt: np.ndarray, predictions: dict[str, np.ndarray]) -> None:
        """Accumulate one image: gt (H, W) labels, predictions mode → (H, W) labels."""
        c = len(self.class_names)
        for mode in self.modes:
            self.confusion[mode] += confusion_matrix(gt, predictions[mode], c)
        self.scored.append(key)

    def scores(self, mode: str) -> Scores:
        return scores_from_confusion(self.confusion[mode])

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready report: per mode the metrics, per-class IoU / accuracy and the confusion matrix."""
        results = {}
        for mode in self.modes:
            s = self.scores(mode)
            results[mode] = {
                "miou": _json_number(s.miou),
                "pixel_accuracy": _json_number(s.pixel_accuracy),
                "mean_class_accuracy": _json_number(s.mean_class_accuracy),
                "pixels": s.pixels,
                "per_class": [
                    {"index": i, "name": name, "iou": _json_number(s.iou[i]),
                     "accuracy": _json_number(s.class_accuracy[i]),
                     "gt_pixels": int(self.confusion[mode][i].sum()),
                     "pred_pixels": int(self.confusion[mode][:, i].sum())}
                    for i, name in enumerate(self.class_names)
                ],
                "confusion": self.confusion[mode].tolist(),
            }
        return {
            "images": {"total": self.total, "scored": len(self.scored), "skipped": len(self.problems),
                       "interrupted": self.interrupted},
            "results": results,
            "problems": [p.as_dict() for p in self.problems],
        }


Prediction = tuple[Sample, np.ndarray, dict[str, np.ndarray]]  # sample, gt (H, W), mode → labels (H, W)


def read_label(sample: Sample, image_hw: tuple[int, int], num_classes: int) -> np.ndarray | Problem:
    """Decode a sample's label (H, W) uint8 and check it against its image's (H, W), or say why it cannot be used."""
    try:
        label = read_label_image(sample.label)
    except DeeplabError as exc:
        return Problem(sample.key, str(sample.label), str(exc).removeprefix(f"{sample.label}: "))
    reason = label_problem(label, image_hw, num_classes)
    return Problem(sample.key, str(sample.label), reason) if reason else label


def predict_samples(
    segmenter: Segmenter, samples: Iterable[Sample], modes: Sequence[str], on_problem: Callable[[Problem], None],
    **pipeline: Any,
) -> Iterator[Prediction]:
    """Stream samples through `deeplab batch`'s pipeline (batch.run_batch) and pair each prediction with its label.

    One network pass per image gives both the argmax of the probabilities ('no_crf') and the argmax after
    the CRF ('crf'). Results arrive in completion order. Images that fail to decode or labels that cannot
    be used go to on_problem. pipeline: run_batch's options (batch_size, crf_workers, net_threads, ...).
    """
    jobs = (batch.Job(sample.image, None, tag=sample) for sample in samples)  # outputs=None: nothing is written
    run = batch.run_batch(segmenter, jobs, **{"use_crf": "crf" in modes, "keep_labels_before_crf": "no_crf" in modes,
                                              **pipeline})
    with contextlib.closing(run):
        for result in run:
            sample: Sample = result.job.tag
            if not result.ok:
                on_problem(Problem(sample.key, str(sample.image), result.error or "failed"))
                continue
            gt = read_label(sample, result.shape, segmenter.num_classes)
            if isinstance(gt, Problem):
                on_problem(gt)
                continue
            predictions = {"no_crf": result.labels_before_crf, "crf": result.labels_after_crf}
            yield sample, gt, {mode: predictions[mode] for mode in modes}
    if run.interrupted:
        raise EvaluationInterrupted


class EvaluationInterrupted(Exception):
    """Ctrl-C stopped the stream: the images in flight were finished, the rest never started."""


def evaluate(
    segmenter: Segmenter, dataset: Dataset, modes: Sequence[str] = ("crf",), limit: int | None = None,
    progress: Callable[[Evaluation], None] | None = None, **pipeline: Any,
) -> Evaluation:
    """Score a pipeline.Segmenter on a dataset (its .crf serves mode 'crf'); progress(ev) after each image.

    pipeline: batch.run_batch's options. After a Ctrl-C the result covers the images finished so far and
    has interrupted=True.
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise UsageError(f"unknown evaluation mode(s) {unknown}; choose from {', '.join(MODES)}")
    if "crf" in modes and segmenter.crf is None:
        raise UsageError("scoring with the CRF needs a segmenter with CRF parameters")
    samples = dataset.samples[:limit] if limit is not None else dataset.samples
    result = Evaluation.empty(segmenter.class_names, modes)
    result.problems.extend(dataset.problems)  # found while listing: reported whatever the limit
    result.total = len(samples) + len(result.problems)

    def on_problem(problem: Problem) -> None:
        result.problems.append(problem)
        if progress:
            progress(result)

    try:
        for sample, gt, predictions in predict_samples(segmenter, samples, modes, on_problem, **pipeline):
            result.add(sample.key, gt, predictions)
            if progress:
                progress(result)
    except EvaluationInterrupted:
        result.interrupted = True
    return result


# ---------------------------------------------------------------------------------------------
# The command's inputs and JSON report


def dataset_from(
    root: str | None, split: str = "val", images_dir: str | None = None, labels_dir: str | None = None
) -> Dataset:
    """The dataset a command line names: a VOC root, or --images DIR with --labels DIR."""
    if images_dir or labels_dir:
        if root:
            raise UsageError("give either a VOC dataset folder or --images DIR --labels DIR, not both")
        if not (images_dir and labels_dir):
            raise UsageError("--images and --labels go together: the image folder and the label folder")
        return folder_dataset(images_dir, labels_dir)
    if not root:
        raise UsageError("no dataset: give a VOC-layout folder (e.g. VOCdevkit/VOC2012) or --images DIR --labels DIR")
    return voc_dataset(root, split)


def evaluation_report(
    evaluation: Evaluation, dataset: Dataset, segmenter: Segmenter | None = None, limit: int | None = None,
    weights: str | None = None,
) -> dict[str, Any]:
    """The JSON document of `deeplab evaluate --json`: dataset, model, CRF parameters, then Evaluation.as_dict()."""
    report: dict[str, Any] = {"dataset": {**dataset.source, "limit": limit}}
    if dataset.unmatched_images or dataset.unmatched_labels:
        report["dataset"]["images_without_labels"] = dataset.unmatched_images
        report["dataset"]["labels_without_images"] = dataset.unmatched_labels
    if segmenter is not None:
        report["model"] = {"weights": weights, "arch": segmenter.arch.name, "num_classes": segmenter.num_classes,
                           "device": str(segmenter.device), "precision": segmenter.precision,
                           "pad_to": segmenter.pad_to}
        report["crf"] = ({**segmenter.crf.as_dict(), "backend": segmenter.crf_backend}
                         if "crf" in evaluation.modes and segmenter.crf is not None else None)
    report.update(evaluation.as_dict())
    return report
