"""The compiled CPU kernels of the dense CRF, plain C built when the package is installed (setup.py) and loaded
with ctypes: `_lattice.c` (a lattice's simplices, keys, vertex numbering, entry grouping, blur neighbours and
one-channel filter, for permutohedral.py) and `_meanfield.c` (the mean-field iterations, for meanfield.py).
ctypes releases the GIL for each call. Where the library is absent (installed without a C compiler, or a
source tree never built) both callers compute the same with torch.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from pathlib import Path

MAX_LABELS, MAX_KERNELS, MAX_DIRECTIONS = 64, 4, 8  # as #defined in _meanfield.c
MAX_FEATURES = 16  # MAX_D in _lattice.c
SLACK = 16  # floats _meanfield.c may read past the unary's last row


def row_stride(labels: int) -> int:
    """Floats per lattice row in _meanfield.c: blocks of 16, and one of 8 where that is enough (21 labels: 24)."""
    rest = labels % 16
    return labels - rest + (0 if rest == 0 else 8 if rest <= 8 else 16)


class Problem(ctypes.Structure):
    """`Problem` of _meanfield.c, field for field."""

    _fields_ = [("n", ctypes.c_int64), ("c", ctypes.c_int64), ("rows", ctypes.c_int64), ("stride", ctypes.c_int64),
                ("kernels", ctypes.c_int32), ("slice_size", ctypes.c_int32), ("iterations", ctypes.c_int32),
                ("exact", ctypes.c_int32), ("m", ctypes.c_int64 * MAX_KERNELS), ("row", ctypes.c_int64 * MAX_KERNELS),
                ("d1", ctypes.c_int32 * MAX_KERNELS),
                ("blur_index", (ctypes.c_void_p * MAX_DIRECTIONS) * MAX_KERNELS),
                ("blur_bounds", (ctypes.c_void_p * MAX_DIRECTIONS) * MAX_KERNELS),
                *[(name, ctypes.c_void_p) for name in ("slice_index", "slice_weights", "splat_scale", "unary", "out",
                                                       "table", "spare", "splats")]]


class Hash(ctypes.Structure):
    """`Hash` of _lattice.c (opaque here: only its pointer passes between calls)."""


_PROTOTYPES = {  # name: (argument types, result type)
    "deeplab_mean_field": ([ctypes.POINTER(Problem), ctypes.c_int], ctypes.c_int),
    "deeplab_lattice_number": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)],
                               ctypes.POINTER(Hash)),
    "deeplab_lattice_neighbours": ([ctypes.POINTER(Hash), ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
    "deeplab_lattice_group": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p],
                              ctypes.c_int),
    "deeplab_lattice_free": ([ctypes.POINTER(Hash)], None),
    "deeplab_lattice_simplices": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float,
                                   *[ctypes.c_void_p] * 5], ctypes.c_int),
    "deeplab_lattice_keys": ([*[ctypes.c_void_p] * 3, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_int64, ctypes.c_void_p], None),
    "deeplab_lattice_filter": ([ctypes.c_int64, ctypes.c_int, ctypes.c_int64, *[ctypes.c_void_p] * 8], ctypes.c_int),
}


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernels (deeplab_cli/_native*.so), or None where the package was installed without them."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = Path(__file__).with_name(f"_native{suffix}")
        if path.exists():
            lib = ctypes.CDLL(str(path))
            for name, (arguments, result) in _PROTOTYPES.items():
                getattr(lib, name).argtypes, getattr(lib, name).restype = arguments, result
            return lib
    return None
