"""Phone-sized photos through `deeplab segment`: whole-process wall time and peak RSS, and where the time goes.

    python benchmarks/large_photos.py                      # 0.2, 3, 12 and 48 MP, default options
    python benchmarks/large_photos.py --full-res 0.2,0.5,1  # also --max-side none (memory model calibration)

Each size is a JPEG made from scikit-image's chelsea (upscaled, with noise so it compresses like a photo),
segmented by a fresh `deeplab segment` process (random LargeFOV weights, default options: --max-side 513,
CRF on) `--repeat` times; figures are medians, ratios are to the 500×375 photo measured in the same run.
The stage split is measured in-process with the library's own functions on the same files.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = {0.2: (500, 375), 3: (2000, 1500), 12: (4000, 3000), 48: (8000, 6000)}  # MP → (width, height)


def make_jpeg(path: Path, width: int, height: int) -> None:
    """A photo-like JPEG of width × height (scikit-image's chelsea upscaled, plus grain)."""
    from skimage import data

    base = Image.fromarray(data.chelsea()).resize((width, height), Image.BICUBIC)
    arr = np.asarray(base, dtype=np.int16)
    grain = np.random.default_rng(0).integers(-6, 7, size=(height, 1, 1), dtype=np.int16)
    Image.fromarray(np.clip(arr + grain, 0, 255).astype(np.uint8)).save(path, quality=90)


def run_process(args: list[str]) -> tuple[float, float]:
    """Run a command; (wall seconds, peak RSS in GB of that process alone).

    The peak is the child's own VmHWM, polled from /proc: wait4's ru_maxrss would also count this
    (large) process's memory, which Linux charges to a child at its exec.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    status, peak = Path(f"/proc/{proc.pid}/status"), 0
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{err}")
    return wall, peak / 1e9


def stage_split(path: Path, weights: Path) -> dict[str, float]:
    """Seconds per stage for one photo, with the library's functions (the segment command's path)."""
    from deeplab_cli.io import encode_mask_png, read_photo
    from deeplab_cli.pipeline import Segmenter
    from deeplab_cli.resolution import downscale, upsample_labels

    seg = Segmenter.from_weights(weights, device="cpu")
    t = {}
    t0 = time.perf_counter()
    image, full = read_photo(path, seg.max_side)
    t["decode"] = time.perf_counter() - t0
    work = seg.working_size(*full)
    t0 = time.perf_counter()
    small = downscale(image, work)
    t["resize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    probs = seg.predict_probs(small)
    t["network"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    q = seg.refine(small, probs)
    t["crf"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels = upsample_labels(q, full)
    t["upsample+argmax"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    encode_mask_png(labels)
    t["png encode"] = time.perf_counter() - t0
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.2,3,12,48", help="megapixels, from: 0.2, 3, 12, 48")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--full-res", default="", help="megapixels to also run with --max-side none (e.g. 0.2,0.5,1)")
    parser.add_argument("--no-stages", action="store_true", help="skip the in-process stage split")
    opts = parser.parse_args()

    from deeplab_cli.testing import random_model
    from deeplab_cli.weightfiles.formats import save_weights

    tmp = Path(tempfile.mkdtemp(prefix="deeplab-large-"))
    weights = tmp / "random.safetensors"
    save_weights(random_model("largefov").state_dict(), weights, "largefov")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    deeplab = [sys.executable, "-m", "deeplab_cli.cli", "segment"]

    rows = []
    for mp in (float(s) for s in opts.sizes.split(",")):
        width, height = SIZES[mp]
        photo = tmp / f"{mp:g}mp.jpg"
        make_jpeg(photo, width, height)
        runs = [run_process([*deeplab, str(photo), "-o", str(tmp / "mask.png"), "--weights", str(weights)])
                for _ in range(opts.repeat)]
        wall = statistics.median(r[0] for r in runs)
        rss = max(r[1] for r in runs)
        rows.append((mp, width, height, wall, rss))
        print(f"{mp:>5g} MP {width}×{height}: {wall:6.2f} s (median of {opts.repeat}), peak RSS {rss:.2f} GB",
              flush=True)
        if not opts.no_stages:
            split = stage_split(photo, weights)
            print("        " + ", ".join(f"{k} {v:.2f} s" for k, v in split.items()), flush=True)
    base = next((r[3] for r in rows if r[0] == 0.2), None)
    if base:
        print("ratio to the 500×375 photo: " + ", ".join(f"{r[0]:g} MP {r[3] / base:.2f}×" for r in rows))

    for mp in (float(s) for s in opts.full_res.split(",") if s):
        side = int(round((mp * 1e6 * 4 / 3) ** 0.5))
        width, height = side, side * 3 // 4
        photo = tmp / f"full{mp:g}.jpg"
        make_jpeg(photo, width, height)
        wall, rss = run_process([*deeplab, str(photo), "-o", str(tmp / "mask.png"), "--weights", str(weights),
                                 "--max-side", "none"])
        print(f"--max-side none {width}×{height} ({width * height / 1e6:.2f} MP): {wall:.2f} s, peak RSS {rss:.2f} GB")


if __name__ == "__main__":
    main()
