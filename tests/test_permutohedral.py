"""Our dense CRF (permutohedral.py's lattices, meanfield.py's two loops) against pydensecrf itself, on real photos
with smooth unaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import cli
from PIL import Image

from deeplab_cli import meanfield, native, permutohedral
from deeplab_cli.crf import PRESETS, CRFParams, dense_crf, dense_crf_pydensecrf
from deeplab_cli.meanfield import dense_crf_torch, dense_crf_torch_batch
from deeplab_cli.testing import random_smooth_probs

SETTINGS = {"largefov": PRESETS["largefov"], "deeplab": PRESETS["deeplab"]}  # bi 4/121/5 and 5/50/10, gauss 3/3


@pytest.fixture(autouse=True)
def one_thread():
    """Small images: one torch thread is as fast, and immune to the CPU being shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["native", "torch"])
def loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CRF under test: with the compiled CPU kernels (the CPU default) or all torch (CUDA's, and the fallback)."""
    if request.param == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    else:
        assert native.library() is not None, "the compiled CPU kernels (deeplab_cli/_native) were not built at install"
    return request.param


def small_photo(name: str, size: tuple[int, int] = (181, 121)) -> np.ndarray:
    """A scikit-image sample photo resized to size (W, H): (H, W, 3) uint8. 181×121 leaves H·W % 4 ≠ 0."""
    from skimage import data

    return np.array(Image.fromarray(getattr(data, name)()).resize(size, Image.BILINEAR))


def torch_q(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    return dense_crf_torch(image, probs, device="cpu", **params.as_dict()).numpy()


def assert_matches(q: np.ndarray, ref: np.ndarray) -> None:
    """The issue's acceptance (≥ 99.5 % argmax agreement, max |ΔQ| ≤ 1e-2), and float32 rounding-level agreement."""
    assert q.shape == ref.shape and q.dtype == np.float32
    agreement = (q.argmax(0) == ref.argmax(0)).mean()
    dq = np.abs(q - ref).max()
    assert agreement >= 0.995, agreement
    assert dq <= 1e-2, dq
    assert dq <= 1e-4, f"same model but not the same arithmetic as pydensecrf: max |ΔQ| {dq:.2e}"


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("labels", [2, 5, 21])
@pytest.mark.parametrize("photo_name", ["chelsea", "coffee", "astronaut"])
def test_matches_pydensecrf_on_photos(photo_name: str, labels: int, setting: str, loop: str) -> None:
    image = small_photo(photo_name)
    probs = random_smooth_probs(*image.shape[:2], labels, seed=labels)
    params = SETTINGS[setting]
    ref = dense_crf_pydensecrf(image, probs, params)
    assert_matches(torch_q(image, probs, params), ref)
    assert (ref.argmax(0) != probs.argmax(0)).mean() > 0.005  # the CRF really changed the labelling


@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_matches_pydensecrf_at_every_iteration_count(iterations: int, loop: str) -> None:
    image = small_photo("coffee", (64, 48))
    probs = random_smooth_probs(48, 64, 4, seed=1)
    params = PRESETS["largefov"].with_overrides(iterations=iterations)
    assert_matches(torch_q(image, probs, params), dense_crf_pydensecrf(image, probs, params))


def test_reproduces_pydensecrf_sse_padding_lattice_points(loop: str) -> None:
    """pydensecrf's SSE code pads the last block of 4 pixels with zero features, which still create lattice
    points; on a dark image with a bright first pixel they change Q by ~0.07 unless reproduced."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 12, (30, 41, 3)).astype(np.uint8)
    image[0, 0] = 200
    probs = rng.dirichlet(np.ones(3), (30, 41)).transpose(2, 0, 1).astype(np.float32)
    params = CRFParams(bi_xy=3, bi_rgb=3)
    assert_matches(torch_q(image, probs, params), dense_crf_pydensecrf(image, probs, params))


@pytest.mark.parametrize("shape", [(37, 1), (1, 23), (1, 1), (2, 2)])
def test_thin_and_tiny_images(shape: tuple[int, int], loop: str) -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (*shape, 3)).astype(np.uint8)
    probs = rng.dirichlet(np.ones(3), shape).transpose(2, 0, 1).astype(np.float32)
    params = PRESETS["largefov"]
    q = torch_q(image, probs, params)
    assert q.shape == (3, *shape)
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    assert_matches(q, dense_crf_pydensecrf(image, probs, params))


def test_one_label_gives_certainty() -> None:
    image = small_photo("chelsea", (40, 30))
    q = torch_q(image, np.full((1, 30, 40), 0.7, np.float32), PRESETS["largefov"])
    assert q.shape == (1, 30, 40)
    np.testing.assert_array_equal(q, 1.0)


def test_uniform_image(loop: str) -> None:
    image = np.full((50, 70, 3), 128, np.uint8)
    probs = random_smooth_probs(50, 70, 5, seed=3)
    params = PRESETS["largefov"]
    assert_matches(torch_q(image, probs, params), dense_crf_pydensecrf(image, probs, params))


def test_tiny_sigma_isolates_pixels(loop: str) -> None:
    """With σ → 0 every pixel is alone on the lattice: the normalised message is w·Q, so Q ← softmax(log p + w·Q)."""
    image = small_photo("astronaut", (30, 20))
    probs = random_smooth_probs(20, 30, 4, seed=4)
    q = torch_q(image, probs, CRFParams(iterations=5, pos_w=3.0, pos_xy=1e-3, bi_w=0.0))
    expected = torch.from_numpy(probs).clamp(min=1e-5).log()
    qe = torch.softmax(expected, 0)
    for _ in range(5):
        qe = torch.softmax(expected + 3.0 * qe, 0)
    np.testing.assert_allclose(q, qe.numpy(), atol=1e-5)


def test_sigma_too_small_for_the_key_range_is_a_clear_error() -> None:
    image = small_photo("astronaut", (30, 20))
    probs = random_smooth_probs(20, 30, 4, seed=4)
    with pytest.raises(ValueError, match="σ too small"):
        torch_q(image, probs, CRFParams(bi_xy=1e-4, bi_rgb=1e-4))


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_non_positive_sigma_is_rejected(sigma: float) -> None:
    image = small_photo("astronaut", (30, 20))
    with pytest.raises(ValueError, match="σ"):
        dense_crf_torch(image, random_smooth_probs(20, 30, 3), pos_xy=sigma)


def test_float64_and_tensor_inputs_are_converted() -> None:
    image = small_photo("coffee", (50, 40))
    probs = random_smooth_probs(40, 50, 5, seed=5)
    q32 = dense_crf_torch(image, probs)
    q64 = dense_crf_torch(image, probs.astype(np.float64))
    qt = dense_crf_torch(torch.from_numpy(image), torch.from_numpy(probs), device=torch.device("cpu"))
    assert q64.dtype == torch.float32 and q64.device.type == "cpu" and q64.shape == (5, 40, 50)
    torch.testing.assert_close(q64, q32, atol=1e-6, rtol=0)
    torch.testing.assert_close(qt, q32, atol=0, rtol=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_probabilities_are_rejected(bad: float) -> None:
    image = small_photo("coffee", (50, 40))
    probs = random_smooth_probs(40, 50, 3)
    probs[1, 5, 7] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        dense_crf_torch(image, probs)
    with pytest.raises(ValueError, match="NaN or inf"):
        dense_crf(image, probs, backend="torch")


@pytest.mark.parametrize(
    "image, probs, message",
    [
        (np.zeros((10, 12, 3), np.float32), np.ones((2, 10, 12), np.float32), "uint8"),
        (np.zeros((10, 12), np.uint8), np.ones((2, 10, 12), np.float32), r"\(H, W, 3\)"),
        (np.zeros((10, 12, 3), np.uint8), np.ones((2, 10, 11), np.float32), "11×10 but the image is 12×10"),
        (np.zeros((10, 12, 3), np.uint8), np.ones((10, 12), np.float32), r"\(C, H, W\)"),
        (np.zeros((10, 12, 3), np.uint8), np.ones((2, 10, 12), np.int64), "floating point"),
    ],
)
def test_bad_shapes_and_dtypes_are_rejected(image: np.ndarray, probs: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dense_crf_torch(image, probs)


def test_batch_equals_single_image_calls(loop: str) -> None:
    """Images of different sizes (and label counts) in one call give what they give one by one."""
    images = [small_photo("chelsea", (60, 45)), small_photo("coffee", (33, 50)), small_photo("astronaut", (1, 17)),
              small_photo("astronaut", (40, 40))]
    probs = [random_smooth_probs(*im.shape[:2], c, seed=i) for i, (im, c) in enumerate(zip(images, [5, 5, 5, 3]))]
    params = PRESETS["deeplab"].as_dict()
    batch = dense_crf_torch_batch(images, probs, **params)
    assert len(batch) == len(images)
    for im, p, q in zip(images, probs, batch):
        single = dense_crf_torch(im, p, **params)
        assert q.shape == p.shape
        torch.testing.assert_close(q, single, atol=2e-6, rtol=0)
        assert_matches(q.numpy(), dense_crf_pydensecrf(im, p, PRESETS["deeplab"]))


def test_batch_rejects_mismatched_lists() -> None:
    with pytest.raises(ValueError, match="2 images but 1"):
        dense_crf_torch_batch([np.zeros((4, 4, 3), np.uint8)] * 2, [np.ones((2, 4, 4), np.float32)])


def test_label_chunking_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a tiny memory budget labels are filtered a few at a time; the result does not change."""
    image = small_photo("chelsea", (64, 48))
    probs = random_smooth_probs(48, 64, 7, seed=6)
    whole = dense_crf_torch(image, probs)
    monkeypatch.setattr(meanfield, "CHUNK_BYTES", 100_000)  # also too small for the compiled loop's tables
    torch.testing.assert_close(dense_crf_torch(image, probs), whole, atol=1e-6, rtol=0)


def test_crf_module_dispatches_to_torch() -> None:
    image = small_photo("astronaut", (70, 50))
    probs = random_smooth_probs(50, 70, 21, seed=7)
    q = dense_crf(image, probs, PRESETS["largefov"], backend="torch", device="cpu")
    assert isinstance(q, np.ndarray)
    assert_matches(q, dense_crf_pydensecrf(image, probs, PRESETS["largefov"]))


def test_segment_cli_with_torch_backend(weights_file, photo_file, tmp_path) -> None:
    """`deeplab segment --crf-backend torch` end to end gives pydensecrf's mask."""
    masks = {}
    for backend in ("torch", "pydensecrf"):
        out = tmp_path / f"{backend}.png"
        result = cli("segment", photo_file, "-o", out, "--weights", weights_file, "--device", "cpu",
                     "--crf-backend", backend)
        assert result.exit_code == 0, result.output
        masks[backend] = np.array(Image.open(out))
    assert masks["torch"].shape == Image.open(photo_file).size[::-1]
    assert (masks["torch"] == masks["pydensecrf"]).mean() >= 0.995


@pytest.mark.parametrize("params", [CRFParams(pos_w=-2.0, bi_w=4.0), CRFParams(bi_w=400.0)], ids=["negative", "huge"])
def test_weights_outside_the_precomputed_shift_subtract_the_row_maximum(params: CRFParams,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative weights, or messages spanning more than 2^SHIFT_RANGE, take the exact row-maximum path (as
    pydensecrf does); the precomputed shift gives the same Q wherever it applies."""
    image = small_photo("chelsea", (64, 48))
    probs = random_smooth_probs(48, 64, 5, seed=8)
    shifted = []
    monkeypatch.setattr(native, "library", lambda: None)  # the torch loop: _normalise each iteration
    original = meanfield._normalise

    def spy(x: torch.Tensor) -> torch.Tensor:
        shifted.append(float(x.max()))
        return original(x)

    monkeypatch.setattr(meanfield, "_normalise", spy)
    q = torch_q(image, probs, params)
    assert max(shifted[1:]) == 0.0  # every iteration's logits had their row maximum subtracted
    ref = dense_crf_pydensecrf(image, probs, params)
    assert (q.argmax(0) == ref.argmax(0)).mean() >= 0.999 and np.abs(q - ref).max() <= 1e-4
    shifted.clear()  # default weights: the precomputed shift applies
    q = torch_q(image, probs, PRESETS["largefov"])
    assert max(shifted[1:]) < 0.0
    assert np.abs(q - dense_crf_pydensecrf(image, probs, PRESETS["largefov"])).max() <= 1e-4


@pytest.mark.parametrize("params", [CRFParams(pos_w=-2.0, bi_w=4.0), PRESETS["largefov"]], ids=["exact", "shifted"])
@pytest.mark.parametrize("labels", [3, 8, 21, 33, 64, 70])
def test_compiled_loop_matches_the_torch_loop(labels: int, params: CRFParams, monkeypatch: pytest.MonkeyPatch) -> None:
    """Label counts around the compiled loop's vector blocks (of 8 labels, up to 64; over 64 it hands over to
    torch), either softmax shift, one and two threads: the two loops agree to float rounding."""
    image = small_photo("coffee", (45, 31))
    probs = random_smooth_probs(31, 45, labels, seed=labels)
    used = []
    native_loop = meanfield._native_loop
    monkeypatch.setattr(meanfield, "_native_loop", lambda *a: used.append(r := native_loop(*a)) or r)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(torch_q(image, probs, params))
    assert all((q is not None) == (labels <= 64) for q in used)
    monkeypatch.setattr(native, "library", lambda: None)
    ref = torch_q(image, probs, params)
    for q in results:
        assert np.abs(q - ref).max() <= 1e-5 and (q.argmax(0) == ref.argmax(0)).all()


@pytest.mark.parametrize("sigmas", [(121.0, 5.0), (3.0, None), (2.0, 2.0)], ids=["bilateral", "position", "fine"])
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_lattice_equals_the_torch_lattice(sigmas: tuple[float, float | None], threads: int) -> None:
    """_lattice.c computes the simplices with pydensecrf's arithmetic and numbers, groups and links the vertices
    exactly as the torch version does: two images of odd sizes (pydensecrf's padding points included; enough
    vertices for two threads to share the blur neighbours' search) give identical lattices, bit for bit."""
    torch.set_num_threads(threads)
    images = [small_photo("astronaut", (241, 147)), small_photo("coffee", (33, 29))]
    shapes = [im.shape[:2] for im in images]
    features = permutohedral._features(shapes, sigmas[0], [torch.from_numpy(im) for im in images], sigmas[1])
    sizes = [h * w for h, w in shapes]
    built = permutohedral._image_lattice(features, sizes)
    if threads == 2 and sigmas[1] == 2.0:
        assert built.m >= 8192  # the neighbours' search really splits
    library = native.library
    native.library = lambda: None
    try:
        reference = permutohedral._image_lattice(features, sizes)
    finally:
        native.library = library
    assert built.m == reference.m
    for a, b in zip((built.vertices, built.barycentric, *built.splat_lists),
                    (reference.vertices, reference.barycentric, *reference.splat_lists)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert len(built.blur.neighbours) == len(reference.blur.neighbours) == features.shape[1] + 1
    for a, b in zip(built.blur.neighbours + built.blur.bounds, reference.blur.neighbours + reference.blur.bounds):
        assert torch.equal(a, b)
