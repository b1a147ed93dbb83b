"""How close `deeplab batch`'s pipeline comes to the floor set by its stages' cost.

    python benchmarks/batch_pipeline.py [--weights W] [--images 24] [--repeat 3] [--configs 2x2n10,1x2n10,...]

1. Generates a folder of photos of mixed sizes and formats (scikit-image's sample photos, resized and cropped).
2. Runs the stages one image at a time (a plain loop): read + decode, network, upsample, CRF, encode + write,
   recording each stage's wall seconds and CPU seconds (process CPU time, which counts torch's threads).
3. floor = max(the slowest stage's total, the sum of all stages' CPU seconds ÷ cores): the pipeline cannot
   beat the slowest stage run one image at a time, nor use more than the cores.
4. Runs the `deeplab batch` engine (batch.segment_tree, as the command does, no progress bar, --overwrite)
   over the folder for each configuration (net threads × CRF workers × CRF worker niceness) and reports
   wall seconds, images/s, wall ÷ floor and wall ÷ plain loop, medians over --repeat runs, interleaved.

Without --weights a LargeFOV with seeded random weights is used: the cost per image does not depend on the
weights' values. The CPU is shared: the load average is printed so a noisy run can be recognised.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from deeplab_cli.batch import STAGES, discover_inputs, plan_jobs, segment_tree
from deeplab_cli.crf import dense_crf_pydensecrf
from deeplab_cli.io import decode_image, encode_mask_png, read_bytes, write_bytes
from deeplab_cli.pipeline import Segmenter
from deeplab_cli.testing import random_state_dict
from deeplab_cli.weightfiles.formats import save_weights

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "stereo_motorcycle", "immunohistochemistry", "hubble_deep_field")


def make_folder(root: Path, count: int, sides: tuple[int, int] = (160, 320), seed: int = 0) -> list[tuple[int, int]]:
    """Write `count` photos (random crops resized to sides in [lo, hi] px, JPEG and PNG) into root/a, root/b."""
    from skimage import data

    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(count):
        photo = getattr(data, PHOTOS[i % len(PHOTOS)])()
        photo = (photo[0] if isinstance(photo, tuple) else photo)[..., :3]  # stereo_motorcycle: (left, right, disp)
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        th, tw = int(rng.integers(sides[0], sides[1] + 1)), int(rng.integers(sides[0], sides[1] + 1))
        im = Image.fromarray(np.ascontiguousarray(photo[y:y + ch, x:x + cw])).resize((tw, th), Image.BILINEAR)
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"photo{i:02d}.{'jpg' if i % 3 else 'png'}", **({"quality": 90} if i % 3 else {}))
        sizes.append((th, tw))
    return sizes


def plain_loop(seg: Segmenter, jobs, net_threads: int) -> dict[str, dict[str, float]]:
    """Every stage one image at a time; returns {stage: {"wall": s, "cpu": s}} summed over images."""
    import torch

    from deeplab_cli.transforms import (
        preprocess,
        scores_to_probs,
        to_tensor,
        upsample_scores,
    )

    torch.set_num_threads(net_threads)
    totals = {stage: {"wall": 0.0, "cpu": 0.0} for stage in STAGES}

    def timed(stage, fn, *args):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args)
        totals[stage]["wall"] += time.perf_counter() - w0
        totals[stage]["cpu"] += time.process_time() - c0
        return out

    def network(image):
        size = seg.input_size(*image.shape[:2])
        with torch.inference_mode():
            return seg.scores(preprocess(to_tensor(image, seg.device)[None], size))

    def upsample(scores, image):
        with torch.inference_mode():
            probs = scores_to_probs(upsample_scores(scores, seg.arch)[0], *image.shape[:2])
            return probs.argmax(0).to(torch.uint8).numpy(), probs.numpy()

    for job in jobs:
        image = timed("decode", lambda p: decode_image(read_bytes(p), str(p)), job.path)
        scores = timed("network", network, image)
        _, probs = timed("upsample", upsample, scores, image)
        labels = timed("crf", lambda im, p: dense_crf_pydensecrf(im, p, seg.crf).argmax(0).astype(np.uint8), image, probs)
        timed("write", lambda path, lab: write_bytes(path, encode_mask_png(lab)), job.outputs.mask, labels)
    return totals


def pipeline(seg: Segmenter, jobs, net_threads: int, crf_workers: int, nice: int) -> tuple[float, dict[str, float]]:
    """One `deeplab batch` run (the command's engine); returns wall seconds and per-stage seconds summed."""
    summary = segment_tree(jobs, seg, overwrite=True, net_threads=net_threads,
                           crf_workers=crf_workers, crf_nice=nice)
    assert summary.done == len(jobs) and not summary.failed, summary.failed
    return summary.wall, summary.stage_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None, help="weights file (default: random LargeFOV weights)")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--sides", default="160-320", help="range of image sides in pixels, LO-HI")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration (medians reported)")
    parser.add_argument("--configs", default="2x2n0,2x2n10,2x1n0,1x2n0",
                        help="comma-separated NETxCRFnNICE: torch threads x CRF workers, niceness of the workers")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory(prefix="deeplab-batch-bench-") as tmp:
        tmp = Path(tmp)
        weights = args.weights
        if weights is None:
            weights = tmp / "random.safetensors"
            save_weights(random_state_dict(), weights, "largefov")
        lo, hi = map(int, args.sides.split("-"))
        sizes = make_folder(tmp / "photos", args.images, (lo, hi))
        seg = Segmenter.from_weights(weights, device="cpu")
        jobs = plan_jobs(discover_inputs([tmp / "photos"]), tmp / "masks")
        print(f"{len(jobs)} images, sides {min(min(s) for s in sizes)}–{max(max(s) for s in sizes)} px, "
              f"{cores} cores, load average {os.getloadavg()[0]:.2f}", flush=True)

        plain_loop(seg, jobs[:2], cores)  # warm-up: first calls allocate
        # Warm-up: start the forkserver. Here it imports this script (hence torch) as __mp_main__; under the
        # `deeplab` command it imports only the light cli module, so timing that import would be unfair.
        pipeline(seg, jobs[:2], cores, 1, 0)
        configs = [c for c in args.configs.split(",") if c]
        loops, runs = [], {c: [] for c in configs}
        for r in range(args.repeat):  # interleaved, so a burst of load from elsewhere hits every variant
            w0 = time.perf_counter()
            loops.append((plain_loop(seg, jobs, cores), time.perf_counter() - w0))
            for config in configs:
                net, rest = config.split("x")
                crf, nice = rest.split("n")
                runs[config].append(pipeline(seg, jobs, int(net), int(crf), int(nice)))
            print(f"  round {r + 1}/{args.repeat} done, load average {os.getloadavg()[0]:.2f}", flush=True)

        stage_wall = {s: statistics.median(l[0][s]["wall"] for l in loops) for s in STAGES}
        stage_cpu = {s: statistics.median(l[0][s]["cpu"] for l in loops) for s in STAGES}
        loop_wall = statistics.median(l[1] for l in loops)
        floor = max(max(stage_wall.values()), sum(stage_cpu.values()) / cores)
        print(f"\nplain loop, one image at a time (torch threads {cores}), medians of {args.repeat}:")
        print(f"  {'stage':10} {'wall s':>8} {'CPU s':>8}")
        for s in STAGES:
            print(f"  {s:10} {stage_wall[s]:8.2f} {stage_cpu[s]:8.2f}")
        print(f"  {'sum':10} {sum(stage_wall.values()):8.2f} {sum(stage_cpu.values()):8.2f}")
        print(f"  loop wall {loop_wall:.2f} s ({len(jobs) / loop_wall:.2f} img/s)")
        print(f"  floor = max(slowest stage {max(stage_wall.values()):.2f}, CPU {sum(stage_cpu.values()):.2f} / "
              f"{cores} cores = {sum(stage_cpu.values()) / cores:.2f}) = {floor:.2f} s")
        print(f"\n`deeplab batch` pipeline, medians of {args.repeat} (NETxCRFnNICE = torch threads x CRF workers, nice):")
        best_floor = max(max(min(l[0][s]["wall"] for l in loops) for s in STAGES),
                         min(sum(l[0][s]["cpu"] for s in STAGES) for l in loops) / cores)
        print(f"  {'config':10} {'wall s':>8} {'img/s':>7} {'wall/floor':>11} {'wall/loop':>10}  "
              f"{'net s':>7} {'crf s':>7}  {'best/best floor':>15}  runs (wall s)")
        figures = {}
        for config, results in runs.items():
            wall = statistics.median(w for w, _ in results)
            stages = {s: statistics.median(st.get(s, 0.0) for _, st in results) for s in STAGES}
            best = min(w for w, _ in results)
            figures[config] = {"wall": wall, "images_per_s": len(jobs) / wall, "wall_over_floor": wall / floor,
                               "wall_over_loop": wall / loop_wall, "stage_seconds": stages,
                               "runs": [w for w, _ in results], "best_over_best_floor": best / best_floor}
            print(f"  {config:10} {wall:8.2f} {len(jobs) / wall:7.2f} {wall / floor:11.3f} {wall / loop_wall:10.3f}  "
                  f"{stages['network']:7.2f} {stages['crf']:7.2f}  {best / best_floor:15.3f}  "
                  f"{' '.join(f'{w:.2f}' for w, _ in results)}")
        print("  net s, crf s: those stages' seconds summed over images inside the pipeline, where they share the cores.")
        print(f"  best/best floor: the fastest run over the floor from the least disturbed loop figures ({best_floor:.2f} s);")
        print("  other users of the machine only ever slow a run down, so the minimum is the least noisy estimate.")
        if args.json:
            print(json.dumps({"images": len(jobs), "cores": cores, "stage_wall": stage_wall, "stage_cpu": stage_cpu,
                              "loop_wall": loop_wall, "floor": floor, "pipeline": figures}))


if __name__ == "__main__":
    main()
