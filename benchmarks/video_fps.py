"""Frames per second of `deeplab segment VIDEO` on this machine, per frame size: decoding alone, and end to end
with and without the CRF (what `deeplab benchmark --video` measures, repeated and interleaved over sizes).

    python benchmarks/video_fps.py [--weights W] [--sizes 320x240,640x360] [--frames 24] [--repeat 3]

1. Generates an mp4v/MP4 clip per size WIDTHxHEIGHT (moving shapes over scikit-image's chelsea, as the tests do).
2. Runs benchmark_video.run_video_benchmark on each clip, --repeat times, the sizes interleaved.
3. Prints medians (and every run) as JSON, with the CPU model and the load average before and after.
Without --weights a LargeFOV with seeded random weights is saved with save_weights and used: the cost per frame
does not depend on the weights' values. On a shared CPU compare only figures from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from deeplab_cli.benchmark import BenchmarkOptions, device_name
from deeplab_cli.benchmark_video import run_video_benchmark
from deeplab_cli.testing import make_clip, random_model
from deeplab_cli.weightfiles.formats import save_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--sizes", default="320x240,640x360", help="WIDTHxHEIGHT list")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch
    from skimage import data

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights = args.weights
        if weights is None:
            weights = root / "random.safetensors"
            save_weights(random_model().state_dict(), weights, "largefov", {"source": "random (benchmark)"})
        clips = {}
        for size in args.sizes.split(","):
            width, height = map(int, size.lower().split("x"))
            clips[size] = make_clip(root / f"clip_{size}.mp4", data.chelsea(), frames=args.frames, size=(height, width))
        opts = BenchmarkOptions(weights=weights, device=args.device)
        figures: dict[str, list[float]] = {}
        load_before = os.getloadavg()
        for rep in range(args.repeat):
            for size, clip in clips.items():
                report = run_video_benchmark(opts, clip, args.frames)
                figures.setdefault(f"{size} decode", []).append(report["decode_fps"])
                for name, run in report["end_to_end"].items():
                    figures.setdefault(f"{size} end to end {name.replace('_', ' ')}", []).append(run["fps"])
                done = ", ".join(f"{k.split(' ', 1)[1]} {v[-1]:.2f}" for k, v in figures.items() if k.startswith(size))
                print(f"  run {rep + 1} {size}: {done}", file=sys.stderr, flush=True)
        print(json.dumps({
            "device": device_name(torch.device(args.device)), "cores": os.cpu_count(),
            "load_average_before": load_before, "load_average_after": os.getloadavg(), "frames": args.frames,
            "repeat": args.repeat, "weights": "random" if args.weights is None else str(args.weights),
            "median_fps": {k: round(statistics.median(v), 3) for k, v in figures.items()},
            "all_fps": figures,
        }, indent=2))


if __name__ == "__main__":
    main()
