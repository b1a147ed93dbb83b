"""Many images through the Segmenter, streamed and resumable (`deeplab batch`; `deeplab evaluate` streams its
dataset through the same engine). One module per job:

- `inputs`: discovery of images (folders, globs, lists), output names, resumability checks (pure);
- `engine`: the streaming pipeline (`run_batch`, `BatchRun`); `results`: `ImageResult` and the written outputs;
- `crf_pool`: the CRF executor (worker processes or one thread), shared with folder `refine`;
- `videos`: a video's frames through the engine, label/overlay videos in frame order, resume (`segment_video`);
- `tree`: what the command does with a planned tree: skip, stream, report, summarise (`segment_tree`);
- `ray_engine`, `ray_stages`, `remote_inputs`: `--engine ray`, the same jobs on Ray Data (`RayRun`: the driver;
  the work in Ray's workers; inputs and outputs named by URL). Imported on demand: Ray is an optional extra.

Library API:

    inputs = discover_inputs(["photos/"])                  # [InputFile(path, key)] in a stable order
    jobs = plan_jobs(inputs, "masks/", overlay=True)       # [Job(path, outputs=OutputPaths(...))]
    todo = [job for job in jobs if not is_complete(job)]   # resumable: finished outputs are skipped
    run = run_batch(segmenter, todo, crf_workers=2)
    for result in run:                                     # ImageResult, in completion order
        print(result.job.path, result.status, result.error, result.timings)
    run.interrupted                                        # True when Ctrl-C (or run.stop()) ended it early
"""

from __future__ import annotations

from ..stages import BATCH_STAGES as STAGES
from .crf_pool import CRFPool, mp_context
from .engine import BatchRun, run_batch
from .results import ImageResult, skipped_result
from .inputs import (
    MASK_SUFFIX,
    OVERLAY_SUFFIX,
    PROBS_SUFFIX,
    InputFile,
    Job,
    OutputPaths,
    VideoJob,
    VideoOutputs,
    check_no_overwrite,
    check_output_dir,
    default_output_dir,
    discover_inputs,
    is_complete,
    output_base_names,
    plan_jobs,
    read_list,
    remove_stale_parts,
)
from .tree import BatchSummary, ReportWriter, exit_on_next_interrupt, interrupts_deferred, segment_tree
from .videos import VideoResult, process_video, segment_video

__all__ = [
    "MASK_SUFFIX", "OVERLAY_SUFFIX", "PROBS_SUFFIX", "STAGES", "BatchRun", "BatchSummary", "CRFPool", "ImageResult",
    "InputFile", "Job", "OutputPaths", "ReportWriter", "VideoJob", "VideoOutputs", "VideoResult", "check_no_overwrite",
    "check_output_dir", "default_output_dir", "discover_inputs", "exit_on_next_interrupt", "interrupts_deferred",
    "is_complete", "mp_context", "output_base_names", "plan_jobs", "process_video", "read_list", "remove_stale_parts",
    "run_batch", "segment_tree", "segment_video", "skipped_result",
]
