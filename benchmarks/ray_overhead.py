"""What `deeplab batch --engine ray` costs over `--engine local` on one machine, and the per-image CPU cost of its stages.

    python benchmarks/ray_overhead.py [--weights W] [--images 200] [--repeat 2] [--stage-photos 5]

1. Overhead: generates --images small photos (benchmarks/batch_pipeline.make_folder, 64–128 px) and runs the
   whole `deeplab batch` command on them as a fresh process per run, --engine local and --engine ray
   interleaved (--overwrite, no progress bar); reports each engine's median process wall seconds, median
   start-up seconds (process start → first mask on disk: imports, Ray start, model load, first image) and
   the ratio of the medians. The ray runs start a private local Ray with the machine's cores.
2. Stage costs (for sizing a cluster): the work of the Ray engine's CPU tasks on VOC-sized photos (500×375
   JPEG): read + decode, NumPy ×8 upsampling + softmax, pydensecrf (10 iterations, LargeFOV preset),
   labels + mask PNG encode + atomic write; and the network on this CPU for reference. Medians over
   --stage-photos photos, single-threaded (one CRF task = one core), in seconds per image.

Without --weights a LargeFOV with seeded random weights is used (the cost does not depend on the values).
The CPU is shared: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_pipeline import make_folder  # noqa: E402


def run_command(engine: str, photos: Path, out: Path, weights: Path) -> dict[str, float]:
    """One `deeplab batch` process; returns its wall seconds and the seconds until the first mask appeared."""
    cmd = [sys.executable, "-m", "deeplab_cli.cli", "batch", str(photos), "-o", str(out), "--weights", str(weights),
           "--engine", engine, "--overwrite", "--no-progress", "--device", "cpu"]
    first: list[float] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def watch() -> None:
        while proc.poll() is None and not first:
            if out.is_dir() and any(out.rglob("*.png")):
                first.append(time.perf_counter() - t0)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{engine} run failed ({proc.returncode}):\n{err}")
    return {"wall": wall, "startup": first[0] if first else wall}


def overhead(weights: Path, images: int, repeat: int, work: Path) -> dict[str, object]:
    photos = work / "photos"
    make_folder(photos, images, sides=(64, 128))
    runs: dict[str, list[dict[str, float]]] = {"local": [], "ray": []}
    for i in range(repeat):
        for engine in ("local", "ray") if i % 2 == 0 else ("ray", "local"):
            out = work / f"out-{engine}"
            # each run rewrites every mask (--overwrite), so a fresh folder makes no difference but the first mask
            # seen is this run's
            if out.exists():
                for p in out.rglob("*.png"):
                    p.unlink()
            runs[engine].append(run_command(engine, photos, out, weights))
            print(f"  {engine}: {runs[engine][-1]}", file=sys.stderr)
    med = {e: {k: statistics.median(r[k] for r in rs) for k in ("wall", "startup")} for e, rs in runs.items()}
    return {"images": images, "repeat": repeat, "runs": runs, "median": med,
            "wall_ratio_ray_over_local": med["ray"]["wall"] / med["local"]["wall"],
            "steady_ratio_ray_over_local": (med["ray"]["wall"] - med["ray"]["startup"])
            / (med["local"]["wall"] - med["local"]["startup"])}


def stage_costs(weights: Path, count: int, work: Path) -> dict[str, float]:
    import torch
    from PIL import Image
    from skimage import data

    from deeplab_cli.crf import PRESETS
    from deeplab_cli.io import decode_photo, encode_mask_png, read_bytes, write_bytes
    from deeplab_cli.numpy_transforms import probs_from_scores
    from deeplab_cli.pipeline import Segmenter
    from deeplab_cli.batch.ray_stages import refine_pydensecrf
    from deeplab_cli.resolution import upsample_labels

    torch.set_num_threads(1)
    seg = Segmenter.from_weights(weights, device="cpu", crf=None)
    names = ("chelsea", "coffee", "astronaut", "rocket")
    times: dict[str, list[float]] = {k: [] for k in ("decode", "network_1_thread", "upsample_softmax", "crf", "write")}
    for i in range(count):
        photo = getattr(data, names[i % len(names)])()[..., :3]
        path = work / f"voc{i}.jpg"
        Image.fromarray(photo).resize((500, 375), Image.BILINEAR).save(path, quality=90)
        t = time.perf_counter()
        image, size = decode_photo(read_bytes(path), str(path), 513)
        times["decode"].append(time.perf_counter() - t)
        t = time.perf_counter()
        scores = seg.scores(seg.prepare([image], seg.input_size(*image.shape[:2]))).float().numpy()[0]
        times["network_1_thread"].append(time.perf_counter() - t)
        t = time.perf_counter()
        probs = probs_from_scores(scores, *image.shape[:2])
        times["upsample_softmax"].append(time.perf_counter() - t)
        t = time.perf_counter()
        q = refine_pydensecrf(image, probs, PRESETS["largefov"])
        times["crf"].append(time.perf_counter() - t)
        t = time.perf_counter()
        write_bytes(work / f"voc{i}.png", encode_mask_png(upsample_labels(q, size)))
        times["write"].append(time.perf_counter() - t)
        print(f"  photo {i}: {({k: round(v[-1], 3) for k, v in times.items()})}", file=sys.stderr)
    result = {k: statistics.median(v) for k, v in times.items()}
    result["cpu_task_total"] = sum(result[k] for k in ("decode", "upsample_softmax", "crf", "write"))
    result["scores_bytes"] = int(scores.nbytes)
    result["image_bytes"] = int(image.nbytes)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--stage-photos", type=int, default=5)
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        work = Path(tmp)
        weights = args.weights
        if weights is None:
            weights = work / "random.safetensors"
            _write_random_weights(weights)
        import torch

        from deeplab_cli.benchmark import device_name

        report: dict[str, object] = {"cpu": device_name(torch.device("cpu")), "cores": os.cpu_count()}
        report["load_before"] = os.getloadavg()
        if not args.skip_overhead:
            report["overhead"] = overhead(weights, args.images, args.repeat, work)
        report["stage_seconds_per_voc_photo"] = stage_costs(weights, args.stage_photos, work)
        report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


def _write_random_weights(path: Path) -> None:
    """A LargeFOV with seeded random weights (21 classes)."""
    from deeplab_cli.testing import random_model
    from deeplab_cli.weightfiles.formats import save_weights

    save_weights(random_model("largefov", 21, 0).state_dict(), path, "largefov", {"source": "random (benchmark)"})


if __name__ == "__main__":
    main()
