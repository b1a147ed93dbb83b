"""The segmentation pipeline: one object owns the model, its device and its transforms.

    seg = Segmenter.from_weights("deeplab_largefov_voc12.safetensors")
    result = seg.segment(read_image("photo.jpg"))   # result.labels: (H, W) uint8

Photos larger than `max_side` (513 by default, the paper's test size) run at a working resolution and
their labels come back at full size (see resolution.py); smaller ones run exactly as Caffe does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .crf import CRFParams, dense_crf, resolve_backend
from .errors import DeeplabError, UsageError
from .memory import available_bytes, estimate_bytes, format_bytes
from .model import DeepLab
from .palette import load_class_names
from .peers import peer_network, resolve_runtime
from .precision import PRECISIONS, check_precision
from .resolution import DEFAULT_MAX_SIDE, downscale, upsample_labels, working_size
from .runtime import PackedNetwork
from .transforms import padded_size, preprocess, scores_to_probs, to_tensor, upsample_scores
from .weightfiles.cache import resolve_weights
from .weightfiles.formats import Weights, build_model, load_weights


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name (precision.PRECISIONS): 'bf16' → torch.bfloat16."""
    return getattr(torch, PRECISIONS[precision])


def select_device(spec: str = "auto") -> torch.device:
    """'auto' → cuda when available else cpu; 'cpu', 'cuda' or 'cuda:N' checked to exist."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {spec!r} asked for, but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise UsageError(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:N")
    return device


@dataclass
class Segmentation:
    """One image's result: labels (H, W) uint8 at full size; probs (C, h, w) float32 before the CRF and
    crf_probs after it, at the working resolution (h, w) = working_size(H, W, max_side)."""

    labels: np.ndarray
    probs: np.ndarray
    crf_probs: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (stages.STAGE_LABELS: network, crf)


class Segmenter:
    """DeepLab v1 on a device: image (H, W, 3) uint8 RGB → probabilities → CRF → labels.

    Defaults are the fastest settings that keep fp32's labels (`deeplab benchmark --fps`): on the CPU fp32 as
    runtime.PackedNetwork (weights packed once, ReLU fused; packed=False: eager PyTorch), on CUDA fp16 autocast
    with channels_last.
    """

    def __init__(
        self,
        model: DeepLab,
        device: str | torch.device = "auto",
        precision: str | None = None,
        pad_to: int | None = None,
        crf: CRFParams | None = CRFParams(),
        crf_backend: str = "auto",
        class_names: Sequence[str] | None = None,
        channels_last: bool = True,
        max_side: int | None = DEFAULT_MAX_SIDE,
        packed: bool | None = None,
        runtime: str = "auto",
    ) -> None:
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.precision = check_precision(precision, self.device.type)
        self.model = model.eval().to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        # On the CPU the network runs as runtime.PackedNetwork (weights packed once, ReLU fused) or, where asked
        # or measured faster (peers.py), on ONNX Runtime / OpenVINO; eager PyTorch on CUDA.
        self.runtime = resolve_runtime(runtime, self.device.type, self.precision)
        self.packed = self.runtime == "torch" and (self.device.type == "cpu" if packed is None else packed)
        if self.packed and self.device.type != "cpu":
            raise UsageError(f"the packed network runs on the CPU, not on {self.device}")
        self.network = (peer_network(self.runtime, self.model, self.precision) if self.runtime != "torch"
                        else PackedNetwork(self.model, self.precision) if self.packed else None)
        self.arch = model.arch
        self.pad_to = pad_to
        if pad_to is not None:
            self.input_size(1, 1)  # validates pad_to against the architecture's alignment
        if max_side is not None and max_side < 1:
            raise UsageError(f"max_side must be at least 1 pixel (or None for full resolution), got {max_side}")
        self.max_side = max_side
        self.crf = crf.validate() if crf is not None else None
        self.crf_backend = resolve_backend(crf_backend, str(self.device))
        self.class_names = list(class_names) if class_names else load_class_names(None, model.num_classes)

    @classmethod
    def from_weights(
        cls, weights: str | os.PathLike | Weights | None = None, arch: str | None = None, **kwargs
    ) -> "Segmenter":
        """Build from a weights file (found by resolve_weights when None); arch overrides the file's metadata."""
        if not isinstance(weights, Weights):
            weights = load_weights(resolve_weights(weights), arch=arch)
        return cls(build_model(weights), **kwargs)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The padded network input size (H', W') for an image of height × width."""
        try:
            return padded_size(height, width, self.arch, self.pad_to)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    @torch.inference_mode()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3, H', W') preprocessed input on the device (see transforms.preprocess) → fc8 scores (N, C, h, w)."""
        if self.network is not None:
            return self.network(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "fp32":
            return self.model(x)
        with torch.autocast(self.device.type, dtype=torch_dtype(self.precision)):
            return self.model(x)

    @torch.inference_mode()
    def predict_probs_batch(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Images (H, W, 3) uint8 sharing one padded size → softmax probabilities [(C, H, W) float32] on the device."""
        sizes = {self.input_size(*im.shape[:2]) for im in images}
        if len(sizes) != 1:
            raise ValueError(f"a batch must share one padded size, got {sorted(sizes)}")
        scores = self.scores(self.prepare(images, sizes.pop()))
        return self.probs_from_scores(scores, [im.shape[:2] for im in images])

    def prepare(self, images: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
        """Images (H, W, 3) uint8 RGB → the preprocessed batch (N, 3, *size) float32 on the device."""
        return torch.cat([preprocess(to_tensor(im, self.device)[None], size) for im in images])

    def probs_from_scores(self, scores: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """fc8 scores (N, C, h, w) → ×8 upsampled softmax probabilities [(C, H, W) float32] cropped to each (H, W)."""
        up = upsample_scores(scores, self.arch)
        return [scores_to_probs(up[i], h, w) for i, (h, w) in enumerate(shapes)]

    def predict_probs(self, image: np.ndarray) -> np.ndarray:
        """image (H, W, 3) uint8 RGB → softmax probabilities (C, H, W) float32 at input resolution, before the CRF."""
        return self.predict_probs_batch([image])[0].cpu().numpy()

    def refine(self, image: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Apply this segmenter's CRF: image (H, W, 3) uint8, probs (C, H, W) → Q (C, H, W) float32."""
        if self.crf is None:
            return probs
        return dense_crf(image, probs, self.crf, self.crf_backend, str(self.device))

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) that an image of height × width runs at: itself up to max_side, else downscaled to it."""
        return working_size(height, width, self.max_side)

    def check_memory(self, height: int, width: int) -> None:
        """Refuse in one line (DeeplabError) when an image of height × width would not fit in memory."""

        def need(max_side: int | None) -> int:
            work = working_size(height, width, max_side)
            return estimate_bytes(self.arch.name, self.num_classes, self.input_size(*work), work, self.crf is not None)

        have = available_bytes(self.device.type, self.device.index)
        if need(self.max_side) <= have:
            return
        work = self.working_size(height, width)
        lo, hi = 1, max(work)  # the largest --max-side that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if need(mid) <= have else (lo, mid - 1)
        raise DeeplabError(f"needs about {format_bytes(need(self.max_side))} of memory at {work[1]}×{work[0]} on "
                           f"{self.device}, {format_bytes(have)} available; use --max-side {lo} or smaller")

    def segment(self, image: np.ndarray, size: tuple[int, int] | None = None) -> Segmentation:
        """The whole pipeline for one image (H, W, 3) uint8 RGB → labels (H, W) after the CRF (or without one).

        size: the full (H, W) when image was decoded at a reduced scale (io.decode_photo); labels come back
        at size. An image larger than max_side runs downscaled and its labels are upsampled in tiles.
        """
        full = tuple(size) if size is not None else image.shape[:2]
        work = self.working_size(*full)
        self.check_memory(*full)
        t0 = time.perf_counter()
        image = downscale(image, work)
        t1 = time.perf_counter()
        timings = {"resize": t1 - t0} if work != full else {}
        try:
            probs = self.predict_probs(image)
            t2 = time.perf_counter()
            timings["network"] = t2 - t1
            crf_probs = None
            final = probs
            if self.crf is not None:
                crf_probs = final = self.refine(image, probs)
                timings["crf"] = time.perf_counter() - t2
        except torch.cuda.OutOfMemoryError:  # the pre-flight estimate was short: one line, not a traceback
            torch.cuda.empty_cache()
            raise DeeplabError(f"out of memory on {self.device} at {work[1]}×{work[0]}; "
                               "use a smaller --max-side or --device cpu") from None
        t3 = time.perf_counter()
        labels = upsample_labels(final, full)
        if work != full:
            timings["restore"] = time.perf_counter() - t3
        return Segmentation(labels, probs, crf_probs, timings)
