"""Keep freed memory for reuse (glibc): the network's and the CRF's large buffers then cost no page faults.

glibc returns a freed block to the kernel when it is larger than its mmap threshold (which grows only up to
32 MB) or sits at the top of the heap, and threads other than the main one allocate from heaps of at most
64 MB: so each large activation or lattice buffer of every call is faulted in again page by page, 4 KB at a
time. Measured on an AMD EPYC, one thread, 513×513: 41 k page faults and 70 ms per network forward
(6 % of it), 5–95 k page faults per CRF and 8 % of its time; after `keep_freed_memory()`, none from the second
call on. Peak memory is unchanged (blocks are reused, not duplicated); it is just not given back until exit.
ONNX Runtime gets the same effect from its own arena.
"""

from __future__ import annotations

import ctypes
import threading

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameters (glibc's malloc.h)
_KEEP_BYTES = 1 << 30  # blocks up to this size come from (and return to) the heap; this much free heap is kept
_kept: bool | None = None
_lock = threading.Lock()


def keep_freed_memory() -> bool:
    """Ask glibc's malloc, process-wide and once, to keep freed blocks up to 1 GiB for reuse, every thread
    allocating from the one main heap. True when applied (glibc), False elsewhere (macOS, Windows, musl)."""
    global _kept
    with _lock:
        if _kept is None:
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                _kept = False
            else:
                _kept = all(mallopt(param, value) == 1 for param, value in
                            ((_M_MMAP_THRESHOLD, _KEEP_BYTES), (_M_TRIM_THRESHOLD, _KEEP_BYTES), (_M_ARENA_MAX, 1)))
        return _kept
