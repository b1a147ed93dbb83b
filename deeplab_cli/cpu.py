"""What this CPU is, read from /proc/cpuinfo without torch (so that `--help` can say it): its model name and
whether it has bf16 instructions."""

from __future__ import annotations

import platform


def _cpuinfo_field(key: str) -> str | None:
    """The first value of a /proc/cpuinfo field (Linux), else None."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name ('AMD EPYC', 'Intel(R) Xeon(R) ...'), else what the platform says."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "cpu"


def cpu_has_bf16() -> bool:
    """True when this CPU has bf16 instructions (AVX512-BF16 or AMX-BF16)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})
