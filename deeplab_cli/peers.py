"""Other CPU runtimes for the network, as optional extras: ONNX Runtime (`pip install 'deeplab-cli[onnxruntime]'`)
and OpenVINO (`pip install 'deeplab-cli[openvino]'`), both running our ONNX export; and which runtime `auto` picks.

    net = peer_network("openvino", model, "bf16")   # exports the model to ONNX in memory (0.7 s for LargeFOV)
    scores = net(x)                                 # x (N, 3, H, W) float32 → scores (N, C, h, w) float32

The export (`export_onnx`, `deeplab export --format onnx`) has dynamic batch and size axes; ONNX Runtime and
OpenVINO reproduce our fp32 scores within ~1e-6 relative (tests/test_peers.py checks 1e-4). OpenVINO compiles
the model once per input shape. `auto` stays on our runtime (PackedNetwork) unless `deeplab benchmark` measured a
peer faster on this CPU, thread count and precision with labels as good as ours (fp32: identical to eager
PyTorch; bf16: agreeing with fp32 at least as often as our bf16), timed on photo-sized inputs (both sides ≥
RECORD_MIN_SIDE: on tiny ones per-call overheads decide): it records that choice in the cache directory
(runtime-choice.json), and `auto` follows the record while the peer is installed.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .cpu import cpu_name
from .errors import UsageError
from .io import write_bytes
from .model import DeepLab
from .precision import PEERS, RUNTIMES
from .weightfiles.cache import cache_dir

CHOICE_FILE = "runtime-choice.json"
RECORD_MIN_SIDE = 256  # pixels: benchmarks on smaller inputs report a choice but do not record it


def onnx_bytes(model: DeepLab) -> bytes:
    """The model as ONNX (opset 17; input `data` (N, 3, H, W), output `scores` (N, C, h, w), N, H, W dynamic)."""
    try:
        import onnx  # noqa: F401 - torch's exporter needs it
    except ImportError:
        raise UsageError("exporting to ONNX needs the onnx package: pip install 'deeplab-cli[onnxruntime]'") from None
    buf = io.BytesIO()
    side = 8 * model.arch.pad_multiple + model.arch.pad_remainder  # an aligned size; H and W are dynamic axes
    example = torch.zeros((1, 3, side, side))
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(model.cpu().float().eval(), (example,), buf, input_names=["data"], output_names=["scores"],
                          opset_version=17, dynamo=False,
                          dynamic_axes={"data": {0: "batch", 2: "height", 3: "width"},
                                        "scores": {0: "batch", 2: "score_height", 3: "score_width"}})
    return buf.getvalue()


def export_onnx(model: DeepLab, path: str | os.PathLike) -> None:
    """Write the model as an ONNX file (atomically; '-' for stdout)."""
    write_bytes(path, onnx_bytes(model))


def missing(runtime: str) -> str | None:
    """None when a peer runtime can run here, else the one-line reason."""
    import importlib.util

    module = PEERS[runtime]
    if importlib.util.find_spec(module) is None:
        return f"--runtime {runtime} needs {module}: pip install 'deeplab-cli[{runtime}]'"
    return None


class OnnxRuntimeNetwork:
    """The exported model on ONNX Runtime's CPU provider (all graph optimisations), fp32."""

    def __init__(self, onnx: bytes, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3, H, W) float32 on the CPU → scores (N, C, h, w) float32."""
        return torch.from_numpy(self.session.run(None, {"data": x.contiguous().numpy()})[0])


class OpenVinoNetwork:
    """The exported model on OpenVINO's CPU plugin, compiled once per input shape; fp32 (its f32 precision hint)
    or bf16 (its hint on CPUs with bf16 instructions)."""

    def __init__(self, onnx: bytes, precision: str, threads: int) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.onnx = onnx
        self.config = {"INFERENCE_NUM_THREADS": threads,
                       "INFERENCE_PRECISION_HINT": "f32" if precision == "fp32" else "bf16"}
        self.requests: dict[tuple[int, ...], object] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3, H, W) float32 on the CPU → scores (N, C, h, w) float32."""
        shape = tuple(x.shape)
        if shape not in self.requests:
            model = self.core.read_model(model=self.onnx, weights=b"")
            model.reshape({0: list(shape)})
            self.requests[shape] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        out = self.requests[shape].infer({0: x.contiguous().numpy()})
        return torch.from_numpy(next(iter(out.values())).copy())


def peer_network(runtime: str, model: DeepLab, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network on a peer runtime (CPU); UsageError when it is not installed or has no such precision."""
    why = missing(runtime)
    if why:
        raise UsageError(why)
    if runtime == "onnxruntime" and precision != "fp32":
        raise UsageError(f"--runtime onnxruntime runs fp32 only, not {precision}")
    threads = torch.get_num_threads()
    if runtime == "onnxruntime":
        return OnnxRuntimeNetwork(onnx_bytes(model), threads)
    return OpenVinoNetwork(onnx_bytes(model), precision, threads)


def _choice_key(precision: str) -> str:
    return f"{cpu_name()}|{torch.get_num_threads()} threads|{precision}"


def _choice_path() -> Path:
    return cache_dir() / CHOICE_FILE


def recorded_runtime(precision: str) -> str | None:
    """The peer `deeplab benchmark` recorded as faster here for this precision (and installed), else None."""
    try:
        record = json.loads(_choice_path().read_text()).get(_choice_key(precision))
    except (OSError, ValueError):
        return None
    runtime = record.get("runtime") if isinstance(record, dict) else None
    return runtime if runtime in PEERS and missing(runtime) is None else None


def record_runtime(precision: str, runtime: str, evidence: dict) -> None:
    """Remember the fastest runtime with labels as good as ours for this CPU, thread count and precision."""
    path = _choice_path()
    try:
        choices = json.loads(path.read_text())
    except (OSError, ValueError):
        choices = {}
    choices[_choice_key(precision)] = {"runtime": runtime, **evidence}
    write_bytes(path, (json.dumps(choices, indent=2) + "\n").encode())


def resolve_runtime(runtime: str, device_type: str, precision: str) -> str:
    """'auto' → the recorded faster peer on the CPU, else 'torch'; an explicit peer is checked (CPU only)."""
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    if runtime == "auto":
        return (recorded_runtime(precision) if device_type == "cpu" else None) or "torch"
    if runtime != "torch" and device_type != "cpu":
        raise UsageError(f"--runtime {runtime} runs on the CPU; use --device cpu (or --runtime torch)")
    return runtime


def choose_runtimes(variants: list[dict], context: dict, record: bool = True) -> dict[str, str]:
    """From `deeplab benchmark`'s timed CPU variants (dicts of precision, packed, runtime, network.median_ms,
    agreement): per precision, the runtime `auto` should use here, recorded (record=True) with its evidence and
    context.

    A peer wins only when it was faster than PackedNetwork in the same run with labels as good: identical to
    eager fp32 for fp32, agreeing with fp32 at least as often as ours for bf16.
    """
    chosen = {}
    for precision in ("fp32", "bf16"):
        ours = next((v for v in variants if v["precision"] == precision and v["packed"]), None)
        if ours is None:
            continue
        best = ours
        for v in variants:
            if v["precision"] == precision and v["runtime"] != "torch" and v["agreement"] >= ours["agreement"] \
                    and (precision != "fp32" or v["agreement"] == 1.0) \
                    and v["network"]["median_ms"] < best["network"]["median_ms"]:
                best = v
        chosen[precision] = best["runtime"]
        if not record:
            continue
        record_runtime(precision, best["runtime"], {
            "network_ms": best["network"]["median_ms"], "ours_ms": ours["network"]["median_ms"],
            "agreement": best["agreement"], **context, "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
    return chosen
