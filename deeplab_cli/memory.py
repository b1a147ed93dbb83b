"""Memory pre-flight: estimate what one image will need and refuse up front instead of an OOM kill.

The estimate is linear in pixels, with coefficients from `benchmarks/large_photos.py --full-res`: peak RSS
of `deeplab segment --max-side none` (LargeFOV, 21 classes, torch CRF, packed CPU network with freed memory
kept for reuse) was 1.10 / 1.38 / 1.97 / 2.94 GB at 0.2 / 0.5 / 1 / 2 MP, i.e. ~0.85 GB + ~1,050 B per
pixel; the estimate below gives 1.17 / 1.53 / 2.11 / 3.27 GB there, erring on the safe side. The network's
peak is VGG's conv1 block at full resolution (64 + 64 float32 channels plus oneDNN's reorders), the ×8
upsampled scores and softmax are C float32 maps each, the CRF holds a few C-channel float32 maps and its
lattices. Available memory is MemAvailable (and the cgroup's limit) on the CPU, free memory on a CUDA
device; `$DEEPLAB_MEMORY_LIMIT` (e.g. `2G`, `512M`) caps it, which tests use.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import DeeplabError

MEMORY_LIMIT_ENV = "DEEPLAB_MEMORY_LIMIT"
BASE_BYTES = 900 << 20  # interpreter, torch, weights and their packed copies
NETWORK_BYTES_PER_PIXEL = {"largefov": 1150, "deeplab": 1150}  # of the padded input, fp32
CLASS_MAP_BYTES_PER_PIXEL = 4 * 4  # per class: upsampled scores, softmax, numpy copy, CRF unary
CRF_BYTES_PER_PIXEL = 24  # per class and pixel: Q, messages, lattice buffers (torch backend, the larger)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """'2G', '512M', '1.5g', '1000000' → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size in bytes: {text!r} (e.g. 2G, 512M)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def estimate_bytes(arch: str, num_classes: int, padded: tuple[int, int], size: tuple[int, int], crf: bool) -> int:
    """Peak bytes to segment one image: network input padded (H', W'), class maps and CRF at size (h, w)."""
    pixels = size[0] * size[1]
    network = NETWORK_BYTES_PER_PIXEL.get(arch, max(NETWORK_BYTES_PER_PIXEL.values())) * padded[0] * padded[1]
    maps = CLASS_MAP_BYTES_PER_PIXEL * num_classes * pixels
    crf_bytes = CRF_BYTES_PER_PIXEL * num_classes * pixels if crf else 0
    return BASE_BYTES + max(network, maps + crf_bytes)


def available_bytes(device_type: str = "cpu", device_index: int | None = None) -> int:
    """Memory a new allocation can still get: $DEEPLAB_MEMORY_LIMIT, else free RAM (or CUDA memory)."""
    override = os.environ.get(MEMORY_LIMIT_ENV)
    if override:
        try:
            return parse_bytes(override)
        except ValueError as exc:
            raise DeeplabError(f"${MEMORY_LIMIT_ENV}: {exc}") from None
    if device_type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device_index)
        return int(free)
    return _cpu_available()


def _cpu_available() -> int:
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 1 << 62  # unknown platform: do not refuse
    try:  # cgroup v2: a container's limit may be far below the host's free memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def format_bytes(n: float) -> str:
    """Bytes for people: '8.9 GB', '512 MB'."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"
