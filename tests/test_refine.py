"""`deeplab refine`: the CRF on another model's probabilities, logits or labels, and clear errors for bad inputs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import cli
from PIL import Image

from deeplab_cli.crf import CRFParams
from deeplab_cli.errors import DeeplabError, UsageError
from deeplab_cli.io import write_mask
from deeplab_cli.refine import (
    RefineOptions, as_probs, load_unary, match_folders, probs_from_labels, probs_from_logits, refine,
)

COLORS = np.array([[90, 110, 80], [200, 40, 40], [40, 60, 200]], np.float32)


run = cli


def scene(h: int = 96, w: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sharp-edged shapes on a textured background: image (H, W, 3) uint8, ground truth (H, W) uint8 in {0, 1, 2}."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((h, w), np.uint8)
    cv2.rectangle(gt, (10, 12), (50, 70), 1, -1)
    cv2.circle(gt, (92, 48), 24, 2, -1)
    yy, xx = np.mgrid[0:h, 0:w]
    texture = 10 * np.sin(xx / 4.0) * np.cos(yy / 6.0)
    img = COLORS[gt] + texture[..., None] + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8), gt


def coarse_probs(gt: np.ndarray, num_classes: int = 3, factor: int = 8) -> np.ndarray:
    """Ground truth downsampled 8× (area), blurred, upsampled bilinearly: blurry (C, H, W) float32 probabilities."""
    h, w = gt.shape
    onehot = (gt[None] == np.arange(num_classes)[:, None, None]).astype(np.float32)
    small = [cv2.GaussianBlur(cv2.resize(o, (w // factor, h // factor), interpolation=cv2.INTER_AREA), (3, 3), 1.0)
             for o in onehot]
    up = np.stack([cv2.resize(s, (w, h), interpolation=cv2.INTER_LINEAR) for s in small]).clip(1e-3, None)
    return (up / up.sum(0, keepdims=True)).astype(np.float32)


def miou(pred: np.ndarray, gt: np.ndarray, num_classes: int = 3) -> float:
    ious = [((pred == c) & (gt == c)).sum() / ((pred == c) | (gt == c)).sum() for c in range(num_classes)]
    return float(np.mean(ious))


# --------------------------------------------------------------------------------------------- conversions


def test_logits_softmax_and_binary_sigmoid() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 5, (4, 6, 7)).astype(np.float32)
    p = probs_from_logits(z)
    ref = np.exp(z) / np.exp(z).sum(0)
    assert p.dtype == np.float32 and np.allclose(p, ref, atol=1e-6)
    assert np.all(np.isfinite(probs_from_logits(z * 1e4)))  # large scores: no overflow
    b = probs_from_logits(z[:1])
    assert b.shape == (2, 6, 7) and np.allclose(b[1], 1 / (1 + np.exp(-z[0])), atol=1e-6)


def test_probs_from_labels_confidence_and_unknown() -> None:
    labels = np.array([[0, 1, 2], [2, 255, 0]], np.uint8)
    p = probs_from_labels(labels, 4, 0.7)
    assert p.shape == (4, 2, 3) and p.dtype == np.float32
    assert np.allclose(p.sum(0), 1.0)
    assert p[1, 0, 1] == pytest.approx(0.7) and p[0, 0, 1] == pytest.approx(0.1) and p[3, 0, 1] == pytest.approx(0.1)
    assert np.allclose(p[:, 1, 1], 0.25)  # 255 = unknown: uniform
    assert probs_from_labels(labels).shape[0] == 3  # default: largest label + 1
    with pytest.raises(ValueError, match="exceed 1/4"):
        probs_from_labels(labels, 4, 0.2)
    with pytest.raises(ValueError, match="does not fit 2 classes"):
        probs_from_labels(labels, 2, 0.7)


def test_single_channel_probability_is_binary() -> None:
    p = np.full((1, 4, 5), 0.8, np.float32)
    out = as_probs(p, (4, 5), "fg.npy")
    assert out.shape == (2, 4, 5) and np.allclose(out[0], 0.2) and np.allclose(out[1], 0.8)


# --------------------------------------------------------------------------------------------- the CRF helps


def test_crf_moves_coarse_boundaries_to_image_edges() -> None:
    image, gt = scene()
    probs = coarse_probs(gt)
    before = miou(probs.argmax(0), gt)
    labels, q = refine(image, probs, CRFParams())
    after = miou(labels, gt)
    assert q.shape == probs.shape and labels.dtype == np.uint8
    assert before < 0.95 and after > before + 0.04 and after > 0.97, (before, after)


def test_refine_from_labels_fills_unknown_and_snaps_edges() -> None:
    image, gt = scene()
    rough = coarse_probs(gt).argmax(0).astype(np.uint8)
    rough[40:56, 60:75] = 255  # a hole of unknown pixels straddling the circle's edge
    labels, _ = refine(image, probs_from_labels(rough, 3, 0.6), CRFParams())
    assert miou(labels, gt) > miou(np.where(rough == 255, 0, rough), gt) + 0.04


# --------------------------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((3, 10, 12), np.int64), "int64 array.*--labels-in"),
        (np.zeros((3, 10, 12), bool), "dtype bool"),
        (np.zeros((10, 12), np.float32), "2-D 10×12 array"),
        (np.zeros((1, 3, 10, 12), np.float32), "4-D"),
        (np.zeros((3, 10, 13), np.float32) + 1 / 3, "13×10 \\(W×H\\) scores but the image is 12×10"),
        (np.zeros((10, 12, 3), np.float32) + 1 / 3, "looks like \\(H, W, C\\)"),
        (np.where(np.arange(360).reshape(3, 10, 12) == 17, np.nan, 1 / 3).astype(np.float32),
         "1 NaN value.*class 0, y 1, x 5"),
        (np.full((3, 10, 12), np.inf, np.float32), "inf"),
        (np.full((3, 10, 12), 2.0, np.float32), "outside \\[0, 1\\].*--logits"),
        (np.full((3, 10, 12), 0.2, np.float32), "sum to 0.6.*--logits"),
    ],
)
def test_bad_arrays_name_the_file_and_the_reason(array: np.ndarray, message: str) -> None:
    with pytest.raises(DeeplabError, match="^p.npy: .*" + message):
        as_probs(array, (10, 12), "p.npy")


def test_logits_skip_range_checks_but_not_nan() -> None:
    z = np.full((3, 10, 12), 7.0, np.float32)
    assert np.allclose(as_probs(z, (10, 12), "z.npy", logits=True), 1 / 3)
    z[0, 0, 0] = np.nan
    with pytest.raises(DeeplabError, match="NaN"):
        as_probs(z, (10, 12), "z.npy", logits=True)


def test_label_input_size_checked(tmp_path: Path) -> None:
    write_mask(tmp_path / "l.png", np.zeros((8, 9), np.uint8))
    with pytest.raises(DeeplabError, match="9×8 \\(W×H\\) label image but the image is 12×10"):
        load_unary(tmp_path / "l.png", (10, 12), RefineOptions(labels_in=True))


def test_option_checks() -> None:
    with pytest.raises(UsageError, match="exclude each other"):
        RefineOptions(logits=True, labels_in=True).validate()
    with pytest.raises(UsageError, match="--confidence"):
        RefineOptions(confidence=1.0).validate()


def test_match_folders_by_relative_name(tmp_path: Path) -> None:
    for rel in ("imgs/a.jpg", "imgs/sub/b.png", "imgs/c.jpg", "imgs/d.jpg", "imgs/d.png", "probs/a.npy",
                "probs/sub/b.npy", "probs/e.npy", "probs/d.npy", "imgs/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    plan = match_folders(tmp_path / "imgs", tmp_path / "probs", frozenset({".npy"}))
    assert [k for k, _, _ in plan.pairs] == ["a", "sub/b"]
    assert [p.name for p in plan.images_without_source] == ["c.jpg"]
    assert [p.name for p in plan.sources_without_image] == ["e.npy"]
    assert [k for k, _ in plan.ambiguous] == ["d"]


# --------------------------------------------------------------------------------------------- CLI end to end


@pytest.fixture()
def scene_files(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    image, gt = scene()
    Image.fromarray(image).save(tmp_path / "scene.png")
    np.save(tmp_path / "scene.npy", coarse_probs(gt))
    return tmp_path / "scene.png", tmp_path / "scene.npy", gt


def test_cli_refine_probs(tmp_path: Path, scene_files) -> None:
    image, probs, gt = scene_files
    out, overlay, q = tmp_path / "out" / "mask.png", tmp_path / "ov.jpg", tmp_path / "q.npy"
    res = run("refine", image, probs, "-o", out, "--overlay", overlay, "--save-probs", q, "--crf-backend", "pydensecrf")
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    mask = Image.open(out)
    assert mask.mode == "P" and mask.size == (gt.shape[1], gt.shape[0])
    assert miou(np.array(mask), gt) > 0.97
    assert np.load(q).shape == (3, *gt.shape) and Image.open(overlay).size == mask.size
    res = run("refine", image, probs, "-o", tmp_path / "raw.png", "--no-crf")
    assert np.array_equal(np.array(Image.open(tmp_path / "raw.png")), np.load(probs).argmax(0))


def test_cli_refine_logits_and_labels(tmp_path: Path, scene_files) -> None:
    image, probs, gt = scene_files
    np.save(tmp_path / "logits.npy", np.log(np.load(probs)) * 3.0 + 1.5)
    res = run("refine", image, tmp_path / "logits.npy", "--logits", "-o", tmp_path / "a.png")
    assert res.exit_code == 0, res.output
    assert miou(np.array(Image.open(tmp_path / "a.png")), gt) > 0.95
    write_mask(tmp_path / "rough.png", np.load(probs).argmax(0))
    res = run("refine", image, tmp_path / "rough.png", "--labels-in", "--confidence", "0.6", "-o", tmp_path / "b.png")
    assert res.exit_code == 0, res.output
    assert miou(np.array(Image.open(tmp_path / "b.png")), gt) > 0.95


def test_cli_errors_are_one_line(tmp_path: Path, scene_files) -> None:
    image, probs, _ = scene_files
    bad = np.load(probs)
    bad[1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    np.save(tmp_path / "small.npy", bad[:, :-1])
    cases = [
        ((image, tmp_path / "nan.npy", "-o", tmp_path / "x.png"), 1, "nan.npy: 1 NaN value"),
        ((image, tmp_path / "small.npy", "-o", tmp_path / "x.png"), 1,
         "small.npy: 128×95 (W×H) scores but the image is 128×96"),
        ((image, tmp_path / "missing.npy", "-o", tmp_path / "x.png"), 2, "missing.npy: no such file"),
        ((image, probs, "-o", probs), 2, "refusing to overwrite"),
        ((image, probs, "-o", tmp_path / "x.png", "--logits", "--labels-in"), 2, "exclude each other"),
    ]
    for args, code, message in cases:
        res = run("refine", *args)
        assert res.exit_code == code, (args, res.output)
        assert res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert not (tmp_path / "x.png").exists()


def test_cli_refine_folders(tmp_path: Path) -> None:
    imgs, probs, out = tmp_path / "imgs", tmp_path / "probs", tmp_path / "out"
    (imgs / "sub").mkdir(parents=True)
    (probs / "sub").mkdir(parents=True)
    truths = {}
    for i, key in enumerate(["a", "sub/b", "c"]):
        image, gt = scene(seed=i)
        Image.fromarray(image).save(imgs / f"{key}.png")
        p = coarse_probs(gt)
        if key == "c":
            p = p.astype(np.int32)  # a wrong dtype: this pair fails, the others go on
        np.save(probs / f"{key}.npy", p)
        truths[key] = gt
    Image.fromarray(scene()[0]).save(imgs / "lonely.jpg")  # no probabilities: left aside
    res = run("refine", imgs, probs, "-o", out, "--overlay", tmp_path / "ov")
    assert res.exit_code == 1, res.output
    assert "c.npy: int32 array" in res.stderr and "2 mask(s) written" in res.stderr
    for key in ("a", "sub/b"):
        assert miou(np.array(Image.open(out / f"{key}.png")), truths[key]) > 0.9
        assert (tmp_path / "ov" / f"{key}.png").is_file()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a.png", "sub/b.png"]
    res = run("refine", imgs, probs, "-o", tmp_path / "serial", "--crf-workers", "0")  # in-process: same masks
    assert res.exit_code == 1
    for key in ("a", "sub/b"):
        serial = np.array(Image.open(tmp_path / "serial" / f"{key}.png"))
        assert np.array_equal(serial, np.array(Image.open(out / f"{key}.png")))


def test_crf_runtime_and_torch_backend(tmp_path: Path, scene_files) -> None:
    from deeplab_cli.refine import crf_runtime

    assert crf_runtime("pydensecrf", "auto") == ("pydensecrf", "cpu")
    assert crf_runtime("auto", "cpu") == ("torch", "cpu")
    assert crf_runtime("auto", "cpu", in_pool=True) == ("torch", "cpu")
    assert crf_runtime("torch", "cpu") == ("torch", "cpu")
    image, probs, gt = scene_files
    res = run("refine", image, probs, "-o", tmp_path / "t.png", "--crf-backend", "torch", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert miou(np.array(Image.open(tmp_path / "t.png")), gt) > 0.97
