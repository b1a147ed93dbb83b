"""`deeplab segment` end to end through the real CLI, and every bad input giving one clear line."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli
from PIL import Image

from deeplab_cli.palette import colorize
from deeplab_cli.pipeline import Segmenter
from deeplab_cli.testing import random_state_dict
from deeplab_cli.weightfiles.formats import save_weights


run = cli


def test_segment_writes_palette_mask_overlay_and_probs(tmp_path: Path, photo_file: Path, photo, weights_file) -> None:
    out, overlay, probs = tmp_path / "mask.png", tmp_path / "overlay.jpg", tmp_path / "probs.npy"
    res = run("segment", photo_file, "-o", out, "--weights", weights_file, "--overlay", overlay, "--save-probs", probs,
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "cpu" in res.stderr and res.stdout == ""
    mask = Image.open(out)
    assert mask.mode == "P" and mask.size == (photo.shape[1], photo.shape[0])
    labels = np.array(mask)
    assert np.array_equal(np.array(mask.convert("RGB")), colorize(labels))
    p = np.load(probs)
    assert p.shape == (21, *photo.shape[:2]) and p.dtype == np.float32
    assert np.allclose(p.sum(0), 1.0, atol=1e-5)
    assert Image.open(overlay).size == mask.size
    assert sorted(x.name for x in tmp_path.iterdir()) == ["mask.png", "overlay.jpg", "photo.jpg", "probs.npy"]


def test_segment_matches_library_and_crf_changes_result(tmp_path: Path, photo_file: Path, weights_file) -> None:
    seg = Segmenter.from_weights(weights_file, device="cpu")
    rgb = np.array(Image.open(photo_file).convert("RGB"))
    result = seg.segment(rgb)
    run("segment", photo_file, "-o", tmp_path / "a.png", "--weights", weights_file)
    assert np.array_equal(np.array(Image.open(tmp_path / "a.png")), result.labels)
    res = run("segment", photo_file, "-o", tmp_path / "b.png", "--weights", weights_file, "--no-crf")
    assert res.exit_code == 0
    assert np.array_equal(np.array(Image.open(tmp_path / "b.png")), result.probs.argmax(0))


def test_stdin_to_stdout(photo_file: Path, weights_file) -> None:
    res = run("segment", "-", "-o", "-", "--weights", weights_file, "--no-crf", input=photo_file.read_bytes())
    assert res.exit_code == 0
    mask = Image.open(io.BytesIO(res.stdout_bytes))
    assert mask.mode == "P" and mask.size == Image.open(photo_file).size


def test_weights_from_environment(tmp_path: Path, photo_file: Path, weights_file) -> None:
    res = run("segment", photo_file, "-o", tmp_path / "m.png", "--no-crf", env={"DEEPLAB_WEIGHTS": str(weights_file)})
    assert res.exit_code == 0, res.output


def test_exif_rotated_photo_gives_mask_as_displayed(tmp_path: Path, photo, weights_file) -> None:
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90° counter-clockwise to display
    Image.fromarray(photo).save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert run("segment", tmp_path / "r.jpg", "-o", tmp_path / "m.png", "--weights", weights_file,
               "--no-crf").exit_code == 0
    assert Image.open(tmp_path / "m.png").size == (photo.shape[0], photo.shape[1])


def test_other_class_count_and_names(tmp_path: Path, photo_file: Path) -> None:
    weights = tmp_path / "three.safetensors"
    save_weights(random_state_dict("largefov", num_classes=3), weights, "largefov")
    (tmp_path / "names.txt").write_text("sky\nroad\ncar\n")
    res = run("segment", photo_file, "-o", tmp_path / "m.png", "--weights", weights, "--classes", tmp_path / "names.txt")
    assert res.exit_code == 0, res.output
    assert set(np.unique(np.array(Image.open(tmp_path / "m.png")))) <= {0, 1, 2}
    res = run("segment", photo_file, "-o", tmp_path / "n.png", "--weights", weights_file_for_bad := weights,
              "--classes", tmp_path / "missing.txt")
    assert res.exit_code == 1 and "missing.txt" in res.stderr and weights_file_for_bad.exists()


def _bad_inputs(tmp_path: Path, photo_file: Path, weights_file: Path) -> dict[str, tuple[list, int, str]]:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    data = photo_file.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 3])
    wrong = tmp_path / "wrong.safetensors"
    sd = random_state_dict("largefov")
    sd["fc7.weight"] = sd["fc7.weight"][:, :512].contiguous()
    from safetensors.torch import save_file

    save_file(sd, str(wrong))
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 100)
    w = ["--weights", weights_file]
    return {
        "missing image": ([tmp_path / "nope.jpg", *w], 2, "nope.jpg: no such file"),
        "zero bytes": ([tmp_path / "empty.png", *w], 1, "empty.png: empty file"),
        "not an image": ([tmp_path / "text.jpg", *w], 1, "text.jpg: not an image"),
        "truncated": ([tmp_path / "trunc.jpg", *w], 1, "trunc.jpg: cannot decode"),
        "missing weights": ([photo_file, "--weights", tmp_path / "none.safetensors"], 2, "none.safetensors: weights file not found"),
        "wrong shapes": ([photo_file, "--weights", wrong], 1, "fc7.weight is [1024, 512, 1, 1], expected [1024, 1024, 1, 1]"),
        "wrong arch": ([photo_file, *w, "--arch", "deeplab"], 1, "does not fit the deeplab architecture"),
        "not weights": ([photo_file, "--weights", tmp_path / "junk.pt"], 1, "junk.pt: not a weights file"),
        "bad pad-to": ([photo_file, *w, "--pad-to", "512"], 2, "8k+1"),
        "bad device": ([photo_file, *w, "--device", "tpu"], 2, "device"),
        "bad crf": ([photo_file, *w, "--bi-xy", "0"], 2, "σ"),
    }


@pytest.mark.parametrize("case", ["missing image", "zero bytes", "not an image", "truncated", "missing weights",
                                  "wrong shapes", "wrong arch", "not weights", "bad pad-to", "bad device", "bad crf"])
def test_bad_input_gives_one_line_and_no_output(case: str, tmp_path: Path, photo_file: Path, weights_file) -> None:
    args, code, message = _bad_inputs(tmp_path, photo_file, weights_file)[case]
    out = tmp_path / "out" / "mask.png"
    res = cli("segment", *args, "-o", out)
    assert res.exit_code == code, res.output
    assert message in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))


def test_no_weights_anywhere_says_where_it_looked(tmp_path: Path, photo_file: Path) -> None:
    res = run("segment", photo_file, "-o", tmp_path / "m.png", env={"DEEPLAB_WEIGHTS": "", "DEEPLAB_CACHE": str(tmp_path)})
    assert res.exit_code == 2
    assert "DEEPLAB_WEIGHTS" in res.stderr and str(tmp_path) in res.stderr and "deeplab weights" in res.stderr


def test_refuses_to_overwrite_input(photo_file: Path, weights_file) -> None:
    before = photo_file.read_bytes()
    res = run("segment", photo_file, "-o", photo_file, "--weights", weights_file)
    assert res.exit_code == 2 and photo_file.read_bytes() == before


def test_version_and_help_do_not_import_torch() -> None:
    code = (
        "import sys; from click.testing import CliRunner; from deeplab_cli.cli import main; "
        "r = CliRunner().invoke(main, ['--version']); assert 'deeplab' in r.output, r.output; "
        "r = CliRunner().invoke(main, ['segment', '--help']); assert '--weights' in r.output; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_real_console_script_runs(tmp_path: Path, photo_file: Path, weights_file) -> None:
    proc = subprocess.run(["deeplab", "segment", str(photo_file), "-o", str(tmp_path / "m.png"), "--weights",
                           str(weights_file), "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "m.png").mode == "P"
    assert torch.cuda.is_available() or "on cpu" in proc.stderr
