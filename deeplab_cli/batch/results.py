"""What a run gives for each image: its `ImageResult` (and its --report line), and its written outputs.

Shared by both engines (batch.engine, batch.ray_stages) and by video runs (batch.videos).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import storage
from ..io import decode_photo, encode_image, encode_mask_png, encode_probs, overlay_image
from .inputs import Job, OutputPaths


@dataclass(eq=False)
class ImageResult:
    """One image's outcome. status: 'done', 'failed' or 'skipped'; arrays are None unless asked for (keep_*).

    labels_before_crf / labels_after_crf: (H, W) uint8; image: (H, W, 3) uint8; probs (before the CRF) and
    crf_probs (after): (C, H, W) float32; timings: seconds per stage (stages.BATCH_STAGES) spent on this image.
    """

    job: Job
    status: str
    error: str | None = None
    shape: tuple[int, int] | None = None
    labels_before_crf: np.ndarray | None = None
    labels_after_crf: np.ndarray | None = None
    image: np.ndarray | None = None
    probs: np.ndarray | None = None
    crf_probs: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray | None:
        """The final labels: after the CRF when there was one, else the network's argmax."""
        return self.labels_after_crf if self.labels_after_crf is not None else self.labels_before_crf

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def report_record(self) -> dict[str, Any]:
        """The --report line: path, output, status, error, timings (seconds), plus size and extra outputs."""
        outputs = self.job.outputs
        record = report_line(self.job.path, outputs.mask if outputs else None, self.status, self.error, self.timings)
        if self.shape is not None:
            record["size"] = [self.shape[1], self.shape[0]]  # width, height as image tools print them
        if outputs and outputs.overlay:
            record["overlay"] = str(outputs.overlay)
        if outputs and outputs.probs:
            record["probs"] = str(outputs.probs)
        return record


def report_line(path: Path, output: Path | None, status: str, error: str | None,
                timings: dict[str, float]) -> dict[str, Any]:
    """The keys every --report line starts with: path, output, status, error, timings (seconds)."""
    return {"path": str(path), "output": str(output) if output else None, "status": status, "error": error,
            "timings": {k: round(v, 6) for k, v in timings.items()}}


def skipped_result(job: Job) -> ImageResult:
    """The result recorded for a job whose outputs are already complete."""
    return ImageResult(job, "skipped")


def error_text(exc: BaseException, path: Path) -> str:
    """An exception as a one-line reason, without the path prefix our own errors carry."""
    text = str(exc) or type(exc).__name__
    prefix = f"{path}: "
    text = text.removeprefix(prefix)
    return " ".join(text.split())


def write_outputs(outputs: OutputPaths, image: np.ndarray, labels: np.ndarray, probs: np.ndarray | None = None,
                  class_names: Sequence[str] | None = None, source: str | None = None) -> None:
    """Write the probabilities and the overlay (legend of class_names when outputs.legend) that outputs asks for,
    then the mask, last: it marks the image as complete. Each file whole or not at all, at a path or URL
    (storage.write_bytes). labels (H, W) at full size; image (H, W, 3), or smaller (a working resolution): the
    overlay then decodes `source` again at full size."""
    if outputs.probs is not None:
        storage.write_bytes(str(outputs.probs), encode_probs(probs))
    if outputs.overlay is not None:
        if image.shape[:2] != labels.shape and source is not None:
            image = decode_photo(storage.read_bytes(source), source)[0]
        overlay = overlay_image(image, labels, class_names if outputs.legend else None)
        storage.write_bytes(str(outputs.overlay), encode_image(overlay, outputs.overlay))
    storage.write_bytes(str(outputs.mask), encode_mask_png(labels))
