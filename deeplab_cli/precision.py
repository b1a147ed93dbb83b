"""Network precisions: their names (the `--precision` choices), torch dtypes, and which one each device runs.

Torch-free (dtypes are named, not imported), so that the command line builds its choices without torch.
"""

from __future__ import annotations

from .errors import UsageError

PRECISIONS: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # name → torch dtype name


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
