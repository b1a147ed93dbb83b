"""`deeplab benchmark --video CLIP`: how many frames per second this machine decodes and segments from a video.

    report = run_video_benchmark(BenchmarkOptions(...), "clip.mp4", frames=30)

decode: video.FrameReader alone over the first `frames` selected frames (its thread decodes and converts to
RGB), frames ÷ seconds. end to end: batch.segment_video over the same frames into a temporary mask folder,
exactly as `deeplab segment CLIP -o DIR` runs them (decoding thread, network batches on the device, CRF in
the worker pool, PNG masks written), with the CRF and without it; frames ÷ wall seconds, from the first frame
asked for to the last mask written (the model is loaded before; the CRF workers start inside the timing, as
in the command), and the seconds per frame of each stage (summed over the pipeline's threads and processes,
so they add up to more than the wall time when stages overlap).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .batch import VideoJob, VideoOutputs, segment_video
from .benchmark import BenchmarkOptions, device_name, load_model, make_segmenter
from .crf import resolve_backend
from .errors import DeeplabError
from .pipeline import Segmenter, select_device
from .precision import check_precision
from .stages import BATCH_STAGES
from .video import FrameReader, FrameSelection, TimePoint, probe_video


def run_video_benchmark(opts: BenchmarkOptions, video: str | os.PathLike, frames: int = 30,
                        log: Callable[[str], None] | None = None, **pipeline: Any) -> dict[str, Any]:
    """Decode and end-to-end frames/s of the first `frames` frames of video → a JSON-able report (README).

    opts: the model, device, precision and CRF (its size, iterations and variants do not apply); pipeline:
    run_batch's options (batch_size, crf_workers, net_threads).
    """
    log = log or (lambda message: None)
    opts.validate()
    info = probe_video(video)
    device = select_device(opts.device)
    check_precision(opts.precision, device.type)
    model, weights, model_preset = load_model(opts)
    params = opts.crf_params(model_preset)
    if weights is None:
        log(f"using randomly initialised weights of the real {model.arch.name} architecture "
            "(speed does not depend on weight values)")
    backend = resolve_backend(opts.crf_backend, str(device), in_pool=True)
    selection = FrameSelection(end=TimePoint(frame=frames))
    count = len(selection.resolve(info.fps).indices(info.frame_count) or range(frames))

    t0 = time.perf_counter()
    with FrameReader(video, selection.resolve(info.fps), info.frame_count) as reader:
        decoded = sum(1 for _ in reader)
    decode_seconds = time.perf_counter() - t0
    log(f"decode: {decoded} frames in {decode_seconds:.2f} s")

    runs: dict[str, dict[str, Any] | None] = {}
    seg: Segmenter | None = None
    for name, crf in (("with_crf", params if opts.use_crf else None), ("without_crf", None)):
        if name == "with_crf" and crf is None:
            runs[name] = None
            continue
        seg = make_segmenter(model, device, opts.precision, opts.channels_last, opts, crf=crf, crf_backend=backend)
        with tempfile.TemporaryDirectory(prefix="deeplab-benchmark-") as tmp:
            job = VideoJob(Path(video), VideoOutputs(masks=Path(tmp) / "masks"), selection)
            result = segment_video(seg, job, overwrite=True, info=info, handle_sigint=False, **pipeline)
        if not result.ok or not result.done:
            raise DeeplabError(f"{video}: {result.error or 'no frame was segmented'}")
        runs[name] = {
            "frames": result.done, "seconds": round(result.wall, 3), "fps": round(result.done / result.wall, 3),
            "ms_per_frame": {s: round(1000 * result.timings.get(s, 0.0) / result.done, 2) for s in BATCH_STAGES},
        }
        log(f"end to end {name.replace('_', ' ')}: {result.done} frames in {result.wall:.2f} s")
    work_h, work_w = seg.working_size(info.height, info.width)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "environment": {
            "device": str(device), "device_name": device_name(device), "cpu_count": os.cpu_count(),
            "load_average": [round(x, 2) for x in load] if load else None, "precision": seg.precision,
            "channels_last": opts.channels_last, "arch": model.arch.name, "weights": weights,
            "random_weights": weights is None, "max_side": seg.max_side, "crf_backend": backend if opts.use_crf else None,
            "crf_iterations": params.iterations if opts.use_crf else None, **{k: v for k, v in pipeline.items()},
        },
        "video": {"path": str(video), "frame_count": info.frame_count, "fps": info.fps, "size": [info.width, info.height],
                  "working_size": [work_w, work_h], "codec": info.codec, "rotation": info.rotation, "frames_timed": count},
        "decode_fps": round(decoded / decode_seconds, 2) if decode_seconds > 0 else None,
        "end_to_end": runs,
    }
