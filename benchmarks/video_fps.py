"""Frames per second of `deeplab segment VIDEO` on this machine: decoding alone, and end to end with and without the CRF.

    python benchmarks/video_fps.py [--weights W] [--sizes 320x240,640x360] [--frames 24] [--repeat 3]

1. Generates an mp4v/MP4 clip per size (moving shapes over scikit-image's chelsea, as the tests do).
2. decode: video.FrameReader over every frame (its thread decodes and converts to RGB), frames ÷ seconds.
3. end to end: batch.segment_video into a fresh mask folder (network, CRF in the worker pool, PNG masks
   written), frames ÷ wall seconds, from the first frame asked for to the last mask written (the model is
   loaded once, before; the CRF pool starts inside the timing, as in the command).
Medians over --repeat runs, the configurations interleaved. Without --weights a LargeFOV with seeded random
weights is saved with save_weights and used: the cost per frame does not depend on the weights' values.
The load average is printed: on a shared CPU, compare only figures from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from deeplab_cli.batch import VideoJob, VideoOutputs, segment_video
from deeplab_cli.crf import CRFParams, resolve_backend
from deeplab_cli.pipeline import Segmenter
from deeplab_cli.testing import make_clip, random_model
from deeplab_cli.video import FrameReader, probe_video
from deeplab_cli.weightfiles.formats import build_model, load_weights, save_weights


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def decode_fps(clip: Path) -> float:
    info = probe_video(clip)
    t0 = time.perf_counter()
    with FrameReader(clip, frame_count=info.frame_count) as reader:
        count = sum(1 for _ in reader)
    return count / (time.perf_counter() - t0)


def end_to_end_fps(seg: Segmenter, clip: Path, out: Path, crf_workers: int | None) -> float:
    result = segment_video(seg, VideoJob(clip, VideoOutputs(masks=out)), overwrite=True, handle_sigint=False,
                           crf_workers=crf_workers)
    assert result.ok and result.done == result.total, result.error
    return result.done / result.wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--sizes", default="320x240,640x360", help="WIDTHxHEIGHT list")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--crf-workers", type=int, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from skimage import data

        weights = args.weights
        if weights is None:
            weights = root / "random.safetensors"
            save_weights(random_model().state_dict(), weights, "largefov", {"source": "random (benchmark)"})
        model = build_model(load_weights(weights))
        segs = {
            "no CRF": Segmenter(model, device="cpu", crf=None),
            "CRF": Segmenter(model, device="cpu", crf=CRFParams(), crf_backend=resolve_backend("auto", "cpu", True)),
        }
        clips = {}
        for size in args.sizes.split(","):
            width, height = map(int, size.lower().split("x"))
            clips[size] = make_clip(root / f"clip_{size}.mp4", data.chelsea(), frames=args.frames,
                                    size=(height, width))
        figures: dict[str, list[float]] = {}
        load_before = os.getloadavg()
        for rep in range(args.repeat):
            for size, clip in clips.items():
                figures.setdefault(f"{size} decode", []).append(decode_fps(clip))
                for name, seg in segs.items():
                    fps = end_to_end_fps(seg, clip, root / f"out_{size}_{name}_{rep}", args.crf_workers)
                    figures.setdefault(f"{size} end to end, {name}", []).append(fps)
                    print(f"  run {rep + 1}: {size} {name}: {fps:.2f} frames/s", file=sys.stderr)
        report = {
            "cpu": cpu_model(), "cores": os.cpu_count(), "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "frames": args.frames, "repeat": args.repeat,
            "weights": "random" if args.weights is None else str(args.weights),
            "median_fps": {k: round(statistics.median(v), 3) for k, v in figures.items()},
            "all_fps": {k: [round(x, 3) for x in v] for k, v in figures.items()},
        }
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
