"""The fully connected CRF of pydensecrf (Krähenbühl's densecrf v2.2) in pure PyTorch, on any device.

The Gaussian filters run on a permutohedral lattice (Adams et al. 2010) built as `permutohedral.cpp`
builds it, float32 operation by operation: same elevation and scale factors, same rounding to the
enclosing simplex (ties to even, pydensecrf's rank and tie rule), same barycentric weights, same blur
((½, 1, ½) along each of the d+1 directions in turn, absent neighbours counting 0), same slice factor
α = 1/(1+2⁻ᵈ), even the lattice points pydensecrf's SSE code creates for the zero-feature padding of
its last block of 4 pixels. Deduplication sorts packed integer keys (no hash table); blur neighbours
are found by binary search in the sorted keys. Splat, blur and slice are weighted gathers
(`embedding_bag`: on the CPU 2–3× faster than sparse matrix products and far faster than index_add_),
vectorised over labels, with no Python loop over pixels or lattice points and no host round trip in
the iterations. Mean field follows `DenseCRF::inference`: Q₀ = softmax(−U), then per iteration
Q = softmax(−U + Σₖ wₖ·nₖ∘Kₖ(nₖ∘Q)) over the Gaussian and bilateral Potts kernels, with symmetric
normalisation nₖ = 1/√(Kₖ·1) (K includes each pixel's own contribution, as in pydensecrf).
Several images of any sizes share one lattice per kernel: the image index is part of the key.

Memory (float32; N pixels, C labels, m lattice points per kernel, m ≤ (d+1)·N): mean field keeps four
(N, C) tensors; each kernel's splat and slice lists take 8·(d+1)·N bytes, its blur 4·(3d+4)·m bytes;
filtering a chunk of c labels needs ≈ 4·c·(3·Σ(m+1) + 2N) bytes, and labels are chunked (exactly:
they are filtered independently) so that this stays under CHUNK_BYTES (2 GiB). For 2048×1024 with
21 labels (N = 2.1 M): four (N, 21) tensors 0.7 GB, splat/slice lists 0.3 GB, blurs 1.4 GB in the
worst case m = (d+1)·N (0.03 GB measured), filtering ≤ 2 GB: under 5 GB in the worst case. Measured
on the astronaut photo with LargeFOV parameters (m = 270 k Gaussian, 254 k bilateral): peak memory
grows by 1.4 GB during the call, 12 s on one CPU thread. Larger images do not fail for lack of
buffer memory: only the label chunk shrinks (down to one label per pass); what remains grows
linearly: 16·C·N + 72·N bytes plus the blurs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .unary import UNARY_CLIP, check_image, check_probs

CHUNK_BYTES = 2 << 30  # cap on the value buffers of one filtering pass (labels are chunked to fit)
MAX_KEY = 1 << 62  # packed lattice keys must fit in int64


def _index_dtype(*sizes: int) -> torch.dtype:
    """int32 when every index and offset fits (faster gathers, half the memory), else int64."""
    return torch.int32 if max(sizes) < 2**31 - 1 else torch.int64


def _bags(index: torch.Tensor, table: torch.Tensor, bounds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[b] = Σ_{k ∈ [bounds[b], bounds[b+1])} weights[k]·table[index[k]]: (len(bounds)−1, C); empty bags give 0."""
    return F.embedding_bag(index, table, bounds, mode="sum", per_sample_weights=weights, include_last_offset=True)


@dataclass
class LatticeBlur:
    """Blur of lattice values (m+1, C) by (½, 1, ½) along each of the d+1 lattice directions in turn; row m stays 0."""

    index: torch.Tensor  # (d+1, 3·m) per direction, each vertex's [itself, neighbour −, neighbour +] (m if absent)
    bounds: torch.Tensor  # (m+2,) 0, 3, …, 3m, 3m: one bag per vertex, then the empty bag of row m
    weights: torch.Tensor  # (3·m,) float32 1, ½, ½, …

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        for index in self.index:
            values = _bags(index, values, self.bounds, self.weights)
        return values


@dataclass
class Lattice:
    """A permutohedral lattice over n points with m vertices: the splat, blur and slice maps as weighted index lists.

    Value buffers are (m+1, C); row m, the empty bag, stands for absent blur neighbours and stays zero.
    """

    splat_points: torch.Tensor  # (n·(d+1),) the point of each (point, vertex) pair, grouped by vertex, points in order
    splat_weights: torch.Tensor  # (n·(d+1),) float32 its barycentric weight
    splat_bounds: torch.Tensor  # (m+2,) where each vertex's pairs start (last vertex m: an empty bag)
    vertices: torch.Tensor  # (n, d+1) each point's simplex vertices
    barycentric: torch.Tensor  # (n, d+1) float32 its barycentric weights on them
    blur: LatticeBlur
    alpha: float  # pydensecrf's slice factor 1/(1+2⁻ᵈ)

    @property
    def n(self) -> int:
        return self.vertices.shape[0]

    @property
    def m(self) -> int:
        return self.splat_bounds.shape[0] - 2

    @property
    def d(self) -> int:
        return self.vertices.shape[1] - 1

    def splat(self, values: torch.Tensor) -> torch.Tensor:
        """values (n, C) → lattice values (m+1, C): each point's value spread on its vertices by barycentric weight."""
        return _bags(self.splat_points, values, self.splat_bounds, self.splat_weights)

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Splat → blur → slice: values (n, C) → (n, C), the lattice's approximation of Σⱼ k(fᵢ, fⱼ) vⱼ (k(f, f) = 1)."""
        lattice_values = self.blur(self.splat(values))
        bounds = torch.arange(0, self.vertices.numel() + 1, self.d + 1, device=values.device, dtype=self.vertices.dtype)
        return _bags(self.vertices.reshape(-1), lattice_values, bounds, (self.barycentric * self.alpha).reshape(-1))


def _elevate_and_enclose(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """features (n, d) float32 → the enclosing simplex: rem0 (n, d+1) int64, rank (n, d+1) int64, barycentric (n, d+1).

    The arithmetic of `Permutohedral::init` (SSE build), float32 operation by operation, so that points
    fall in the same simplices and get the same weights as in pydensecrf.
    """
    n, d = features.shape
    dev = features.device
    inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    scale = [float(np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev)) for i in range(d)]
    down = float(np.float32(1.0) / np.float32(d + 1))

    # Elevate onto the plane Σx = 0 of R^{d+1} (E·f, p. 5 in Adams et al. 2010).
    elevated = torch.empty((n, d + 1), dtype=torch.float32, device=dev)
    sm = torch.zeros(n, dtype=torch.float32, device=dev)
    for j in range(d, 0, -1):
        cf = features[:, j - 1] * scale[j - 1]
        elevated[:, j] = sm - cf * float(j)
        sm = sm + cf
    elevated[:, 0] = sm

    # The closest 0-coloured lattice point: each coordinate rounded to a multiple of d+1 (ties to even).
    v = torch.round(elevated * down)
    rem0 = v * float(d + 1)
    total = v.sum(dim=1).to(torch.int64)

    # rank[i]: how many residuals are larger, plus equal ones at a smaller index (pydensecrf's tie rule).
    res = elevated - rem0
    rank = torch.empty((n, d + 1), dtype=torch.int64, device=dev)
    for i in range(d + 1):
        ri = res[:, i : i + 1]
        rank[:, i] = (ri < res[:, i + 1 :]).sum(1) + (res[:, :i] >= ri).sum(1)
    # Bring the point back onto the plane if the rounded coordinates do not sum to 0.
    rank += total[:, None]
    wrap = (rank < 0).to(torch.int64) - (rank > d).to(torch.int64)
    rank += wrap * (d + 1)
    rem0 += wrap.to(torch.float32) * float(d + 1)

    # Barycentric coordinates (p. 10 in Adams et al. 2010).
    res = (elevated - rem0) * down
    bary = torch.zeros((n, d + 2), dtype=torch.float32, device=dev)
    bary.scatter_add_(1, d - rank, res)
    bary.scatter_add_(1, d - rank + 1, -res)
    bary[:, 0] += 1.0 + bary[:, d + 1]
    return rem0.to(torch.int64), rank, bary[:, : d + 1].contiguous()


def _vertex_codes(rem0: torch.Tensor, rank: torch.Tensor, ids: torch.Tensor, lo: torch.Tensor,
                  strides: list[int], image_stride: int) -> torch.Tensor:
    """The d+1 simplex vertices' keys, packed: (n, d+1) int64 = image·image_stride + Σ_c stride_c·(key_c − lo_c).

    Vertex r's key is rem0 + canonical[r][rank] (first d coordinates), canonical[r][k] = r − (d+1)·[k > d − r]:
    going from vertex r−1 to r adds 1 to every coordinate and −(d+1) to the one of rank d−r+1.
    """
    n, d1 = rank.shape
    d = d1 - 1
    dev = rank.device
    stride_t = torch.tensor(strides + [0], dtype=torch.int64, device=dev)
    base = ((rem0[:, :d] - lo) * stride_t[:d]).sum(1) + ids * image_stride
    coord_of_rank = torch.empty_like(rank).scatter_(1, rank, torch.arange(d1, device=dev).expand(n, d1))
    steps = sum(strides) - d1 * stride_t[coord_of_rank[:, 1:].flip(1)]  # (n, d): vertex r−1 → r for r = 1..d
    codes = torch.empty((n, d1), dtype=torch.int64, device=dev)
    codes[:, 0] = base
    torch.cumsum(steps, 1, out=codes[:, 1:])
    codes[:, 1:] += base[:, None]
    return codes


def build_lattice(features: torch.Tensor, image_ids: torch.Tensor | None = None, extra: torch.Tensor | None = None,
                  extra_ids: torch.Tensor | None = None) -> Lattice:
    """features (n, d) float32 (already divided by σ) → Lattice; image_ids (n,) int64 keep images' vertices apart.

    extra (e, d) with extra_ids (e,): points that only create lattice vertices (never splatted nor sliced),
    as pydensecrf's SSE padding lanes do. Deduplication is a sort of the packed integer keys; blur
    neighbours are found by binary search in the sorted keys.
    """
    n, d = features.shape
    d1 = d + 1
    dev = features.device
    if image_ids is None:
        image_ids = torch.zeros(n, dtype=torch.int64, device=dev)
    has_extra = extra is not None and len(extra) > 0
    rem0, rank, bary = _elevate_and_enclose(features)
    if has_extra:
        erem0, erank, _ = _elevate_and_enclose(extra)

    # Mixed radix per coordinate, wide enough for the simplex vertices (±d) and their neighbours (±(d+1)).
    lo = rem0[:, :d].amin(0)
    hi = rem0[:, :d].amax(0)
    if has_extra:
        lo, hi = torch.minimum(lo, erem0[:, :d].amin(0)), torch.maximum(hi, erem0[:, :d].amax(0))
    lo = lo - 2 * d1
    radix = [int(x) for x in (hi + 2 * d1 - lo + 1).tolist()]
    image_stride = math.prod(radix)
    n_images = int(image_ids.max()) + 1 if n else 1
    if has_extra:
        n_images = max(n_images, int(extra_ids.max()) + 1)
    if image_stride * n_images >= MAX_KEY:
        raise ValueError("CRF σ too small for this image: permutohedral lattice keys would exceed 64 bits")
    strides = [math.prod(radix[c + 1 :]) for c in range(d)]
    codes = _vertex_codes(rem0, rank, image_ids, lo, strides, image_stride).view(-1)

    # Deduplicate: sort the keys (stable: a vertex's entries stay in point order, as the C++ splat adds them).
    sorted_codes, order = torch.sort(codes, stable=True)
    del codes
    lattice_codes, vertex_of_sorted, counts = torch.unique_consecutive(sorted_codes, return_inverse=True,
                                                                       return_counts=True)
    del sorted_codes
    vertices = torch.empty_like(order).scatter_(0, order, vertex_of_sorted)
    if has_extra:  # vertices only the padding points create: insert them in key order
        ecodes = torch.unique(_vertex_codes(erem0, erank, extra_ids, lo, strides, image_stride))
        pos = torch.searchsorted(lattice_codes, ecodes).clamp_(max=lattice_codes.numel() - 1)
        new_codes = ecodes[lattice_codes[pos] != ecodes]
        if new_codes.numel():
            shift = torch.searchsorted(new_codes, lattice_codes) + torch.arange(lattice_codes.numel(), device=dev)
            lattice_codes, _ = torch.sort(torch.cat([lattice_codes, new_codes]))
            vertices = shift[vertices]
            counts = torch.zeros_like(lattice_codes).index_copy_(0, shift, counts)
    m = lattice_codes.numel()

    itype = _index_dtype(n * d1 + 1, 3 * m + 1)
    bounds = torch.zeros(m + 2, dtype=itype, device=dev)
    bounds[1 : m + 1] = torch.cumsum(counts, 0)
    bounds[m + 1] = bounds[m]
    points = torch.arange(n, dtype=itype, device=dev).repeat_interleave(d1)
    splat_points = points.index_select(0, order)
    splat_weights = bary.view(-1).index_select(0, order)
    del order, points

    # Blur neighbours along direction j: every coordinate −1 except coordinate j, +d, and the opposite one.
    blur_index = torch.empty((d1, m, 3), dtype=itype, device=dev)
    blur_index[:, :, 0] = torch.arange(m, dtype=itype, device=dev)
    blur_index[:, :, 2] = m
    arange_m = torch.arange(m, dtype=itype, device=dev)
    base = -sum(strides)
    for j in range(d1):
        delta = base + d1 * strides[j] if j < d else base
        q = lattice_codes + delta
        idx = torch.searchsorted(lattice_codes, q).clamp_(max=m - 1)
        found = torch.where(lattice_codes[idx] == q, idx, m).to(itype)
        blur_index[j, :, 1] = found
        # b = a + δ ⇔ a = b − δ: scatter a into b's slot (misses go to slot m of a scratch column, dropped).
        opposite = torch.full((m + 1,), m, dtype=itype, device=dev)
        opposite.scatter_(0, found.long(), arange_m)
        blur_index[j, :, 2] = opposite[:m]
    blur_bounds = torch.arange(0, 3 * m + 4, 3, dtype=itype, device=dev)
    blur_bounds[-1] = 3 * m
    blur_weights = torch.tensor([1.0, 0.5, 0.5], device=dev).repeat(m)
    alpha = float(np.float32(1.0) / (np.float32(1.0) + np.float32(2.0**-d)))
    return Lattice(splat_points, splat_weights, bounds, vertices.view(n, d1).to(itype), bary,
                   LatticeBlur(blur_index.view(d1, 3 * m), blur_bounds, blur_weights), alpha)


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


def _features(images: Sequence[torch.Tensor], sxy: float, srgb: float | None) -> torch.Tensor:
    """Per-pixel features of all images, pixel index y·W + x: (x/σxy, y/σxy[, r/σrgb, g/σrgb, b/σrgb]) float32."""
    parts = []
    for im in images:
        h, w = im.shape[:2]
        dev = im.device
        x = _divide(torch.arange(w, dtype=torch.float32, device=dev), sxy).expand(h, w)
        y = _divide(torch.arange(h, dtype=torch.float32, device=dev), sxy)[:, None].expand(h, w)
        cols = [x.reshape(-1), y.reshape(-1)]
        if srgb is not None:
            rgb = _divide(im.reshape(-1, 3).to(torch.float32), srgb)
            cols += [rgb[:, 0], rgb[:, 1], rgb[:, 2]]
        parts.append(torch.stack(cols, dim=1))
    return torch.cat(parts)


def _padding_points(sizes: Sequence[int], d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """pydensecrf's SSE build fills its last block of 4 pixels with zero features that still create lattice points."""
    ids = [i for i, n in enumerate(sizes) if n % 4]
    return (torch.zeros((len(ids), d), dtype=torch.float32, device=device),
            torch.tensor(ids, dtype=torch.int64, device=device))


class _Pairwise:
    """Σₖ wₖ·nₖ∘Kₖ(nₖ∘q) over the Potts kernels (symmetric normaliser nₖ = 1/√(Kₖ·1)): minus the pairwise energy.

    All kernels' splats are one weighted gather, and so are their slices (each point's bag holds its simplex
    vertices in every lattice); the blurs run per lattice.
    """

    def __init__(self, lattices: Sequence[Lattice], weights: Sequence[float], chunk_bytes: int | None = None):
        n = lattices[0].n
        dev = lattices[0].vertices.device
        ones = torch.ones((n, 1), dtype=torch.float32, device=dev)
        norms = [1.0 / torch.sqrt(lat.filter(ones)[:, 0] + 1e-20) for lat in lattices]
        rows = [lat.m + 1 for lat in lattices]
        self.row_starts = [sum(rows[:k]) for k in range(len(rows) + 1)]
        entries = [lat.splat_points.numel() for lat in lattices]
        total_d1 = sum(lat.d + 1 for lat in lattices)
        itype = _index_dtype(sum(entries) + 1, n * total_d1 + 1, self.row_starts[-1])

        self.splat_index = torch.cat([lat.splat_points.to(itype) for lat in lattices])
        self.splat_weights = torch.cat([lat.splat_weights * nm[lat.splat_points] for lat, nm in zip(lattices, norms)])
        starts = [sum(entries[:k]) for k in range(len(entries))]
        self.splat_bounds = torch.cat([lat.splat_bounds[:-1].to(itype) + s for lat, s in zip(lattices, starts)]
                                      + [torch.tensor([sum(entries)], dtype=itype, device=dev)])
        self.slice_index = torch.cat([lat.vertices.to(itype) + r for lat, r in zip(lattices, self.row_starts)],
                                     dim=1).reshape(-1)
        self.slice_weights = torch.cat([lat.barycentric * (w * lat.alpha) * nm[:, None]
                                        for lat, w, nm in zip(lattices, weights, norms)], dim=1).reshape(-1)
        self.slice_bounds = torch.arange(0, n * total_d1 + 1, total_d1, dtype=itype, device=dev)
        self.blurs = [lat.blur for lat in lattices]  # of the lattices, only their blurs are kept
        # Labels are filtered independently: chunk them so the value buffers stay under chunk_bytes.
        per_label = 4 * (3 * self.row_starts[-1] + 2 * n)
        self.labels_per_pass = max(1, (chunk_bytes or CHUNK_BYTES) // per_label)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """q (N, C) float32 → the summed messages (N, C)."""
        c, step = q.shape[1], self.labels_per_pass
        if step >= c:
            return self._messages(q)
        return torch.cat([self._messages(q[:, i : i + step].contiguous()) for i in range(0, c, step)], dim=1)

    def _messages(self, q: torch.Tensor) -> torch.Tensor:
        splatted = _bags(self.splat_index, q, self.splat_bounds, self.splat_weights)
        blurred = [blur(splatted[a:b]) for blur, a, b in zip(self.blurs, self.row_starts, self.row_starts[1:])]
        table = blurred[0] if len(blurred) == 1 else torch.cat(blurred)
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


def _mean_field(images: Sequence[torch.Tensor], probs: Sequence[torch.Tensor], iterations: int, pos_w: float,
                pos_xy: float, bi_w: float, bi_xy: float, bi_rgb: float) -> list[torch.Tensor]:
    """`DenseCRF::inference` on images with the same label count C: → Q (C, H, W) per image."""
    c = probs[0].shape[0]
    sizes = [im.shape[0] * im.shape[1] for im in images]
    # (N, C) pixel-major like the C++ code's column-major (labels, pixels) matrices.
    neg_unary = torch.cat([p.reshape(c, -1).t() for p in probs]).clamp_(min=UNARY_CLIP).log_()
    q = torch.softmax(neg_unary, dim=1)
    if iterations and c > 1:
        dev = neg_unary.device
        ids = torch.repeat_interleave(torch.arange(len(sizes), device=dev), torch.tensor(sizes, device=dev))
        terms = [(w, sxy, srgb) for w, sxy, srgb in ((pos_w, pos_xy, None), (bi_w, bi_xy, bi_rgb)) if w != 0]
        lattices = []
        for _, sxy, srgb in terms:
            features = _features(images, sxy, srgb)
            extra, extra_ids = _padding_points(sizes, features.shape[1], dev)
            lattices.append(build_lattice(features, ids, extra, extra_ids))
        if lattices:
            pairwise = _Pairwise(lattices, [w for w, _, _ in terms])
            del lattices, features
            for _ in range(iterations):
                q = torch.softmax(pairwise(q).add_(neg_unary), dim=1)
    out, start = [], 0
    for p, n in zip(probs, sizes):
        out.append(q[start : start + n].t().reshape(p.shape).contiguous())
        start += n
    return out
