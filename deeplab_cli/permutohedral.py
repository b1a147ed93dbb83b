"""The Gaussian filters of pydensecrf (Krähenbühl's densecrf v2.2) in PyTorch, on any device: permutohedral lattices
and the CRF's two kernels on them. The mean field that uses them is `meanfield.py`.

The lattice (Adams et al. 2010) is built as `permutohedral.cpp` builds it, float32 operation by operation:
same elevation and scale factors, same rounding to the enclosing simplex (ties to even, pydensecrf's rank and
tie rule), same barycentric weights, same blur (v + ½(n₋ + n₊) along each of the d+1 directions in turn,
absent neighbours counting 0), same slice factor α = 1/(1+2⁻ᵈ), even the lattice points pydensecrf's SSE
code creates for the zero-feature padding of its last block of 4 pixels. A vertex is keyed by its remainder r
and its 0-coloured lattice point in units of d+1, packed in mixed radix (int32 for usual images and σ);
deduplication is one stable sort of these keys (no hash table); vertices are numbered in the order points
first reach them (as pydensecrf's hash table numbers them), so that the splat and the slice read memory
nearly in order; blur neighbours are found by binary search in the sorted keys, one remainder class at a
time (sorted queries). Splat, blur and slice are weighted gathers (`embedding_bag`: on the CPU 2–3× faster
than sparse matrix products and far faster than index_add_), vectorised over labels; blurs gather only the
neighbours that exist (about half of them in the bilateral lattice). A kernel folds pydensecrf's symmetric
normalisation n = 1/√(K·1) into its weights (K includes each pixel's own contribution, as in pydensecrf).
The position-only (Gaussian) kernel depends only on the image sizes and σ: it is cached per process
(CACHE_BYTES). Several images of any sizes share one lattice per kernel: the image index is part of the key.

Memory (N pixels, m lattice points per kernel, m ≤ (d+1)·N): each kernel's splat and slice lists take
8·(d+1)·N bytes, its blur ≤ 12·(d+1)·m bytes; a cached Gaussian kernel ≤ CACHE_BYTES.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import native

CACHE_BYTES = 256 << 20  # cap on the Gaussian kernels kept for images of sizes seen before
MAX_KEY = 1 << 62  # packed lattice keys must fit in int64


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

    The splat lists (each vertex's points and weights, for torch's gathers) are built on first use: the compiled
    CPU kernels splat from the points' own lists. They may hold extra entries of weight 0 (point 0) for vertices
    that only pydensecrf's padding points create: they exist, take part in the blur, and start at 0.
    """

    vertices: torch.Tensor  # (n, d+1) each point's simplex vertices
    barycentric: torch.Tensor  # (n, d+1) float32 its barycentric weights on them
    blur: LatticeBlur
    alpha: float  # pydensecrf's slice factor 1/(1+2⁻ᵈ)
    m: int
    group: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # → every entry (padding points' too) grouped by vertex
    # (points in order) and each vertex's entry count
    entry_weights: torch.Tensor  # (e,) float32 every entry's barycentric weight, 0 for padding points
    point_scale: torch.Tensor | None = None  # (n,) float32 a factor on each point's splat weights (the kernel's n)
    _splat: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return self.vertices.shape[0]

    @property
    def d(self) -> int:
        return self.vertices.shape[1] - 1

    @property
    def splat_lists(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(points (e,), weights (e,) float32, bounds (m+1,)): each vertex's entries, points in order."""
        if self._splat is None:
            order, counts = self.group()
            itype = self.vertices.dtype
            points = torch.div(order.to(itype), self.d + 1, rounding_mode="floor").clamp_(max=max(self.n - 1, 0))
            weights = self.entry_weights.index_select(0, order)
            if self.point_scale is not None:
                weights *= self.point_scale.index_select(0, points)
            self._splat = points, weights, _csr_bounds(counts.to(itype), itype)
        return self._splat

    def scale_points(self, scale: torch.Tensor) -> None:
        """Multiply each point's splat weights by scale (n,) float32."""
        self.point_scale = scale if self.point_scale is None else self.point_scale * scale
        self._splat = None

    def splat(self, values: torch.Tensor) -> torch.Tensor:
        """values (n, C) → lattice values (m, C): each point's value spread on its vertices by barycentric weight."""
        points, weights, bounds = self.splat_lists
        return _bags(points, values, bounds, weights)

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Splat → blur → slice: values (n, C) → (n, C), the lattice's approximation of Σⱼ k(fᵢ, fⱼ) vⱼ (k(f, f) = 1)."""
        slice_weights = (self.barycentric * self.alpha).reshape(-1)
        if values.shape[1] == 1 and (out := self._filter_natively(values, slice_weights)) is not None:
            return out
        lattice_values = self.blur(self.splat(values))
        bounds = torch.arange(0, self.vertices.numel() + 1, self.d + 1, device=values.device, dtype=self.vertices.dtype)
        return _bags(self.vertices.reshape(-1), lattice_values, bounds, slice_weights)

    def _filter_natively(self, values: torch.Tensor, slice_weights: torch.Tensor) -> torch.Tensor | None:
        """`filter` of one channel (n, 1) by _lattice.c on the CPU (torch's gathers spend most of their time on
        overhead there); None where that does not apply."""
        lib = native.library()
        if lib is None or values.device.type != "cpu" or self.vertices.dtype != torch.int32:
            return None
        values, out = values.to(torch.float32).contiguous(), torch.empty_like(values, dtype=torch.float32)
        index = (ctypes.c_void_p * (self.d + 1))(*[t.data_ptr() for t in self.blur.neighbours])
        bounds = (ctypes.c_void_p * (self.d + 1))(*[t.data_ptr() for t in self.blur.bounds])
        scale = self.point_scale.data_ptr() if self.point_scale is not None else None
        if lib.deeplab_lattice_filter(self.n, self.d + 1, self.m, values.data_ptr(), self.vertices.data_ptr(),
                                      self.barycentric.data_ptr(), scale, index, bounds, slice_weights.data_ptr(),
                                      out.data_ptr()) != 0:
            return None
        return out


def _elevation(d: int) -> tuple[list[float], float]:
    """pydensecrf's float32 constants for d features: the scale of each feature and 1/(d+1)."""
    inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    scale = [float(np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev)) for i in range(d)]
    return scale, float(np.float32(1.0) / np.float32(d + 1))


def _simplices_natively(features: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """`_enclosing_simplices` by _lattice.c, point-major: zero (n, d) int32, place (n, d+1) uint8, bary (n, d+1)
    float32, and zero's least and largest value per coordinate (d,) int64; None where it does not apply."""
    lib = native.library()
    n, d = features.shape
    if lib is None or d > native.MAX_FEATURES or _index_dtype(n * (d + 1) + 1) != torch.int32:
        return None
    scale, down = _elevation(d)
    features, scale_t = features.to(torch.float32).contiguous(), torch.tensor(scale, dtype=torch.float32)
    zero, lo, hi = torch.empty((n, d), dtype=torch.int32), torch.empty(d, dtype=torch.int32), torch.empty(d, dtype=torch.int32)
    place, bary = torch.empty((n, d + 1), dtype=torch.uint8), torch.empty((n, d + 1), dtype=torch.float32)
    if lib.deeplab_lattice_simplices(features.data_ptr(), n, d, scale_t.data_ptr(), down, zero.data_ptr(),
                                     place.data_ptr(), bary.data_ptr(), lo.data_ptr(), hi.data_ptr()) != 0:
        return None
    return zero, place, bary, lo.long(), hi.long()


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
    scale, down = _elevation(d)

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
        index, bound = _neighbour_bags(class_number[found].long(), number[at[found]].long(), m, itype)
        neighbours.append(index)
        bounds.append(bound)
    return LatticeBlur(neighbours, bounds)


def _neighbour_bags(a: torch.Tensor, b: torch.Tensor, m: int, itype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction's pairs b = minus(a) ⇔ a = plus(b) (int64) → each vertex's present neighbours, − then +, and
    where each vertex's bag starts: (index, bounds (m+1,)) of itype."""
    has_minus = torch.zeros(m, dtype=itype, device=a.device).index_fill_(0, a, 1)
    has_plus = torch.zeros(m, dtype=itype, device=a.device).index_fill_(0, b, 1)
    bound = _csr_bounds(has_minus + has_plus, itype)
    index = torch.empty(int(bound[-1]), dtype=itype, device=a.device)
    index[bound[a].long()] = b.to(itype)
    index[(bound[b] + has_minus[b]).long()] = a.to(itype)
    return index, bound


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
    simplices = _simplices_natively(features) if dev.type == "cpu" else None
    if simplices is None:
        zero, place, bary = _enclosing_simplices(features)
        zero_lo, zero_hi = zero.amin(1), zero.amax(1)
    else:
        zero, place, bary, zero_lo, zero_hi = simplices

    # Mixed radix per coordinate, wide enough for the vertices (zero − 1) and their blur neighbours (± 1 more).
    lo = zero_lo - 2
    radix = [int(x) + 4 for x in (zero_hi - zero_lo).tolist()]
    image_stride = math.prod(radix)
    n_images = int(image_ids.max()) + 1 if total else 1
    if image_stride * n_images * d1 >= MAX_KEY:
        raise ValueError("CRF σ too small for this image: permutohedral lattice keys would exceed 64 bits")
    strides = [math.prod(radix[c + 1 :]) for c in range(d)]
    if simplices is None:
        key_type = torch.int32 if image_stride * n_images * d1 < 2**31 else torch.int64  # int32 sorts twice as fast
        keys = _vertex_keys(zero - lo[:, None], place, image_ids, strides, image_stride, key_type)
        bary_pm = bary.t().contiguous()  # point-major (total, d+1)
    else:
        keys = torch.empty(total * d1, dtype=torch.int64)
        images, offsets, steps = (t.contiguous() for t in (image_ids.to(torch.int64), lo, torch.tensor(strides + [0])))
        native.library().deeplab_lattice_keys(zero.data_ptr(), place.data_ptr(), images.data_ptr(), total, d,
                                              offsets.data_ptr(), steps.data_ptr(), image_stride, keys.data_ptr())
        bary_pm = bary
    del zero, place

    structure = _number_natively(keys, strides) if dev.type == "cpu" else None
    if structure is None:
        structure = _number_with_torch(keys, strides)
    del keys
    vertices, group, blur, m = structure
    bary_pm[n:] = 0.0  # padding points splat nothing (on some point, with weight 0)
    alpha = float(np.float32(1.0) / (np.float32(1.0) + np.float32(2.0**-d)))
    return Lattice(vertices.view(total, d1)[:n], bary_pm[:n], blur, alpha, m, group, bary_pm.view(-1))


# Each entry's vertex number (total·(d+1),), the grouping of the entries by vertex, the blur, the vertex count.
_Structure = tuple[torch.Tensor, Callable[[], tuple[torch.Tensor, torch.Tensor]], LatticeBlur, int]


def _number_with_torch(keys: torch.Tensor, strides: list[int]) -> _Structure:
    """Point-major vertex keys (total·(d+1),) → each entry's vertex number (first touch order), the entries grouped
    by vertex (points in order) with each vertex's entry count, the blur neighbours; with torch on any device."""
    dev = keys.device
    # Deduplicate: sort the keys (stable: a vertex's entries stay in point order, as the C++ splat adds them).
    sorted_keys, order = torch.sort(keys, stable=True)
    lattice_keys, vertex_of_sorted, counts = torch.unique_consecutive(sorted_keys, return_inverse=True,
                                                                      return_counts=True)
    del sorted_keys
    m = lattice_keys.numel()
    itype = _index_dtype(keys.numel() + 1, m + 1)
    # Number the vertices in the order points first reach them (as pydensecrf's hash table does): the splat
    # then reads points, and the slice lattice rows, in nearly increasing order (12 % faster iterations).
    starts = torch.cumsum(counts, 0) - counts
    first_touch = torch.argsort(order.index_select(0, starts))
    number = torch.empty(m, dtype=itype, device=dev).scatter_(0, first_touch, torch.arange(m, dtype=itype, device=dev))
    counts = counts.index_select(0, first_touch)
    shift = (torch.cumsum(counts, 0) - counts).index_select(0, number) - starts  # each vertex's move, in key order
    vertices = torch.empty(keys.numel(), dtype=itype, device=dev).scatter_(0, order,
                                                                         number.index_select(0, vertex_of_sorted))
    moved = shift.index_select(0, vertex_of_sorted).add_(torch.arange(order.numel(), device=dev))
    order = torch.empty_like(order).scatter_(0, moved, order)  # grouped by vertex number, points still in order
    del moved, starts, shift, vertex_of_sorted
    blur = _blur_neighbours(lattice_keys, strides, number, itype)
    return vertices, lambda: (order, counts), blur, m


def _number_natively(keys: torch.Tensor, strides: list[int]) -> _Structure | None:
    """`_number_with_torch` by _lattice.c's hash table, on the CPU; None where it does not apply (no compiled
    library, indices over int32, no memory)."""
    lib = native.library()
    count, d1 = keys.numel(), len(strides) + 1
    if lib is None or _index_dtype(count + 1) != torch.int32:
        return None
    keys = keys.to(torch.int64).contiguous()
    vertex_of = torch.empty(count, dtype=torch.int32)
    m = ctypes.c_int64()
    table = lib.deeplab_lattice_number(keys.data_ptr(), count, vertex_of.data_ptr(), ctypes.byref(m))
    if not table:
        return None
    steps = torch.tensor(strides + [0], dtype=torch.int64)  # held: C reads them during the call
    neighbour_bounds = torch.empty((d1, m.value + 1), dtype=torch.int32)
    neighbours = torch.empty((d1, 2 * m.value), dtype=torch.int32)
    sizes = torch.empty(d1, dtype=torch.int64)
    try:
        if lib.deeplab_lattice_neighbours(table, d1, steps.data_ptr(), neighbour_bounds.data_ptr(),
                                          neighbours.data_ptr(), sizes.data_ptr(), torch.get_num_threads()) != 0:
            return None
    finally:
        lib.deeplab_lattice_free(table)
    blur = LatticeBlur([neighbours[j, :size] for j, size in enumerate(sizes.tolist())], list(neighbour_bounds))

    def group() -> tuple[torch.Tensor, torch.Tensor]:
        bounds, order = torch.empty(m.value + 1, dtype=torch.int32), torch.empty(count, dtype=torch.int32)
        if lib.deeplab_lattice_group(vertex_of.data_ptr(), count, m.value, bounds.data_ptr(), order.data_ptr()) != 0:
            raise MemoryError("not enough memory to group the CRF lattice's entries")
        return order, bounds.diff()

    return vertex_of, group, blur, m.value


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
    norm: torch.Tensor  # (n,) float32 n
    ones: torch.Tensor | None = None  # (n,) float32 n∘K(n∘1), once computed

    @classmethod
    def of(cls, lattice: Lattice) -> "Kernel":
        ones = torch.ones((lattice.n, 1), dtype=torch.float32, device=lattice.vertices.device)
        norm = 1.0 / torch.sqrt(lattice.filter(ones)[:, 0] + 1e-20)
        lattice.scale_points(norm)
        return cls(lattice, lattice.barycentric * lattice.alpha * norm[:, None], norm)

    def of_ones(self) -> torch.Tensor:
        """n∘K(n∘1): (n,) float32, a point's message when Q ≡ 1 (per unit weight); kept (the Gaussian kernel is
        cached)."""
        if self.ones is None:
            ones = torch.ones((self.lattice.n, 1), dtype=torch.float32, device=self.norm.device)
            self.ones = self.lattice.filter(ones)[:, 0] * self.norm
        return self.ones

    def nbytes(self) -> int:
        """Memory held by its tensors, in bytes."""
        lat = self.lattice
        tensors = [lat.vertices, lat.entry_weights, self.slice_weights, self.norm, *lat.blur.neighbours,
                   *lat.blur.bounds, *(lat._splat or ())]
        tensors += [self.ones] if self.ones is not None else []
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
