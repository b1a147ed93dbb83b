"""`deeplab benchmark`: how fast each stage of the pipeline runs on this machine, and at what accuracy cost.

    report = run_benchmark(BenchmarkOptions(size=(513, 513), iters=5))   # a JSON-able dict (keys in README)
    console.render_benchmark(report, console.stderr_console())         # the command's tables (console.py)

Every figure is a median over `iters` timed runs after `warmup` untimed ones, with min and max, in
milliseconds per image. On CUDA the device is synchronised before and after every timed section, so
queued kernels are charged to the stage that launched them. Speed does not depend on weight values:
without a weights file (--weights, $DEEPLAB_WEIGHTS or the cached default model) the real architecture runs
with seeded random (He-initialised) weights (testing.random_model).
"""

from __future__ import annotations

import io
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .cpu import cpu_name
from .crf import AUTO_PRESET, BACKENDS, CRFParams, crf_params, dense_crf, resolve_backend
from .errors import UsageError
from .io import decode_image, decode_photo, encode_mask_png, is_image_path, read_bytes
from .model import ARCHS, DeepLab
from .palette import load_class_names
from .peers import RECORD_MIN_SIDE, choose_runtimes, missing
from .pipeline import Segmenter, select_device, torch_dtype
from .precision import check_precision
from .resolution import DEFAULT_MAX_SIDE, downscale, working_size
from .stages import BENCHMARK_STAGES as STAGES
from .stages import STAGE_LABELS as _ALL_LABELS
from .testing import random_model
from .weightfiles.cache import WEIGHTS_ENV, cached_model_path, resolve_weights
from .weightfiles.formats import build_model, load_weights

T = TypeVar("T")

STAGE_LABELS: dict[str, str] = {stage: _ALL_LABELS[stage] for stage in STAGES}
AGREEMENT_THRESHOLD = 0.995  # a variant whose labels agree less often with fp32 is not "correct"
CRF_BACKENDS: tuple[str, ...] = tuple(b for b in BACKENDS if b != "auto")


@dataclass
class BenchmarkOptions:
    """What to time: image size (H, W) in pixels, batch size, runs, device, precision and the CRF."""

    size: tuple[int, int] = (513, 513)
    batch_size: int = 1
    iters: int = 5
    warmup: int = 1
    device: str = "auto"
    precision: str | None = None  # None: the pipeline's default for the device
    channels_last: bool = True  # as Segmenter does by default
    runtime: str = "auto"  # what runs the network (precision.RUNTIMES)
    arch: str | None = None  # None: the weights file's, else largefov
    weights: str | os.PathLike | None = None  # None: random weights of the real architecture
    classes_file: str | os.PathLike | None = None
    pad_to: int | None = None
    images: str | os.PathLike | None = None  # a folder of images to decode instead of generated ones
    max_side: int | None = DEFAULT_MAX_SIDE  # decoded --images larger than this are brought to it, as segment does
    crf_preset: str = AUTO_PRESET  # a key of crf.PRESETS, or auto: the weights' (else the architecture's) preset
    crf_overrides: dict[str, float | int | None] = field(default_factory=dict)  # CRFParams fields (None: preset's)
    use_crf: bool = True
    crf_backend: str = "auto"
    fps: bool = True  # time the pipeline stage by stage
    variants: bool = True  # time every precision / memory format of the device, with argmax agreement
    compare: bool = False  # time the CRF backends side by side
    seed: int = 0

    def validate(self) -> BenchmarkOptions:
        """Raise UsageError for values that cannot be benchmarked."""
        if len(self.size) != 2 or min(self.size) < 1:
            raise UsageError(f"--size {format_size(self.size)}: height and width must be at least 1 pixel")
        for name, value, low in (("--batch-size", self.batch_size, 1), ("--iters", self.iters, 1), ("--warmup", self.warmup, 0)):
            if value < low:
                raise UsageError(f"{name} {value}: must be at least {low}")
        if self.arch is not None and self.arch not in ARCHS:
            raise UsageError(f"unknown architecture {self.arch!r}; choose one of: {', '.join(ARCHS)}")
        if self.crf_backend not in BACKENDS:
            raise UsageError(f"unknown CRF backend {self.crf_backend!r}; choose one of: {', '.join(BACKENDS)}")
        if not (self.fps or self.compare):
            raise UsageError("nothing to do: ask for --fps and/or --compare")
        self.crf_params()  # fails now rather than after loading the model
        return self

    def crf_params(self, model_preset: str = "largefov") -> CRFParams:
        """The CRF parameters to time, for a model whose own preset is model_preset; UsageError if unusable."""
        try:
            return crf_params(self.crf_preset, model_preset, **self.crf_overrides)
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def parse_size(text: str) -> tuple[int, int]:
    """'513' → (513, 513); '375x500' → (375, 500), i.e. HEIGHTxWIDTH in pixels."""
    parts = text.strip().lower().replace("×", "x").split("x")
    try:
        if len(parts) == 1:
            size = (int(parts[0]), int(parts[0]))
        elif len(parts) == 2:
            size = (int(parts[0]), int(parts[1]))
        else:
            raise ValueError
    except ValueError:
        raise UsageError(f"--size {text!r}: expected HEIGHTxWIDTH (e.g. 375x500) or one number for a square") from None
    if min(size) < 1:
        raise UsageError(f"--size {text}: height and width must be at least 1 pixel")
    return size


def format_size(size: Sequence[int]) -> str:
    return "x".join(str(s) for s in size)


# ---------------------------------------------------------------------------------------------
# Timing


class Clock:
    """Wall-clock timing of a call; on CUDA the device is synchronised before and after it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[..., T], *args: Any) -> tuple[T, float]:
        """Run fn(*args) → (its result, elapsed seconds)."""
        self.sync()
        start = time.perf_counter()
        result = fn(*args)
        self.sync()
        return result, time.perf_counter() - start


def spread_ms(seconds: Sequence[float], per: int = 1) -> dict[str, float]:
    """Timed runs in seconds, each covering `per` images → {median_ms, min_ms, max_ms} per image."""
    ms = [1000.0 * s / per for s in seconds]
    return {"median_ms": round(statistics.median(ms), 3), "min_ms": round(min(ms), 3), "max_ms": round(max(ms), 3)}


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None, reps: int = 5) -> float:
    """The device's measured (n × n) @ (n × n) matrix-multiply throughput in GFLOP/s (best of reps: a ceiling)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    clock = Clock(device)
    torch.mm(a, b)
    seconds = [clock.time(torch.mm, a, b)[1] for _ in range(reps)]
    return 2.0 * n**3 / min(seconds) / 1e9


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 / AMX) that oneDNN uses."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def variants_for(device: torch.device) -> list[dict[str, Any]]:
    """The network variants worth timing on a device, eager fp32 contiguous first (the reference): each a dict of
    precision, channels_last, packed and runtime (Segmenter's arguments).

    On the CPU: eager fp32 without and with channels_last, runtime.PackedNetwork (the default) in fp32 and, on
    CPUs with bf16 instructions, bf16, then the installed peers (peers.py): ONNX Runtime fp32, OpenVINO fp32 and
    bf16. On CUDA: every precision, eager, without and with channels_last.
    """
    def v(precision: str, channels_last: bool, packed: bool = False, runtime: str = "torch") -> dict[str, Any]:
        return {"precision": precision, "channels_last": channels_last, "packed": packed, "runtime": runtime}
    if device.type == "cuda":
        precisions = ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
        return [v(p, cl) for p in precisions for cl in (False, True)]
    bf16 = cpu_supports_bf16()
    out = [v("fp32", False), v("fp32", True), v("fp32", True, True)] + ([v("bf16", True, True)] if bf16 else [])
    out += [v("fp32", True, runtime="onnxruntime")] if missing("onnxruntime") is None else []
    out += [v(p, True, runtime="openvino") for p in ["fp32"] + ["bf16"] * bf16] if missing("openvino") is None else []
    return out


def variant_name(variant: dict[str, Any]) -> str:
    """'fp32', 'fp32 + channels_last', 'bf16 packed', 'fp32 on openvino'."""
    precision = variant["precision"]
    if variant.get("runtime", "torch") != "torch":
        return f"{precision} on {variant['runtime']}"
    return precision + (" packed" if variant.get("packed") else " + channels_last" if variant["channels_last"] else "")


# ---------------------------------------------------------------------------------------------
# Inputs


def _smooth_noise(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 texture in about ±1: random colour fields at four scales, bicubically upsampled and summed."""
    from PIL import Image

    out = np.zeros((height, width, 3), np.float32)
    for cells, amp in ((2, 0.5), (6, 0.3), (24, 0.15), (96, 0.05)):
        small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        up = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
        out += amp * (up / 127.5 - 1.0)
    return out


def synthetic_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A photo-like (H, W, 3) uint8 RGB image: textured background and objects at several scales, sensor noise.

    Content matters for timing: JPEG decoding and the CRF's bilateral lattice (one point per occupied
    cell of position and colour) cost more on varied colours than on flat ones; this texture makes
    both cost about what they do on photos.
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = 128.0 + 140.0 * _smooth_noise(height, width, rng)
    for _ in range(rng.integers(3, 7)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.1, 0.4) * height + 1, rng.uniform(0.1, 0.4) * width + 1
        inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
        obj = rng.uniform(30, 225, 3) + 60.0 * _smooth_noise(height, width, rng)
        img = np.where(inside[..., None], obj, img)
    img += rng.normal(0.0, 3.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """(H, W, 3) uint8 RGB → JPEG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def fit_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (H, W, 3) uint8 to size (H', W') with bilinear filtering; unchanged when it already fits."""
    if image.shape[:2] == tuple(size):
        return image
    from PIL import Image

    return np.array(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))  # writable, as torch wants


@dataclass
class ImageSource:
    """Encoded images to decode in turn: (name, bytes) pairs and where they came from."""

    files: list[tuple[str, bytes]]
    origin: str  # "generated" or the folder

    def batch(self, index: int, batch_size: int) -> list[tuple[str, bytes]]:
        """The index-th batch, cycling through the files."""
        return [self.files[(index * batch_size + j) % len(self.files)] for j in range(batch_size)]


def image_source(opts: BenchmarkOptions) -> ImageSource:
    """The images of --images DIR (read once, decoded in every run), else batch_size generated JPEGs."""
    if opts.images is None:
        rng = np.random.default_rng(opts.seed)
        files = [(f"generated-{i}.jpg", encode_jpeg(synthetic_image(*opts.size, rng))) for i in range(opts.batch_size)]
        return ImageSource(files, "generated")
    folder = Path(opts.images)
    if not folder.is_dir():
        raise UsageError(f"--images {folder}: not a directory")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and is_image_path(p))
    if not paths:
        raise UsageError(f"--images {folder}: no image files (.jpg, .png, ...) in it")
    return ImageSource([(str(p), read_bytes(p)) for p in paths], str(folder))


# ---------------------------------------------------------------------------------------------
# The model and the CRF backends


def available_crf_backends() -> dict[str, str | None]:
    """Each CRF backend → None when it can run here, else why not (one line)."""
    status: dict[str, str | None] = {}
    for backend in CRF_BACKENDS:
        try:
            if backend == "pydensecrf":
                import pydensecrf.densecrf  # noqa: F401
            else:
                from .meanfield import dense_crf_torch  # noqa: F401
            status[backend] = None
        except Exception as exc:  # noqa: BLE001 - a half-written or broken module fails in many ways
            status[backend] = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return status


def choose_crf_backend(requested: str, device: torch.device, status: dict[str, str | None]) -> tuple[str, str | None]:
    """The CRF backend the pipeline will use → (backend, a note when 'auto' had to fall back)."""
    backend = resolve_backend(requested, str(device))
    if status.get(backend) is None:
        return backend, None
    if requested == "auto":
        for other in CRF_BACKENDS:
            if status.get(other) is None:
                return other, f"CRF backend {backend} is not available ({status[backend]}); using {other}"
    raise UsageError(f"CRF backend {backend} is not available: {status[backend]}")


def default_weights_path() -> Path | None:
    """$DEEPLAB_WEIGHTS (which must exist), else the cached default model when there is one, else None."""
    if os.environ.get(WEIGHTS_ENV):
        return resolve_weights(None)
    path = cached_model_path()
    return path if path.is_file() else None


def load_model(opts: BenchmarkOptions) -> tuple[DeepLab, str | None, str]:
    """The model to time: --weights, else the default weights if found, else random weights of --arch
    → (model, weights path or None, the model's CRF preset)."""
    path = resolve_weights(opts.weights) if opts.weights is not None else default_weights_path()
    if path is not None:
        weights = load_weights(path, arch=opts.arch)
        if opts.classes_file is not None:
            load_class_names(opts.classes_file, weights.num_classes)  # checks the count
        return build_model(weights), str(weights.path), weights.crf_preset
    num_classes = len(load_class_names(opts.classes_file)) if opts.classes_file is not None else 21
    arch = ARCHS[opts.arch or "largefov"]
    return random_model(arch.name, num_classes, opts.seed), None, arch.crf_preset


def make_segmenter(model: DeepLab, device: torch.device, precision: str | None, channels_last: bool,
                   opts: BenchmarkOptions, crf: CRFParams | None = None, crf_backend: str = "pydensecrf",
                   packed: bool | None = None, runtime: str | None = None) -> Segmenter:
    """A Segmenter over the shared model, its memory format reset first (channels_last converts it in place)."""
    model.to(memory_format=torch.contiguous_format)
    return Segmenter(model, device=device, precision=precision, pad_to=opts.pad_to, crf=crf,
                     crf_backend=crf_backend, channels_last=channels_last, max_side=opts.max_side, packed=packed,
                     runtime=runtime or opts.runtime)


# ---------------------------------------------------------------------------------------------
# Running


def device_name(device: torch.device) -> str:
    """A human name for the device (GPU model, or the CPU's model name)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def environment(opts: BenchmarkOptions, device: torch.device, seg: Segmenter, weights: str | None,
                source: ImageSource, crf_backend: str | None, crf: CRFParams, crf_preset: str) -> dict[str, Any]:
    """What the figures depend on: device, software, threads, precision, sizes, images, CRF settings."""
    env: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": cpu_supports_bf16(),
        "precision": seg.precision,
        "channels_last": seg.channels_last,
        "packed": seg.packed,
        "runtime": seg.runtime,
        "arch": seg.arch.name,
        "num_classes": seg.num_classes,
        "weights": weights,
        "random_weights": weights is None,
        "image_size": list(opts.size),
        "input_size": list(seg.input_size(*opts.size)),
        "max_side": opts.max_side,
        "batch_size": opts.batch_size,
        "iters": opts.iters,
        "warmup": opts.warmup,
        "images": source.origin,
        "image_count": len(source.files),
        "crf_backend": crf_backend,
        "crf": crf.as_dict() if crf_backend else None,
        "crf_preset": crf_preset if crf_backend else None,
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        env["tf32_conv"] = torch.backends.cudnn.allow_tf32
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


def probs_of(seg: Segmenter, scores: torch.Tensor, heights_widths: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """fc8 scores (N, C, h, w) → per image (C, H, W) float32 softmax probabilities on the host."""
    return [p.cpu().numpy() for p in seg.probs_from_scores(scores, heights_widths)]


def decode_all(files: Sequence[tuple[str, bytes]], max_side: int | None = None) -> list[np.ndarray]:
    """(name, encoded bytes) pairs → (h, w, 3) uint8 RGB images at their working resolution (as segment decodes)."""
    out = []
    for name, data in files:
        image, full = decode_photo(data, name, max_side)
        out.append(downscale(image, working_size(*full, max_side)))
    return out


def refine_all(seg: Segmenter, images: Sequence[np.ndarray], probs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The segmenter's CRF on each (image, probs) pair → Q (C, H, W) float32 each."""
    return [seg.refine(im, p) for im, p in zip(images, probs)]


def encode_all(probs: Sequence[np.ndarray]) -> list[bytes]:
    """Per image (C, H, W) probabilities → argmax labels → palette PNG bytes (what `segment` writes)."""
    return [encode_mask_png(q.argmax(axis=0).astype(np.uint8)) for q in probs]


@torch.inference_mode()
def time_pipeline(seg: Segmenter, source: ImageSource, opts: BenchmarkOptions, clock: Clock,
                  log: Callable[[str], None]) -> tuple[dict[str, list[float]], list[np.ndarray]]:
    """Warm-up then timed runs of every stage on one batch each → (stage → seconds per run, last batch's images)."""
    input_size = seg.input_size(*opts.size)
    runs: dict[str, list[float]] = {s: [] for s in STAGES}
    images: list[np.ndarray] = []
    total = opts.warmup + opts.iters
    for run in range(total):
        t: dict[str, float] = {}
        batch = source.batch(run, opts.batch_size)
        decoded, t["decode"] = clock.time(decode_all, batch, opts.max_side)
        images = [fit_image(im, opts.size) for im in decoded]  # untimed: the real pipeline does not resize
        x, t["preprocess"] = clock.time(seg.prepare, images, input_size)
        scores, t["network"] = clock.time(seg.scores, x)
        probs, t["upsample"] = clock.time(probs_of, seg, scores, [im.shape[:2] for im in images])
        if seg.crf is not None:
            final, t["crf"] = clock.time(refine_all, seg, images, probs)
        else:
            final = probs
        _, t["encode"] = clock.time(encode_all, final)
        if run >= opts.warmup:
            for stage, seconds in t.items():
                runs[stage].append(seconds)
        log(f"pipeline {'warm-up' if run < opts.warmup else 'run'} {run + 1}/{total}: "
            f"{1000 * sum(t.values()) / opts.batch_size:.0f} ms/image")
    return runs, images


@torch.inference_mode()
def time_variants(model: DeepLab, device: torch.device, images: Sequence[np.ndarray], opts: BenchmarkOptions,
                  clock: Clock, flops: int, matmul: dict[str, float], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Network time, GFLOP/s and argmax agreement with fp32 of every precision / memory-format variant.

    matmul: precision → measured matmul GFLOP/s, filled in as needed (one measurement per dtype and run).
    """
    results: list[dict[str, Any]] = []
    reference: list[np.ndarray] | None = None
    hw = [im.shape[:2] for im in images]
    for variant in variants_for(device):
        precision = variant["precision"]
        seg = make_segmenter(model, device, precision, variant["channels_last"], opts, packed=variant["packed"],
                             runtime=variant["runtime"])
        x = seg.prepare(images, seg.input_size(*opts.size))
        for _ in range(opts.warmup):
            seg.scores(x)
        seconds = []
        for _ in range(opts.iters):
            scores, s = clock.time(seg.scores, x)
            seconds.append(s)
        labels = [p.argmax(axis=0) for p in probs_of(seg, scores, hw)]
        if reference is None:
            reference = labels
        agree = float(np.mean(np.concatenate([(a == b).ravel() for a, b in zip(labels, reference)])))
        if precision not in matmul:
            matmul[precision] = matmul_gflops(device, torch_dtype(precision))
        median = statistics.median(seconds)
        gflops = flops * opts.batch_size / median / 1e9
        results.append({
            **variant,
            "network": spread_ms(seconds, opts.batch_size),
            "fps": round(opts.batch_size / median, 3),
            "gflops": round(gflops, 2),
            "matmul_gflops": round(matmul[precision], 2),
            "fraction_of_matmul": round(gflops / matmul[precision], 4),
            "agreement": round(agree, 6),
        })
        log(f"variant {variant_name(variant)}: {1000 * median / opts.batch_size:.0f} ms/image, "
            f"argmax agreement with fp32 {100 * agree:.2f}%")
    model.to(memory_format=torch.contiguous_format)
    return results


def compare_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams, device: torch.device, opts: BenchmarkOptions,
                clock: Clock, status: dict[str, str | None], log: Callable[[str], None]) -> dict[str, Any]:
    """Time every available CRF backend on the same image (H, W, 3) and probs (C, H, W), side by side."""
    available = [b for b in CRF_BACKENDS if status[b] is None]
    results: list[dict[str, Any]] = []
    reference: np.ndarray | None = None
    first_median: float | None = None
    for backend in available:
        crf_device = str(device) if backend == "torch" else "cpu"
        args = (image, probs, params, backend, crf_device)
        for _ in range(opts.warmup):
            dense_crf(*args)
        seconds = []
        for _ in range(opts.iters):
            q, s = clock.time(dense_crf, *args)
            seconds.append(s)
        labels = q.argmax(axis=0)
        if reference is None:
            reference, first_median = labels, statistics.median(seconds)
        median = statistics.median(seconds)
        results.append({
            "backend": backend,
            "device": crf_device,
            "crf": spread_ms(seconds),
            "speedup": round(first_median / median, 3),
            "agreement": round(float(np.mean(labels == reference)), 6),
        })
        log(f"CRF {backend} on {crf_device}: {1000 * median:.0f} ms/image")
    return {
        "available": available,
        "unavailable": {b: why for b, why in status.items() if why is not None},
        "reference": available[0] if available else None,
        "image_size": list(image.shape[:2]),
        "backends": results,
    }


def run_benchmark(opts: BenchmarkOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark that opts describe → a JSON-able report (keys documented in README.md)."""
    opts.validate()
    log = log or (lambda message: None)
    device = select_device(opts.device)
    check_precision(opts.precision, device.type)
    source = image_source(opts)
    model, weights, model_preset = load_model(opts)
    crf = opts.crf_params(model_preset)
    crf_preset = model_preset if opts.crf_preset == AUTO_PRESET else opts.crf_preset
    if weights is None:
        log(f"using randomly initialised weights of the real {model.arch.name} architecture "
            "(speed does not depend on weight values; argmax agreement does: use --weights for figures that hold)")
    status = available_crf_backends()
    crf_backend, note = choose_crf_backend(opts.crf_backend, device, status) if opts.use_crf else (None, None)
    if note:
        log(note)
    seg = make_segmenter(model, device, opts.precision, opts.channels_last, opts,
                         crf=crf if opts.use_crf else None, crf_backend=crf_backend or "pydensecrf")
    report: dict[str, Any] = {"environment": environment(opts, device, seg, weights, source, crf_backend, crf,
                                                         crf_preset)}
    load = report["environment"]["load_average"]
    if load and load[0] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: the machine is busy (load average {load[0]:.2f} on {os.cpu_count()} cores); timings may be inflated")
    clock = Clock(device)
    input_size = seg.input_size(*opts.size)
    flops = model.conv_flops(*input_size)

    if opts.fps:
        runs, images = time_pipeline(seg, source, opts, clock, log)
        per_run_no_crf = [sum(runs[s][i] for s in STAGES if s != "crf") for i in range(opts.iters)]
        per_run = [a + (runs["crf"][i] if runs["crf"] else 0.0) for i, a in enumerate(per_run_no_crf)]
        network_s = statistics.median(runs["network"])
        matmul = {seg.precision: matmul_gflops(device, torch_dtype(seg.precision))}
        gflops = flops * opts.batch_size / network_s / 1e9
        report["stages"] = {s: spread_ms(runs[s], opts.batch_size) if runs[s] else None for s in STAGES}
        report["end_to_end"] = {
            "with_crf": spread_ms(per_run, opts.batch_size) if seg.crf is not None else None,
            "without_crf": spread_ms(per_run_no_crf, opts.batch_size),
        }
        report["fps"] = {
            "network": round(opts.batch_size / network_s, 3),
            "end_to_end": round(opts.batch_size / statistics.median(per_run), 3) if seg.crf is not None else None,
            "end_to_end_without_crf": round(opts.batch_size / statistics.median(per_run_no_crf), 3),
        }
        report["gflops"] = {
            "network_gflop_per_image": round(flops / 1e9, 3),
            "network": round(gflops, 2),
            "matmul": round(matmul[seg.precision], 2),
            "matmul_dtype": seg.precision,
            "fraction_of_matmul": round(gflops / matmul[seg.precision], 4),
        }
        if opts.variants:
            variants = time_variants(model, device, images, opts, clock, flops, matmul, log)
            report["variants"] = variants
            correct = [v for v in variants if v["agreement"] >= AGREEMENT_THRESHOLD]
            best = min(correct, key=lambda v: v["network"]["median_ms"])
            report["recommended"] = {key: best[key] for key in ("precision", "channels_last", "packed", "runtime")}
            report["recommended"]["agreement_threshold"] = AGREEMENT_THRESHOLD
            if device.type == "cpu":
                report["runtime_choice"] = choose_runtimes(variants, {"size": list(opts.size), "batch_size":
                                                                     opts.batch_size}, min(opts.size) >= RECORD_MIN_SIDE)
    else:
        images = [fit_image(decode_image(data, name), opts.size) for name, data in source.batch(0, 1)]

    if opts.compare:
        with torch.inference_mode():
            probe = make_segmenter(model, device, opts.precision, False, opts)
            probs = probs_of(probe, probe.scores(probe.prepare(images[:1], input_size)), [images[0].shape[:2]])[0]
        report["crf_compare"] = compare_crf(images[0], probs, crf, device, opts, clock, status, log)
    return report
