"""Mean-field inference of the fully connected CRF as pydensecrf's `DenseCRF::inference` computes it, on the
lattices of `permutohedral.py`: Q₀ = softmax(−U), then per iteration Q = softmax(−U + Σₖ wₖ·nₖ∘Kₖ(nₖ∘Q)) over the
Gaussian and bilateral Potts kernels.

The softmax runs in base 2 (log₂e is folded into the slice weights; exp2 is ~3× faster than exp on the CPU)
and subtracts a per-pixel bound computed once instead of each iteration's row maximum: the messages of a
pixel sum to the same Σₖ wₖ·nₖ∘Kₖ(nₖ) whatever Q is, so max log₂p + that sum bounds the logits from above,
within 2^SHIFT_RANGE of their maximum (else, or for negative weights, the exact row maximum is subtracted
each iteration).

Two loops compute the same iterations (they differ by float rounding only):
- on the CPU, `_meanfield.c` (compiled when the package is installed, loaded by `native.py`): one pass over
  the points per iteration that slices, adds the unary, normalises and splats the new Q straight back (the
  splat as a scatter from points to vertices), on torch's thread count; used up to 64 labels while its
  lattice tables (2 + threads of them, Σm rows of `native.row_stride(C)` floats) stay under CHUNK_BYTES;
- otherwise (CUDA, or no compiled library, or beyond those limits) torch operations: splat, blur and slice
  as weighted gathers, the softmax as separate passes, labels chunked so that the value buffers stay under
  CHUNK_BYTES.

Memory (float32; N pixels, C labels, m lattice points per kernel, m ≤ (d+1)·N): mean field keeps four (N, C)
tensors; each kernel's splat and slice lists take 8·(d+1)·N bytes, its blur ≤ 12·(d+1)·m bytes; the torch
loop's filtering of a chunk of c labels needs ≈ 4·c·(4·Σm + 2N) bytes. For 2048×1024 with 21 labels
(N = 2.1 M): four (N, 21) tensors 0.7 GB, splat/slice lists 0.3 GB, blurs ≤ 1 GB in the worst case
m = (d+1)·N (0.02 GB measured), filtering ≤ 2 GB, a cached Gaussian kernel ≤ CACHE_BYTES: under 4.5 GB in
the worst case. Larger images do not fail for lack of buffer memory: only the label chunk shrinks (down to
one label per pass); what remains grows linearly: 16·C·N + 72·N bytes plus the blurs.
"""

from __future__ import annotations

import ctypes
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from . import native
from .allocator import keep_freed_memory
from .permutohedral import Kernel, _bags, _features, _image_lattice, _index_dtype, position_kernel
from .unary import UNARY_CLIP, check_image, check_probs

CHUNK_BYTES = 2 << 30  # cap on the value buffers of one filtering pass (labels are chunked to fit)
LOG2E = 1.4426950408889634  # the mean field works with log₂ probabilities
SHIFT_RANGE = 100.0  # log₂ units: how far below the precomputed shift a pixel's largest logit may lie


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing the array's memory, which the CRF only reads: read-only arrays (Ray's zero-copy
    batches, memory maps) are not copied, and torch's warning about writing to them does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.from_numpy(array)


def _as_image(image: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 RGB, numpy or tensor → tensor on device; ValueError otherwise."""
    check_image(image)
    t = _read_only_tensor(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    return t.to(device)


def _as_probs(probs: np.ndarray | torch.Tensor, hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(C, H, W) floating probabilities, numpy or tensor → float32 tensor on device; ValueError if bad."""
    t = _read_only_tensor(np.asarray(probs)) if isinstance(probs, np.ndarray) else probs
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"probabilities must be a numpy array or a tensor, got {type(probs).__name__}")
    t = t.to(device=device, dtype=torch.float32) if t.is_floating_point() else t
    check_probs(t, hw)
    return t


class _Pairwise:
    """Σₖ wₖ·nₖ∘Kₖ(nₖ∘q)·log₂e over the Potts kernels: minus the pairwise energy, in log₂ units.

    Each kernel splats and blurs on its own lattice, into one value table; the slices of all kernels are one
    weighted gather (each point's bag holds its simplex vertices in every lattice).
    """

    def __init__(self, kernels: Sequence[Kernel], weights: Sequence[float], chunk_bytes: int | None = None):
        n = kernels[0].lattice.n
        dev = kernels[0].slice_weights.device
        rows = [k.lattice.m for k in kernels]
        self.row_starts = [sum(rows[:k]) for k in range(len(rows) + 1)]
        total_d1 = sum(k.lattice.d + 1 for k in kernels)
        itype = _index_dtype(n * total_d1 + 1, self.row_starts[-1])
        self.lattices = [k.lattice for k in kernels]
        self.slice_index = torch.cat([k.lattice.vertices.to(itype) + r for k, r in zip(kernels, self.row_starts)],
                                     dim=1).reshape(-1)
        self.slice_weights = torch.cat([k.slice_weights * (w * LOG2E) for k, w in zip(kernels, weights)],
                                       dim=1).reshape(-1)
        self.slice_bounds = torch.arange(0, n * total_d1 + 1, total_d1, dtype=itype, device=dev)
        # A slot's splat weight (barycentric·n) is its slice weight over α·w·log₂e: the native loop splats with it.
        self.splat_scale = torch.cat([torch.full((k.lattice.d + 1,), 1.0 / (k.lattice.alpha * w * LOG2E))
                                      for k, w in zip(kernels, weights)])
        # Labels are filtered independently: chunk them so the value buffers stay under chunk_bytes.
        per_label = 4 * (4 * self.row_starts[-1] + 2 * n)
        self.labels_per_pass = max(1, (chunk_bytes or CHUNK_BYTES) // per_label)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """q (N, C) float32 → the summed messages (N, C)."""
        c, step = q.shape[1], self.labels_per_pass
        if step >= c:
            return self._messages(q)
        return torch.cat([self._messages(q[:, i : i + step].contiguous()) for i in range(0, c, step)], dim=1)

    def _messages(self, q: torch.Tensor) -> torch.Tensor:
        table = q.new_empty((self.row_starts[-1], q.shape[1]))
        for lat, a, b in zip(self.lattices, self.row_starts, self.row_starts[1:]):
            lat.blur(lat.splat(q), out=table[a:b])
        return _bags(self.slice_index, table, self.slice_bounds, self.slice_weights)


def _padded(rows: int, c: int, extra: int, device: torch.device) -> torch.Tensor:
    """An (rows, c) float32 tensor followed in memory by `extra` zeros (the native loop reads whole vectors)."""
    flat = torch.empty(rows * c + extra, dtype=torch.float32, device=device)
    flat[rows * c :] = 0.0
    return flat[: rows * c].view(rows, c)


def _has_slack(t: torch.Tensor, extra: int) -> bool:
    """Whether contiguous t is followed in its storage by at least `extra` more elements."""
    return t.is_contiguous() and t.untyped_storage().nbytes() >= (t.storage_offset() + t.numel() + extra) * t.element_size()


def _native_loop(pairwise: _Pairwise, unary: torch.Tensor, iterations: int, exact: bool) -> torch.Tensor | None:
    """The iterations on the CPU in _meanfield.c: the unary, log₂ p shifted per pixel (N, C) float32 from `_padded`
    → Q (C, N), label-major as the caller returns it (Q₀ = softmax(log p) computed there too); None where it does
    not apply (no library, not the CPU, 64-bit indices, over 64 labels, buffers over CHUNK_BYTES)."""
    lib = native.library()
    n, c = unary.shape
    stride = native.row_stride(c)
    threads = torch.get_num_threads()
    rows = pairwise.row_starts[-1]
    if (lib is None or unary.device.type != "cpu" or pairwise.slice_index.dtype != torch.int32
            or stride > native.MAX_LABELS or len(pairwise.lattices) > native.MAX_KERNELS
            or any(not 2 <= lat.d + 1 <= native.MAX_DIRECTIONS for lat in pairwise.lattices)
            or 4 * rows * stride * (2 + threads) > CHUNK_BYTES
            or not _has_slack(unary, stride - c)):
        return None
    table, spare = (torch.empty(rows * stride, dtype=torch.float32) for _ in range(2))
    splats = torch.empty(threads * rows * stride, dtype=torch.float32)  # each thread clears its own
    out = torch.empty((c, n), dtype=torch.float32)
    problem = native.Problem(n=n, c=c, rows=rows, stride=stride, kernels=len(pairwise.lattices),
                             slice_size=pairwise.slice_index.numel() // n, iterations=iterations, exact=int(exact))
    for k, lat in enumerate(pairwise.lattices):
        problem.m[k], problem.row[k], problem.d1[k] = lat.m, pairwise.row_starts[k], lat.d + 1
        for j, (index, bounds) in enumerate(zip(lat.blur.neighbours, lat.blur.bounds)):
            problem.blur_index[k][j], problem.blur_bounds[k][j] = index.data_ptr(), bounds.data_ptr()
    for name, t in (("slice_index", pairwise.slice_index), ("slice_weights", pairwise.slice_weights),
                    ("splat_scale", pairwise.splat_scale), ("unary", unary), ("out", out),
                    ("table", table), ("spare", spare), ("splats", splats)):
        setattr(problem, name, t.data_ptr())
    if lib.deeplab_mean_field(ctypes.byref(problem), threads) != 0:
        raise MemoryError("not enough memory for the CRF's threads")
    return out


def dense_crf_torch_batch(
    images: Sequence[np.ndarray | torch.Tensor],
    probs: Sequence[np.ndarray | torch.Tensor],
    *,
    iterations: int = 10,
    pos_w: float = 3.0,
    pos_xy: float = 3.0,
    bi_w: float = 4.0,
    bi_xy: float = 121.0,
    bi_rgb: float = 5.0,
    device: str | torch.device | None = None,
) -> list[torch.Tensor]:
    """Dense CRF on several images at once: images (H, W, 3) uint8 RGB, probs (C, H, W) → Q (C, H, W) float32 each.

    Images may differ in size; those with the same number of labels share one lattice per kernel (the image
    index is part of the lattice key, so images never share lattice points) and one mean-field loop.
    device: where to compute (None: the device of the first tensor in probs, else the CPU). ValueError for bad
    shapes or dtypes, NaN/inf probabilities, non-positive σ, or σ so small the lattice keys overflow 64 bits.
    """
    if len(images) != len(probs):
        raise ValueError(f"{len(images)} images but {len(probs)} probability maps")
    if iterations < 0:
        raise ValueError(f"CRF iterations must be ≥ 0, got {iterations}")
    for name, s in (("pos σxy", pos_xy), ("bilateral σxy", bi_xy), ("bilateral σrgb", bi_rgb)):
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"CRF {name} must be a positive number, got {s}")
    if device is None:
        device = next((p.device for p in probs if isinstance(p, torch.Tensor)), torch.device("cpu"))
    device = torch.device(device)
    if device.type == "cpu":
        keep_freed_memory()  # its set-up allocates tens of large temporaries per call
    ims = [_as_image(im, device) for im in images]
    ps = [_as_probs(p, tuple(im.shape[:2]), device) for p, im in zip(probs, ims)]
    out: list[torch.Tensor | None] = [None] * len(ims)
    for c in sorted({p.shape[0] for p in ps}):
        group = [i for i, p in enumerate(ps) if p.shape[0] == c]
        qs = _mean_field([ims[i] for i in group], [ps[i] for i in group], iterations, pos_w, pos_xy, bi_w, bi_xy, bi_rgb)
        for i, q in zip(group, qs):
            out[i] = q
    return out  # type: ignore[return-value]


def dense_crf_torch(
    image: np.ndarray | torch.Tensor,
    probs: np.ndarray | torch.Tensor,
    *,
    iterations: int = 10,
    pos_w: float = 3.0,
    pos_xy: float = 3.0,
    bi_w: float = 4.0,
    bi_xy: float = 121.0,
    bi_rgb: float = 5.0,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Dense CRF as pydensecrf computes it: image (H, W, 3) uint8 RGB, probs (C, H, W) → Q (C, H, W) float32 on device."""
    return dense_crf_torch_batch([image], [probs], iterations=iterations, pos_w=pos_w, pos_xy=pos_xy, bi_w=bi_w,
                                 bi_xy=bi_xy, bi_rgb=bi_rgb, device=device)[0]


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Logits in log₂ units (N, C), shifted so that exp2 neither overflows nor underflows → their softmax, in place."""
    x.exp2_()
    return x.div_(torch.mv(x, x.new_ones(x.shape[1]))[:, None])  # a matrix-vector product sums rows 1.7× faster


def _mean_field(images: Sequence[torch.Tensor], probs: Sequence[torch.Tensor], iterations: int, pos_w: float,
                pos_xy: float, bi_w: float, bi_xy: float, bi_rgb: float) -> list[torch.Tensor]:
    """`DenseCRF::inference` on images with the same label count C: → Q (C, H, W) per image."""
    c = probs[0].shape[0]
    shapes = [(im.shape[0], im.shape[1]) for im in images]
    sizes = [h * w for h, w in shapes]
    # (N, C) pixel-major like the C++ code's column-major (labels, pixels) matrices; log₂ p = −U / ln 2. Its
    # row maximum is log₂ of p's maximum (log₂ is monotone), taken over labels in the (C, N) layout: 6× faster.
    dev = probs[0].device
    log_p = _padded(sum(sizes), c, native.SLACK, dev)
    start = 0
    for p, n in zip(probs, sizes):
        torch.clamp(p.reshape(c, n).t(), min=UNARY_CLIP, out=log_p[start : start + n])
        start += n
    log_p.log2_()
    top = torch.cat([p.reshape(c, -1).amax(0) for p in probs]).clamp_(min=UNARY_CLIP).log2_()[:, None]
    terms = [(w, sxy, srgb) for w, sxy, srgb in ((pos_w, pos_xy, None), (bi_w, bi_xy, bi_rgb)) if w != 0]
    if not (iterations and c > 1 and terms):
        return _per_image(_normalise(log_p.sub_(top)).t(), probs, sizes)
    kernels = [position_kernel(shapes, sxy, dev) if srgb is None
               else Kernel.of(_image_lattice(_features(shapes, sxy, images, srgb), sizes))
               for _, sxy, srgb in terms]
    pairwise = _Pairwise(kernels, [w for w, _, _ in terms])
    exact = min(w for w, _, _ in terms) < 0
    if not exact:  # a pixel's messages sum to its message for Q ≡ 1 whatever Q is: that bounds each of them
        bound = sum(k.of_ones() * (w * LOG2E) for k, (w, _, _) in zip(kernels, terms))[:, None]
        exact = bool(bound.max() > SHIFT_RANGE)
    del kernels
    unary = log_p if exact else log_p.sub_(top.add_(bound))
    compiled = _native_loop(pairwise, unary, iterations, exact)
    if compiled is not None:
        return _per_image(compiled, probs, sizes)
    q = _normalise(unary.clone())  # Q₀ = softmax(log p): a per-pixel shift does not change it
    for _ in range(iterations):
        x = pairwise(q).add_(unary)
        if exact:
            x -= x.amax(1, keepdim=True)
        q = _normalise(x)
    return _per_image(q.t(), probs, sizes)


def _per_image(q: torch.Tensor, probs: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[torch.Tensor]:
    """Q (C, N) of all images, label-major (a view of an (N, C) tensor too) → each image's contiguous (C, H, W)."""
    starts = np.cumsum([0, *sizes])
    return [q[:, a:b].reshape(p.shape).contiguous() for p, a, b in zip(probs, starts, starts[1:])]
