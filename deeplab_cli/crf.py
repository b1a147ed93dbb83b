"""The fully connected CRF (Krähenbühl & Koltun 2011) that refines DeepLab's probabilities: its parameters,
the per-model presets, and the choice between two backends that compute the same model: `pydensecrf`
(Krähenbühl's single-threaded C++ code) and `torch` (ours: the lattices of `permutohedral.py` and the mean
field of `meanfield.py`, batched; on the CPU their compiled kernels, `native.py`, on CUDA torch operations).
What the CRF takes is checked by `unary.py`.

numpy and the backends load on first use: the command line reads PRESETS and BACKENDS at `--help` time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from . import native
from .unary import check_image, check_probs, unary_from_probs

if TYPE_CHECKING:
    import numpy as np

BACKENDS = ("auto", "pydensecrf", "torch")


@dataclass(frozen=True)
class CRFParams:
    """Mean-field iterations and the two Potts kernels' weights and widths (σ in pixels / intensity levels)."""

    iterations: int = 10
    bi_w: float = 4.0
    bi_xy: float = 121.0
    bi_rgb: float = 5.0
    pos_w: float = 3.0
    pos_xy: float = 3.0

    def with_overrides(self, **values: float | int | None) -> "CRFParams":
        """A copy with the given fields replaced (None leaves a field as it is)."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def validate(self) -> "CRFParams":
        """Raise ValueError for values the CRF cannot use."""
        if self.iterations < 0:
            raise ValueError(f"CRF iterations must be ≥ 0, got {self.iterations}")
        for name in ("bi_xy", "bi_rgb", "pos_xy"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CRF {name.replace('_', ' σ')} must be > 0, got {getattr(self, name)}")
        return self

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# The paper cross-validates w1, σα, σβ per model (w2 = 3, σγ = 3 fixed); values quoted per model. Those of
# the COCO-pretrained releases are quoted by one port only (unverified).
PRESETS: dict[str, CRFParams] = {
    "largefov": CRFParams(bi_w=4, bi_xy=121, bi_rgb=5),
    "msc-largefov": CRFParams(bi_w=4, bi_xy=83, bi_rgb=5),
    "deeplab": CRFParams(bi_w=5, bi_xy=50, bi_rgb=10),
    "msc": CRFParams(bi_w=3, bi_xy=95, bi_rgb=3),
    "coco-largefov": CRFParams(bi_w=5, bi_xy=69, bi_rgb=5),
    "msc-coco-largefov": CRFParams(bi_w=4, bi_xy=59, bi_rgb=5),
}
AUTO_PRESET = "auto"  # the preset recorded with the weights, else their architecture's (archs.ArchConfig.crf_preset)


def crf_params(preset: str = AUTO_PRESET, model_preset: str = "largefov", **overrides: float | int | None) -> CRFParams:
    """A preset's parameters ('auto': model_preset's) with fields overridden (None keeps one); ValueError if unusable."""
    name = model_preset if preset == AUTO_PRESET else preset
    if name not in PRESETS:
        raise ValueError(f"unknown CRF preset {name!r}; choose one of: {', '.join([AUTO_PRESET, *PRESETS])}")
    return PRESETS[name].with_overrides(**overrides).validate()


def check_inputs(image: np.ndarray, probs: np.ndarray) -> None:
    """Raise ValueError unless image is (H, W, 3) uint8 and probs finite float (C, H, W) of the same size."""
    check_image(image)
    check_probs(probs, image.shape[:2])


def dense_crf_pydensecrf(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """image (H, W, 3) uint8 RGB, probs (C, H, W) → refined marginals Q (C, H, W) float32, via pydensecrf."""
    import numpy as np
    import pydensecrf.densecrf as dcrf

    check_inputs(image, probs)
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(unary_from_probs(probs))
    d.addPairwiseGaussian(sxy=params.pos_xy, compat=params.pos_w)
    d.addPairwiseBilateral(sxy=params.bi_xy, srgb=params.bi_rgb, rgbim=np.require(image, np.uint8, ["C", "W"]), compat=params.bi_w)
    q = d.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def dense_crf(
    image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams(), backend: str = "pydensecrf", device: str = "cpu"
) -> np.ndarray:
    """Refine probabilities with the dense CRF: image (H, W, 3) uint8, probs (C, H, W) → Q (C, H, W) float32."""
    params.validate()
    backend = resolve_backend(backend, device)
    if backend == "pydensecrf":
        return dense_crf_pydensecrf(image, probs, params)
    from .meanfield import dense_crf_torch

    check_inputs(image, probs)
    q = dense_crf_torch(image, probs, device=device, **params.as_dict())
    return q.cpu().numpy()


def resolve_backend(backend: str, device: str = "cpu", in_pool: bool = False) -> str:
    """Resolve 'auto': torch (ours), except in CPU worker pools when the compiled CPU kernels are missing.

    Measured on the 2-core AMD EPYC (CPU seconds per image on one thread, 21 labels): with the compiled kernels
    ours takes 0.38–0.43× pydensecrf's time from 250×188 to 513×513, so it also wins in `batch`'s
    single-threaded worker processes; with torch operations alone it took about 3× pydensecrf's there (small
    photos, where torch's per-call overhead dominated).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown CRF backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if in_pool and not str(device).startswith("cuda") and native.library() is None:
        return "pydensecrf"
    return "torch"
