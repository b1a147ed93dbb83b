"""The fully connected CRF of pydensecrf (Krähenbühl's densecrf v2.2) in pure PyTorch, on any device.

The Gaussian filters run on a permutohedral lattice (Adams et al. 2010) built as `permutohedral.cpp`
builds it, float32 operation by operation: same elevation and scale factors, same rounding to the
enclosing simplex (ties to even, pydensecrf's rank and tie rule), same barycentric weights, same blur
(v + ½(n₋ + n₊) along each of the d+1 directions in turn, absent neighbours counting 0), same slice factor
α = 1/(1+2⁻ᵈ), even the lattice points pydensecrf's SSE code creates for the zero-feature padding of
its last block of 4 pixels. A vertex is keyed by its remainder r and its 0-coloured lattice point in
units of d+1, packed in mixed radix (int32 for usual images and σ); deduplication is one stable sort of
these keys (no hash table); vertices are numbered in the order points first reach them (as pydensecrf's
hash table numbers them), so that the splat and the slice read memory nearly in order; blur neighbours are
found by binary search in the sorted keys, one remainder class at a time (sorted queries). Splat, blur
and slice are weighted gathers (`embedding_bag`: on the CPU 2–3× faster than sparse matrix products and
far faster than index_add_), vectorised over labels, with no Python loop over pixels or lattice points
and no host round trip in the iterations; blurs gather only the neighbours that exist (about half of
them in the bilateral lattice). Mean field follows `DenseCRF::inference`: Q₀ = softmax(−U), then per
iteration Q = softmax(−U + Σₖ wₖ·nₖ∘Kₖ(nₖ∘Q)) over the Gaussian and bilateral Potts kernels, with
symmetric normalisation nₖ = 1/√(Kₖ·1) (K includes each pixel's own contribution, as in pydensecrf).
The softmax runs in base 2 (log₂e is folded into the slice weights; exp2 is ~3× faster than exp on the
CPU) and subtracts a per-pixel bound computed once instead of each iteration's row maximum: the
messages of a pixel sum to the same Σₖ wₖ·nₖ∘Kₖ(nₖ) whatever Q is, so max log₂p + that sum bounds the
logits from above, within 2^100 of their maximum (else, or for negative weights, the exact row maximum is
subtracted each iteration). The position-only (Gaussian) kernel depends only on the image sizes and σ:
it is cached per process (CACHE_BYTES). Several images of any sizes share one lattice per kernel: the
image index is part of the key.

Memory (float32; N pixels, C labels, m lattice points per kernel, m ≤ (d+1)·N): mean field keeps four
(N, C) tensors; each kernel's splat and slice lists take 8·(d+1)·N bytes, its blur ≤ 12·(d+1)·m bytes;
filtering a chunk of c labels needs ≈ 4·c·(4·Σm + 2N) bytes, and labels are chunked (exactly: they are
filtered independently) so that this stays under CHUNK_BYTES (2 GiB). For 2048×1024 with 21 labels
(N = 2.1 M): four (N, 21) tensors 0.7 GB, splat/slice lists 0.3 GB, blurs ≤ 1 GB in the worst case
m = (d+1)·N (0.02 GB measured), filtering ≤ 2 GB, a cached Gaussian kernel ≤ CACHE_BYTES: under
4.5 GB in the worst case. Larger images do not fail for lack of buffer memory: only the label chunk
shrinks (down to one label per pass); what remains grows linearly: 16·C·N + 72·N bytes plus the blurs.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .allocator import keep_freed_memory
from .unary import UNARY_CLIP, check_image, check_probs

CHUNK_BYTES = 2 << 30  # cap on the value buffers of one filtering pass (labels are chunked to fit)
CACHE_BYTES = 256 << 20  # cap on the Gaussian kernels kept for images of sizes seen before
MAX_KEY = 1 << 62  # packed lattice keys must fit in int64
LOG2E = 1.4426950408889634  # the mean field works with log₂ probabilities
SHIFT_RANGE = 100.0  # log₂ units: how far below the precomputed shift a pixel's largest logit may lie


def _index_dtype(*sizes: int) -> torch.dtype:
    """int32 when every index and offset fits (faster gathers, half the memory), else int64."""
    return torch.int32 if max(sizes) < 2**31 - 1 else torch.int64


def _bags(index: torch.Tensor, table: torch.Tensor, bounds: torch.Tensor,
          weights: torch.Tensor | None = None) -> torch.Tensor:
    """out[b] = Σ_{k ∈ [bounds[b], bounds[b+1])} weights[k]·table[index[k]]: (len(bounds)−1, C); empty bags give 0."""
    return F.embedding_bag(index, table, bounds, mode="sum", per_sample_weights=weights, include_last_offset=True)


def _csr_bounds(counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bag sizes (b,) → bag bounds (b+1,): 0, then their running sum."""
    bounds = torch.zeros(counts.numel() + 1, dtype=dtype, device=counts.device)
    bounds[1:] = torch.cumsum(counts, 0)
    return bounds


@dataclass
class LatticeBlur:
    """Blur of lattice values (m, C): v + ½(n₋ + n₊) along each of the d+1 lattice directions in turn.

    Absent neighbours count 0 (as in pydensecrf) and are left out of the gathers. The sum of the two
    neighbours, then v + ½·sum, is pydensecrf's order of operations.
    """

    neighbours: list[torch.Tensor]  # per direction: each vertex's present neighbours (−, then +), concatenated
    bounds: list[torch.Tensor]  # per direction (m+1,): where each vertex's neighbours start

    def __call__(self, values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """values (m, C) → blurred (m, C), written to out when given."""
        for j, (index, bounds) in enumerate(zip(self.neighbours, self.bounds)):
            sums = _bags(index, values, bounds)
            last = j == len(self.neighbours) - 1
            # in place (30 % faster than a third buffer), the last step straight into out
            values = torch.add(values, sums, alpha=0.5, out=out if last and out is not None else sums)
        return values


@dataclass
class Lattice:
    """A permutohedral lattice over n points with m vertices: the splat, blur and slice maps as weighted index lists.

    The splat lists may hold extra entries of weight 0 (point 0) for vertices that only pydensecrf's padding
    points create: they exist, take part in the blur, and start at 0.
    """

    splat_points: torch.Tensor  # (e,) the point of each (point, vertex) pair, grouped by vertex, points in order
    splat_weights: torch.Tensor  # (e,) float32 its barycentric weight
    splat_bounds: torch.Tensor  # (m+1,) where each vertex's pairs start
    vertices: torch.Tensor  # (n, d+1) each point's simplex vertices
    barycentric: torch.Tensor  # (n, d+1) float32 its barycentric weights on them
    blur: LatticeBlur
    alpha: float  # pydensecrf's slice factor 1/(1+2⁻ᵈ)

    @property
    def n(self) -> int:
        return self.vertices.shape[0]

    @property
    def m(self) -> int:
        return self.splat_bounds.shape[0] - 1

    @property
    def d(self) -> int:
        return self.vertices.shape[1] - 1

    def splat(self, values: torch.Tensor) -> torch.Tensor:
        """values (n, C) → lattice values (m, C): each point's value spread on its vertices by barycentric weight."""
        return _bags(self.splat_points, values, self.splat_bounds, self.splat_weights)

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Splat → blur → slice: values (n, C) → (n, C), the lattice's approximation of Σⱼ k(fᵢ, fⱼ) vⱼ (k(f, f) = 1)."""
        lattice_values = self.blur(self.splat(values))
        bounds = torch.arange(0, self.vertices.numel() + 1, self.d + 1, device=values.device, dtype=self.vertices.dtype)
        return _bags(self.vertices.reshape(-1), lattice_values, bounds, (self.barycentric * self.alpha).reshape(-1))


def _enclosing_simplices(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """features (n, d) float32 → the enclosing simplex, coordinate-major: its 0-coloured vertex in units of d+1
    (first d coordinates, (d, n) int64), each coordinate's place in the decreasing order of the residuals
    (d − pydensecrf's rank, (d+1, n) int64) and the barycentric weights (d+1, n) float32.

    The arithmetic of `Permutohedral::init` (SSE build), float32 operation by operation, so that points
    fall in the same simplices and get the same weights as in pydensecrf.
    """
    n, d = features.shape
    d1 = d + 1
    dev = features.device
    f = features.t().contiguous()
    inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * d1))
    scale = [float(np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev)) for i in range(d)]
    down = float(np.float32(1.0) / np.float32(d1))

    # Elevate onto the plane Σx = 0 of R^{d+1} (E·f, p. 5 in Adams et al. 2010).
    elevated = torch.empty((d1, n), dtype=torch.float32, device=dev)
    sm = torch.zeros(n, dtype=torch.float32, device=dev)
    for j in range(d, 0, -1):
        cf = f[j - 1] * scale[j - 1]
        elevated[j] = sm - cf * float(j)
        sm = sm + cf
    elevated[0] = sm

    # The closest 0-coloured lattice point: each coordinate rounded to a multiple of d+1 (ties to even).
    v = torch.round(elevated * down)
    rem0 = v * float(d1)
    total = v.sum(0).to(torch.int16)

    # rank[i]: how many residuals are larger, plus equal ones at a smaller index (pydensecrf's tie rule):
    # i + #{j > i: res_i < res_j} − #{j < i: res_j < res_i}, counted in uint8.
    res = elevated - rem0
    rank = torch.arange(d1, dtype=torch.uint8, device=dev)[:, None].repeat(1, n)
    for i in range(d1):
        for j in range(i + 1, d1):
            smaller = torch.lt(res[i], res[j]).view(torch.uint8)
            rank[i] += smaller
            rank[j] -= smaller
    # Bring the point back onto the plane if the rounded coordinates do not sum to 0.
    rank = rank.to(torch.int16) + total
    wrap = (rank < 0).to(torch.int16) - (rank > d).to(torch.int16)
    rank += wrap * d1
    place = (d - rank).to(torch.int64)
    wrap = wrap.to(torch.float32)
    rem0 += wrap * float(d1)

    # Barycentric coordinates (p. 10 in Adams et al. 2010): differences of the residuals sorted by rank.
    res = (elevated - rem0) * down
    by_place = torch.empty_like(res).scatter_(0, place, res)  # by_place[k]: the residual of rank d − k
    bary = torch.empty_like(res)
    bary[1:] = by_place[1:] - by_place[:-1]
    bary[0] = by_place[0] + (1.0 - by_place[d])
    return (v[:d] + wrap[:d]).to(torch.int64), place, bary


def _vertex_keys(zero: torch.Tensor, place: torch.Tensor, image_ids: torch.Tensor, strides: list[int],
                 image_stride: int, dtype: torch.dtype) -> torch.Tensor:
    """The d+1 simplex vertices' packed keys, point-major (n·(d+1),) of dtype.

    zero (d, n): the 0-coloured vertex in units of d+1, already offset to be ≥ 2. Vertex r has coordinates
    (d+1)·(zero − 1_S) + r, S the coordinates at the first r places (largest residuals first); its key is
    (image·image_stride + Σ_c stride_c·(zero_c − [c ∈ S]))·(d+1) + r. Going from vertex r−1 to r adds 1 and
    subtracts (d+1)·stride of the coordinate at place r − 1 (the last coordinate has stride 0).
    """
    d1, n = place.shape
    d = d1 - 1
    stride_t = torch.tensor(strides + [0], dtype=torch.int64, device=place.device)
    key = ((zero * stride_t[:d, None]).sum(0) + image_ids * image_stride) * d1
    stride_at = torch.empty_like(place).scatter_(0, place, stride_t[:, None].expand(d1, n))
    steps = stride_at[:d].mul_(-d1).add_(1)
    keys = torch.empty((n, d1), dtype=dtype, device=place.device)
    keys[:, 0] = key
    for r in range(1, d1):
        key = key + steps[r - 1]
        keys[:, r] = key
    return keys.view(-1)


def _blur_neighbours(keys: torch.Tensor, strides: list[int], number: torch.Tensor, itype: torch.dtype) -> LatticeBlur:
    """Sorted vertex keys (m,) and each one's vertex number (m,) → for each direction j, each vertex's neighbours
    that exist, vertices in number order.

    Neighbour − along j: every coordinate −1 except coordinate j, +d; neighbour + is the opposite move.
    """
    m, d = keys.numel(), len(strides)
    d1 = d + 1
    dev = keys.device
    r = keys % d1
    # Vertices of remainder 0 and the others, each in key order, so that each run of queries is sorted (a
    # binary search over sorted queries stays in cache: 3× faster).
    by_class = torch.cat([torch.nonzero(r > 0)[:, 0], torch.nonzero(r == 0)[:, 0]])
    first_zero = int((r > 0).sum())
    class_keys = keys[by_class].to(torch.int64)
    class_number = number[by_class]
    neighbours, bounds = [], []
    for j in range(d1):
        s = strides[j] if j < d else 0
        # r ≥ 1: remainder r−1, coordinate j one unit up; r = 0: remainder d, every coordinate but j one unit down.
        q = class_keys.clone()
        q[:first_zero] += d1 * s - 1
        q[first_zero:] += d + d1 * (s - sum(strides))
        at = torch.searchsorted(keys, q.to(keys.dtype)).clamp_(max=m - 1)
        found = torch.nonzero(keys[at] == q)[:, 0]
        a, b = class_number[found].long(), number[at[found]].long()  # b = minus(a) ⇔ a = plus(b)
        has_minus = torch.zeros(m, dtype=itype, device=dev).index_fill_(0, a, 1)
        has_plus = torch.zeros(m, dtype=itype, device=dev).index_fill_(0, b, 1)
        bound = _csr_bounds(has_minus + has_plus, itype)
        index = torch.empty(int(bound[-1]), dtype=itype, device=dev)
        index[bound[a].long()] = b.to(itype)  # each bag: its − neighbour first, then its + neighbour
        index[(bound[b] + has_minus[b]).long()] = a.to(itype)
        neighbours.append(index)
        bounds.append(bound)
    return LatticeBlur(neighbours, bounds)


def build_lattice(features: torch.Tensor, image_ids: torch.Tensor | None = None, extra: torch.Tensor | None = None,
                  extra_ids: torch.Tensor | None = None) -> Lattice:
    """features (n, d) float32 (already divided by σ) → Lattice; image_ids (n,) int64 keep images' vertices apart.

    extra (e, d) with extra_ids (e,): points that only create lattice vertices (never splatted nor sliced),
    as pydensecrf's SSE padding lanes do.
    """
    n, d = features.shape
    d1 = d + 1
    dev = features.device
    if image_ids is None:
        image_ids = torch.zeros(n, dtype=torch.int64, device=dev)
    if extra is not None and len(extra):
        features, image_ids = torch.cat([features, extra]), torch.cat([image_ids, extra_ids])
    total = features.shape[0]
    zero, place, bary = _enclosing_simplices(features)

    # Mixed radix per coordinate, wide enough for the vertices (zero − 1) and their blur neighbours (± 1 more).
    lo = zero.amin(1, keepdim=True) - 2
    zero -= lo
    radix = [int(x) + 2 for x in zero.amax(1).tolist()]
    image_stride = math.prod(radix)
    n_images = int(image_ids.max()) + 1 if total else 1
    if image_stride * n_images * d1 >= MAX_KEY:
        raise ValueError("CRF σ too small for this image: permutohedral lattice keys would exceed 64 bits")
    strides = [math.prod(radix[c + 1 :]) for c in range(d)]
    key_type = torch.int32 if image_stride * n_images * d1 < 2**31 else torch.int64  # int32 sorts twice as fast
    keys = _vertex_keys(zero, place, image_ids, strides, image_stride, key_type)

    # Deduplicate: sort the keys (stable: a vertex's entries stay in point order, as the C++ splat adds them).
    sorted_keys, order = torch.sort(keys, stable=True)
    del keys
    lattice_keys, vertex_of_sorted, counts = torch.unique_consecutive(sorted_keys, return_inverse=True,
                                                                      return_counts=True)
    del sorted_keys
    m = lattice_keys.numel()
    itype = _index_dtype(total * d1 + 1, m + 1)
    # Number the vertices in the order points first reach them (as pydensecrf's hash table does): the splat
    # then reads points, and the slice lattice rows, in nearly increasing order (12 % faster iterations).
    starts = torch.cumsum(counts, 0) - counts
    first_touch = torch.argsort(order.index_select(0, starts))
    number = torch.empty(m, dtype=itype, device=dev).scatter_(0, first_touch, torch.arange(m, dtype=itype, device=dev))
    counts = counts.index_select(0, first_touch)
    shift = (torch.cumsum(counts, 0) - counts).index_select(0, number) - starts  # each vertex's move, in key order
    vertices = torch.empty(total * d1, dtype=itype, device=dev).scatter_(0, order,
                                                                         number.index_select(0, vertex_of_sorted))
    moved = shift.index_select(0, vertex_of_sorted).add_(torch.arange(order.numel(), device=dev))
    order = torch.empty_like(order).scatter_(0, moved, order)  # grouped by vertex number, points still in order
    del moved, starts, shift, vertex_of_sorted
    bary_pm = bary.t().contiguous()  # point-major (total, d+1)
    bary_pm[n:] = 0.0  # padding points splat nothing (on some point, with weight 0)
    splat_weights = bary_pm.view(-1).index_select(0, order)
    splat_points = torch.div(order.to(itype), d1, rounding_mode="floor").clamp_(max=max(n - 1, 0))
    del order
    alpha = float(np.float32(1.0) / (np.float32(1.0) + np.float32(2.0**-d)))
    blur = _blur_neighbours(lattice_keys, strides, number, itype)
    return Lattice(splat_points, splat_weights, _csr_bounds(counts.to(itype), itype), vertices.view(total, d1)[:n],
                   bary_pm[:n], blur, alpha)


def _as_image(image: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 RGB, numpy or tensor → tensor on device; ValueError otherwise."""
    check_image(image)
    t = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    return t.to(device)


def _as_probs(probs: np.ndarray | torch.Tensor, hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(C, H, W) floating probabilities, numpy or tensor → float32 tensor on device; ValueError if bad."""
    t = torch.from_numpy(np.asarray(probs)) if isinstance(probs, np.ndarray) else probs
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"probabilities must be a numpy array or a tensor, got {type(probs).__name__}")
    t = t.to(device=device, dtype=torch.float32) if t.is_floating_point() else t
    check_probs(t, hw)
    return t




def _divide(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x / σ in float32 by true division (as the C++ does; a CPU-scalar divisor becomes x·(1/σ) on CUDA)."""
    return x / torch.full((1,), sigma, dtype=torch.float32, device=x.device)


def _features(shapes: Sequence[tuple[int, int]], sxy: float, images: Sequence[torch.Tensor] | None = None,
              srgb: float | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Per-pixel features of all images, pixel index y·W + x: (x/σxy, y/σxy[, r/σrgb, g/σrgb, b/σrgb]) float32."""
    parts = []
    for i, (h, w) in enumerate(shapes):
        dev = images[i].device if images is not None else device
        x = _divide(torch.arange(w, dtype=torch.float32, device=dev), sxy).expand(h, w)
        y = _divide(torch.arange(h, dtype=torch.float32, device=dev), sxy)[:, None].expand(h, w)
        cols = [x.reshape(-1), y.reshape(-1)]
        if images is not None and srgb is not None:
            rgb = _divide(images[i].reshape(-1, 3).to(torch.float32), srgb)
            cols += [rgb[:, 0], rgb[:, 1], rgb[:, 2]]
        parts.append(torch.stack(cols, dim=1))
    return torch.cat(parts)


def _padding_points(sizes: Sequence[int], d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """pydensecrf's SSE build fills its last block of 4 pixels with zero features that still create lattice points."""
    ids = [i for i, n in enumerate(sizes) if n % 4]
    return (torch.zeros((len(ids), d), dtype=torch.float32, device=device),
            torch.tensor(ids, dtype=torch.int64, device=device))


def _image_lattice(features: torch.Tensor, sizes: Sequence[int]) -> Lattice:
    """The lattice of all images' pixels (features (N, d), images of sizes[i] pixels in order) with their padding points."""
    dev = features.device
    ids = torch.repeat_interleave(torch.arange(len(sizes), device=dev), torch.tensor(sizes, device=dev))
    extra, extra_ids = _padding_points(sizes, features.shape[1], dev)
    return build_lattice(features, ids, extra, extra_ids)


@dataclass
class Kernel:
    """One Gaussian kernel with pydensecrf's symmetric normalisation n = 1/√(K·1) folded in: v ↦ n∘K(n∘v)."""

    lattice: Lattice  # its splat weights already multiplied by their point's n
    slice_weights: torch.Tensor  # (n, d+1) float32 barycentric·α·n

    @classmethod
    def of(cls, lattice: Lattice) -> "Kernel":
        ones = torch.ones((lattice.n, 1), dtype=torch.float32, device=lattice.vertices.device)
        norm = 1.0 / torch.sqrt(lattice.filter(ones)[:, 0] + 1e-20)
        lattice.splat_weights = lattice.splat_weights * norm.index_select(0, lattice.splat_points)
        return cls(lattice, lattice.barycentric * lattice.alpha * norm[:, None])

    def nbytes(self) -> int:
        """Memory held by its tensors, in bytes."""
        lat = self.lattice
        tensors = [lat.splat_points, lat.splat_weights, lat.splat_bounds, lat.vertices, lat.barycentric,
                   self.slice_weights, *lat.blur.neighbours, *lat.blur.bounds]
        return sum(t.numel() * t.element_size() for t in tensors)


_position_kernels: OrderedDict[tuple, Kernel] = OrderedDict()  # least recently used first
_position_lock = threading.Lock()


def position_kernel(shapes: Sequence[tuple[int, int]], sxy: float, device: torch.device) -> Kernel:
    """The Gaussian kernel over pixel positions of images of these (H, W): it depends on nothing else, so it is
    built once per process and kept while the kept ones take at most CACHE_BYTES."""
    key = (tuple(shapes), float(sxy), str(device))
    with _position_lock:
        if key in _position_kernels:
            _position_kernels.move_to_end(key)
            return _position_kernels[key]
    kernel = Kernel.of(_image_lattice(_features(shapes, sxy, device=device), [h * w for h, w in shapes]))
    with _position_lock:
        _position_kernels[key] = kernel
        while sum(k.nbytes() for k in _position_kernels.values()) > CACHE_BYTES:
            _position_kernels.popitem(last=False)
    return kernel


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
    log_p = torch.empty((sum(sizes), c), dtype=torch.float32, device=probs[0].device)
    start = 0
    for p, n in zip(probs, sizes):
        torch.clamp(p.reshape(c, n).t(), min=UNARY_CLIP, out=log_p[start : start + n])
        start += n
    log_p.log2_()
    top = torch.cat([p.reshape(c, -1).amax(0) for p in probs]).clamp_(min=UNARY_CLIP).log2_()[:, None]
    q = _normalise(log_p - top)
    terms = [(w, sxy, srgb) for w, sxy, srgb in ((pos_w, pos_xy, None), (bi_w, bi_xy, bi_rgb)) if w != 0]
    if iterations and c > 1 and terms:
        dev = log_p.device
        kernels = [position_kernel(shapes, sxy, dev) if srgb is None
                   else Kernel.of(_image_lattice(_features(shapes, sxy, images, srgb), sizes))
                   for _, sxy, srgb in terms]
        pairwise = _Pairwise(kernels, [w for w, _, _ in terms])
        del kernels
        exact = min(w for w, _, _ in terms) < 0
        if not exact:  # a pixel's messages sum to its message for Q ≡ 1 whatever Q is: that bounds each of them
            bound = pairwise(torch.ones((len(log_p), 1), dtype=torch.float32, device=dev))
            exact = bool(bound.max() > SHIFT_RANGE)
        unary = log_p if exact else log_p.sub_(top.add_(bound))
        for _ in range(iterations):
            x = pairwise(q).add_(unary)
            if exact:
                x -= x.amax(1, keepdim=True)
            q = _normalise(x)
    out, start = [], 0
    for p, n in zip(probs, sizes):
        out.append(q[start : start + n].t().reshape(p.shape).contiguous())
        start += n
    return out
