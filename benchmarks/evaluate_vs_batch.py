"""`deeplab evaluate` streams through `deeplab batch`'s pipeline: is it as fast? Wall seconds side by side.

Builds a VOC-layout dataset of N photos of mixed sizes (scikit-image's samples, random block labels) and a
random-weight LargeFOV model (speed does not depend on the weights' values), then runs, interleaved:
`deeplab batch` over JPEGImages/ (writing masks), `deeplab evaluate --crf on` and `--crf both`, and
`--crf off` next to `batch --no-crf`. Reports medians over the repeats and the evaluate / batch ratios.

    python benchmarks/evaluate_vs_batch.py [--images 12] [--repeats 3] [--scale 0.5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from deeplab_cli.io import write_mask
from deeplab_cli.model import DeepLab
from deeplab_cli.weightfiles.formats import save_weights

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def make_dataset(root: Path, count: int, scale: float) -> None:
    from skimage import data

    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    keys = []
    for i in range(count):
        photo = getattr(data, PHOTOS[i % len(PHOTOS)])()
        h, w = photo.shape[:2]
        size = (max(32, int(w * scale * (0.8 + 0.1 * (i % 4)))), max(32, int(h * scale * (0.8 + 0.1 * (i % 4)))))
        image = Image.fromarray(photo).convert("RGB").resize(size, Image.BILINEAR)
        key = f"img_{i:03d}"
        image.save(root / "JPEGImages" / f"{key}.jpg", quality=90)
        label = np.zeros((size[1], size[0]), np.uint8)
        for c in rng.choice(np.arange(1, 21), 3, replace=False):
            y, x = rng.integers(0, size[1] // 2), rng.integers(0, size[0] // 2)
            label[y:y + size[1] // 3, x:x + size[0] // 3] = c
        write_mask(root / "SegmentationClass" / f"{key}.png", label)
        keys.append(key)
    (root / "ImageSets/Segmentation/val.txt").write_text("".join(k + "\n" for k in keys))


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    done = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=float, default=0.5, help="photo size factor (the samples are ~512 px)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deeplab-evalbench-"))
    try:
        root = work / "VOC"
        make_dataset(root, args.images, args.scale)
        weights = work / "w.safetensors"
        save_weights(DeepLab("largefov").state_dict(), weights, "largefov")
        deeplab = [sys.executable, "-m", "deeplab_cli.cli"]
        common = ["--weights", str(weights), "--device", "cpu", "--no-progress"]
        batch = [*deeplab, "batch", str(root / "JPEGImages"), "-o", str(work / "out"), "--overwrite"]
        runs = {
            "batch (CRF)": lambda: batch + common,
            "evaluate --crf on": lambda: deeplab + ["evaluate", str(root), "--crf", "on"] + common,
            "evaluate --crf both": lambda: deeplab + ["evaluate", str(root), "--crf", "both"] + common,
            "batch --no-crf": lambda: [*batch, "--no-crf"] + common,
            "evaluate --crf off": lambda: deeplab + ["evaluate", str(root), "--crf", "off"] + common,
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, cmd in runs.items():
                times[name].append(timed(cmd()))
        med = {name: statistics.median(v) for name, v in times.items()}
        low = {name: min(v) for name, v in times.items()}
        print(f"{args.images} images, {args.repeats} interleaved runs (wall s, incl. start-up); on a shared machine "
              "other load only adds time, so the minimum is shown too:")
        print(f"  {'':22s} {'median':>7s} {'min':>7s}   runs")
        for name, value in med.items():
            print(f"  {name:22s} {value:7.2f} {low[name]:7.2f}   {' '.join(f'{t:.2f}' for t in times[name])}")
        for a, b in (("evaluate --crf on", "batch (CRF)"), ("evaluate --crf both", "batch (CRF)"),
                     ("evaluate --crf off", "batch --no-crf")):
            print(f"  {a:19s} / {b:14s} = {med[a] / med[b]:.3f} (medians), {low[a] / low[b]:.3f} (minima)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
