"""The working resolution (--max-side): exactness up to it, tiled full-size labels beyond it, bounded memory."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from deeplab_cli.batch import Job, run_batch
from deeplab_cli.cli import main
from deeplab_cli.io import decode_photo, read_photo
from deeplab_cli.pipeline import Segmenter
from deeplab_cli.resolution import downscale, upsample_labels, working_size
from deeplab_cli.weightfiles.formats import build_model, load_weights

FAST = ("--device", "cpu", "--crf-iterations", "3")


def cli(*args: object, env: dict | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def smooth_probs(c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(C, h, w) float32 probabilities with blob-like regions (many label boundaries)."""
    import cv2

    x = np.random.default_rng(seed).random((c, h, w)).astype(np.float32)
    x = np.stack([cv2.GaussianBlur(ch, (0, 0), 2.0) for ch in x]) ** 4
    return x / x.sum(axis=0)


@pytest.fixture(scope="module")
def segmenter(weights_file: Path) -> Segmenter:
    return Segmenter(build_model(load_weights(weights_file)), device="cpu", crf_backend="pydensecrf")


@pytest.fixture(scope="module")
def big_photo(photo: np.ndarray) -> np.ndarray:
    """A 1500×1000 photo: the small sample photo upscaled with fine noise (H, W, 3) uint8."""
    big = np.asarray(Image.fromarray(photo).resize((1500, 1000), Image.BICUBIC), dtype=np.float32)
    big += np.random.default_rng(7).normal(0, 6, big.shape)
    return np.clip(big, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(21, 37, 51, 300, 411), (5, 64, 48, 1000, 777), (3, 9, 9, 9, 9),
                                   (21, 1, 1, 5, 7), (4, 20, 30, 33, 31)])
def test_tiled_upsampled_argmax_equals_torch_bilinear(shape) -> None:
    c, h, w, height, width = shape
    probs = smooth_probs(c, h, w)
    reference = F.interpolate(torch.from_numpy(probs)[None], size=(height, width), mode="bilinear",
                              align_corners=False)[0].argmax(0).numpy()
    for tile in (1 << 22, 997, 1):  # one tile, tiles splitting rows unevenly, one row per tile
        assert (upsample_labels(probs, (height, width), tile_pixels=tile) == reference).mean() >= 0.9999


def test_working_size() -> None:
    assert working_size(375, 500) == (375, 500)  # VOC-sized: untouched
    assert working_size(3000, 4000) == (385, 513) and working_size(8000, 6000) == (513, 385)
    assert working_size(10000, 3) == (513, 1) and working_size(3000, 4000, None) == (3000, 4000)


def test_photo_up_to_max_side_is_exactly_as_before(tmp_path: Path, photo_file: Path, weights_file: Path) -> None:
    outs = []
    for side in ("513", "none", "113"):  # the photo is 113×75: all three run it at full resolution
        out = tmp_path / f"{side}.png"
        res = cli("segment", photo_file, "-o", out, "--weights", weights_file, "--max-side", side, *FAST)
        assert res.exit_code == 0, res.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_large_photo_runs_at_the_working_resolution(segmenter: Segmenter, big_photo: np.ndarray) -> None:
    segmenter.max_side = 257
    result = segmenter.segment(big_photo)
    work = working_size(1000, 1500, 257)
    assert result.labels.shape == (1000, 1500) and result.probs.shape[1:] == work == (171, 257)
    # The straightforward reference: the downscaled photo through the plain pipeline, Q upsampled whole.
    segmenter.max_side = None
    small = segmenter.segment(downscale(big_photo, work))
    q = torch.from_numpy(small.crf_probs)[None]
    reference = F.interpolate(q, size=(1000, 1500), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    assert (result.labels == reference).mean() >= 0.99
    assert np.array_equal(result.crf_probs, small.crf_probs)
    segmenter.max_side = 513


def test_large_jpeg_is_decoded_at_reduced_scale_with_its_full_size(big_photo: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(big_photo).save(buf, "JPEG", quality=92)
    image, full = decode_photo(buf.getvalue(), "big.jpg", max_side=257)
    assert full == (1000, 1500) and image.shape == (250, 375, 3)  # DCT scale 1/4 still covers 171×257
    image, full = decode_photo(buf.getvalue(), "big.jpg")
    assert full == (1000, 1500) and image.shape == (1000, 1500, 3)


def test_large_photo_through_the_cli_keeps_size_and_exif_orientation(tmp_path: Path, big_photo: np.ndarray,
                                                                      weights_file: Path) -> None:
    upright = tmp_path / "upright.png"
    Image.fromarray(big_photo).save(upright)
    # Stored lying on its side with EXIF orientation 6 ("rotate 90° clockwise to display"): displayed upright.
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(big_photo, 1)).save(rotated, quality=95, exif=exif)
    masks = {}
    for src in (upright, rotated):
        out = tmp_path / f"{src.stem}_mask.png"
        overlay = tmp_path / f"{src.stem}_overlay.jpg"
        res = cli("segment", src, "-o", out, "--overlay", overlay, "--weights", weights_file, "--max-side", "257",
                  *FAST)
        assert res.exit_code == 0, res.output
        masks[src.stem] = np.array(Image.open(out))
        assert masks[src.stem].shape == (1000, 1500) and Image.open(overlay).size == (1500, 1000)
    assert (masks["upright"] == masks["rotated"]).mean() >= 0.97  # same scene; JPEG loss aside
    mask_only = tmp_path / "mask_only.png"  # no overlay: the JPEG is decoded at reduced scale
    assert cli("segment", rotated, "-o", mask_only, "--weights", weights_file, "--max-side", "257",
               *FAST).exit_code == 0
    assert (np.array(Image.open(mask_only)) == masks["rotated"]).mean() >= 0.97


def test_save_probs_keeps_the_working_resolution(tmp_path: Path, big_photo: np.ndarray, weights_file: Path) -> None:
    src = tmp_path / "big.png"
    Image.fromarray(big_photo).save(src)
    res = cli("segment", src, "-o", tmp_path / "m.png", "--save-probs", tmp_path / "p.npy", "--weights", weights_file,
              "--max-side", "129", "--no-crf", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "p.npy").shape == (21, 86, 129)
    assert "working resolution 129×86 (the photo is 1500×1000)" in res.stderr


def test_memory_preflight_refuses_in_one_line_and_names_a_max_side_that_fits(tmp_path: Path, big_photo: np.ndarray,
                                                                             weights_file: Path) -> None:
    src = tmp_path / "big.png"
    Image.fromarray(big_photo).save(src)
    out = tmp_path / "m.png"
    env = {"DEEPLAB_MEMORY_LIMIT": "1G"}
    res = cli("segment", src, "-o", out, "--weights", weights_file, "--max-side", "none", *FAST, env=env)
    assert res.exit_code == 1 and not out.exists() and "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"deeplab: error: {src}: needs about ") and "available" in errors[0]
    line = errors[0]
    side = int(line.split("--max-side ")[1].split()[0])
    assert 129 < side < 1500
    res = cli("segment", src, "-o", out, "--weights", weights_file, "--max-side", side, "--no-crf", "--device", "cpu",
              env=env)
    assert res.exit_code == 0, res.output
    assert Image.open(out).size == (1500, 1000)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height (its pixel data is never reached)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_one_line(tmp_path: Path, weights_file: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(20000, 20000))
    res = cli("segment", bomb, "-o", tmp_path / "m.png", "--weights", weights_file)
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.output
    assert f"{bomb}: image too large (20000×20000 = 400 MP; the limit is 300 MP)" in res.stderr
    with pytest.raises(Exception, match="image too large"):
        read_photo(bomb, 513)


def test_out_of_memory_in_a_batch_fails_only_that_image(tmp_path: Path, photo: np.ndarray, segmenter: Segmenter,
                                                        monkeypatch) -> None:
    paths = []
    for name, image in (("a", photo), ("white", np.full_like(photo, 255)), ("b", photo[::-1].copy())):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(image).save(paths[-1])
    real = segmenter.scores

    def scores(x: torch.Tensor) -> torch.Tensor:  # a device that cannot take 2 images, nor the white one
        if x.shape[0] > 1 or x[0].mean() > 100:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(x)

    monkeypatch.setattr(segmenter, "scores", scores)
    results = {r.job.path.stem: r for r in run_batch(segmenter, [Job(p) for p in paths], batch_size=3,
                                                     crf_workers=0, handle_sigint=False)}
    assert results["a"].status == results["b"].status == "done"
    assert results["white"].status == "failed" and "out of memory" in results["white"].error


def test_batch_streams_large_photos_at_the_working_resolution(tmp_path: Path, photo: np.ndarray,
                                                              big_photo: np.ndarray, weights_file: Path) -> None:
    root, out = tmp_path / "photos", tmp_path / "masks"
    root.mkdir()
    Image.fromarray(big_photo).save(root / "big.jpg", quality=92)
    Image.fromarray(np.rot90(big_photo).copy()).save(root / "big_tall.png")
    Image.fromarray(photo).save(root / "small.png")
    common = ("--weights", weights_file, "--max-side", "257", "--crf-backend", "pydensecrf", *FAST)
    res = cli("batch", root, "-o", out, "--overlay", "--crf-workers", "1", "--no-progress", *common)
    assert res.exit_code == 0, res.output
    for name, size in (("big", (1500, 1000)), ("big_tall", (1000, 1500)), ("small", photo.shape[1::-1])):
        assert Image.open(out / f"{name}.png").size == size and Image.open(out / f"{name}.overlay.jpg").size == size
    # The same labels as `deeplab segment` gives that photo (overlay or not, the image is decoded in full).
    single = tmp_path / "single.png"
    assert cli("segment", root / "big.jpg", "-o", single, "--overlay", tmp_path / "o.jpg", *common).exit_code == 0
    assert np.array_equal(np.array(Image.open(single)), np.array(Image.open(out / "big.png")))


def test_batch_bounds_the_bytes_in_flight(tmp_path: Path, big_photo: np.ndarray, segmenter: Segmenter) -> None:
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.roll(big_photo, 37 * i, axis=1)).save(paths[-1])
    segmenter.max_side = 129
    try:
        run = run_batch(segmenter, [Job(p) for p in paths], crf_workers=0, handle_sigint=False, max_bytes=1 << 20)
        results = list(run)
    finally:
        segmenter.max_side = 513
    assert [r.status for r in results] == ["done"] * 4 and all(r.labels.shape == (1000, 1500) for r in results)
    one = 1000 * 1500 * 4 + 86 * 129 * (3 + 12 * 21)  # a single photo's charge, over the 1 MiB limit
    assert run.peak_bytes == one  # so the photos went through one at a time


def test_evaluate_scores_large_photos_at_full_size(tmp_path: Path, big_photo: np.ndarray, weights_file: Path) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    Image.fromarray(big_photo).save(images / "x.jpg", quality=92)
    Image.fromarray(np.zeros(big_photo.shape[:2], np.uint8)).save(labels / "x.png")
    res = cli("evaluate", "--images", images, "--labels", labels, "--crf", "both", "--json", "--no-progress",
              "--weights", weights_file, "--max-side", "257", "--crf-workers", "1", *FAST)
    assert res.exit_code == 0, res.output
    import json

    report = json.loads(res.stdout)
    assert report["problems"] == [] and report["images"]["scored"] == 1
    assert {mode: r["pixels"] for mode, r in report["results"].items()} == {"no_crf": 1_500_000, "crf": 1_500_000}
