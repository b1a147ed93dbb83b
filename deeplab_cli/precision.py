"""Network precisions and runtimes: their names (the `--precision` and `--runtime` choices), torch dtypes, and
which precision each device runs.

Torch-free (dtypes are named, not imported), so that the command line builds its choices without torch.
"""

from __future__ import annotations

from .cpu import cpu_has_bf16
from .errors import UsageError

PRECISIONS: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # name → torch dtype name
PEERS: dict[str, str] = {"onnxruntime": "onnxruntime", "openvino": "openvino"}  # optional CPU runtimes → their module
RUNTIMES: tuple[str, ...] = ("auto", "torch", *PEERS)  # the --runtime choices (peers.py runs the peers)


def default_precision(device_type: str) -> str:
    """The fastest precision whose labels agree with fp32 (see README): fp16 on CUDA, fp32 on the CPU."""
    return "fp16" if device_type == "cuda" else "fp32"


def check_precision(precision: str | None, device_type: str) -> str:
    """The precision to run on a device ('cpu', 'cuda'): the default for None; UsageError for one it does not offer."""
    precision = precision or default_precision(device_type)
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "fp16" and device_type == "cpu":
        raise UsageError("fp16 is only offered on CUDA; use fp32 or bf16 on the CPU")
    return precision


BF16_NOTE = "bf16 runs about 2× faster than fp32 on CPUs with bf16 instructions, with ~99.7 % of fp32's labels"


def faster_precision_note(device_type: str, precision: str) -> str | None:
    """What to tell the user when this CPU offers a faster precision than the one running, else None."""
    if device_type == "cpu" and precision == "fp32" and cpu_has_bf16():
        return "this CPU runs --precision bf16 about 2× faster (~99.7 % of the same labels)"
    return None
