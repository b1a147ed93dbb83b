"""Inputs and outputs named by URL (s3://, gs://, hdfs://, file://) for `deeplab batch --engine ray`.

Inputs are found by listing (recursively, hidden names and non-image extensions skipped, as for local
folders) and keyed by their path below the URL given; outputs get the names the local rule gives
(batch.plan_jobs), under the output URL. Paths in the jobs are storage.URL objects, whose str() is the URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePath

from ..errors import UsageError
from ..io import is_image_path
from ..storage import URL, Listing, is_url, join, list_files
from ..video import FrameSelection
from .inputs import InputFile, Job, OutputPaths, VideoJob, check_no_overwrite, plan_jobs

_ROOT = Path("/deeplab-output-root")  # planning happens below a local placeholder, then moves under the URL


def discover_urls(sources: Sequence[str], recursive: bool = True) -> list[InputFile]:
    """Image files below each URL (one file for a URL naming a file), keyed by their path relative to it."""
    found: list[InputFile] = []
    for source in sources:
        matched = 0
        for url, rel, _ in list_files(source):
            if is_image_path(url) and (recursive or len(rel.parts) == 1):
                found.append(InputFile(URL(url), PurePath(rel)))  # type: ignore[arg-type]
                matched += 1
        if not matched:
            raise UsageError(f"{source}: no images found")
    return found


def plan_url_jobs(inputs: Sequence[InputFile], output: str, overlay: bool = False, save_probs: bool = False,
                  legend: bool = True, selection: FrameSelection = FrameSelection()) -> list[Job | VideoJob]:
    """plan_jobs for an output folder that may be a URL: the same names, under the URL (images only there)."""
    if not is_url(output):
        return plan_jobs(inputs, output, overlay=overlay, save_probs=save_probs, legend=legend, selection=selection)

    listing = Listing()  # one snapshot of the output folders for this plan's completeness checks

    def moved(path: Path | None) -> URL | None:
        return URL(join(output, path.relative_to(_ROOT).as_posix()), listing) if path is not None else None

    planned = plan_jobs(inputs, _ROOT, overlay=overlay, save_probs=save_probs, legend=legend)
    for job in planned:
        if isinstance(job, VideoJob):
            raise UsageError(f"{job.path}: videos are written to a local folder; give -o a local folder for them")
    jobs = [Job(job.path, OutputPaths(moved(job.outputs.mask), moved(job.outputs.overlay), moved(job.outputs.probs),
                                      legend)) for job in planned]
    check_no_overwrite(jobs)
    return jobs
