"""Inputs and output names of a batch run (pure: no image is read here).

    inputs = discover_inputs(["photos/"])                  # [InputFile(path, key)] in a stable order
    jobs = plan_jobs(inputs, "masks/", overlay=True)       # [Job(path, outputs=OutputPaths(...))]
    todo = [job for job in jobs if not is_complete(job)]   # resumable: finished outputs are skipped

With `discover_inputs(..., videos=True)` videos are inputs too, and plan_jobs gives each a `VideoJob`: its
frames' masks in the folder `base/` (`base/000123.png`, see batch.videos) and, with overlay, `base.overlay.mp4`
beside it. A video's base is its stem unless that collides as above, or with a subfolder of inputs of the
same name (`clip.mp4` beside `clip/`: base `clip.mp4`), so a video's folder never mixes with mirrored images.

Output names (plan_jobs): the tree below each input folder (or glob base, or the current directory for
listed files) is mirrored under the output folder. In one folder an input's base is its stem (`x.jpg`
→ `x`), unless another input of that folder has the same stem (`x.png`) or is named exactly that stem
(input `x.jpg.png` has the stem `x.jpg`, which input `x.jpg` is named); such inputs keep their whole
name as base (`x.jpg` → `x.jpg`, `x.png` → `x.png`). Outputs are `base.png` (mask), `base.overlay.jpg` and
`base.probs.npy`: masks always end in `.png`, overlays in `.jpg`, probabilities in `.npy`, and bases are
unique per folder, so no two outputs ever share a name. The rule depends only on the set of inputs
given in that folder, so the same command maps the same files to the same names on every run (a run
over a different selection of the same folder, e.g. `*.jpg` then everything, may choose differently).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..io import IMAGE_EXTENSIONS, STDIO, is_image_path, read_bytes
from ..video import VIDEO_EXTENSIONS, FrameSelection, is_video_path

if TYPE_CHECKING:
    import numpy as np

MASK_SUFFIX, OVERLAY_SUFFIX, PROBS_SUFFIX = ".png", ".overlay.jpg", ".probs.npy"
VIDEO_OVERLAY_SUFFIX = ".overlay.mp4"
_GLOB_MAGIC = re.compile(r"[*?[]")
# atomic_path's temporary names: tempfile.mkstemp(prefix=".NAME.", suffix=".part") adds 8 random characters.
_PART_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.part(\.[A-Za-z0-9]+)?$")  # keep_suffix: `.part.mp4`


@dataclass(frozen=True)
class InputFile:
    """An input image: the path to read and its key, the relative path mirrored under the output folder."""

    path: Path
    key: PurePath


def _key_for_file(path: Path) -> PurePath:
    """A loose file's key: relative to the current directory when below it, else its absolute path unanchored."""
    absolute = Path(os.path.abspath(path))
    with contextlib.suppress(ValueError):
        return PurePath(absolute.relative_to(Path.cwd()))
    drive = absolute.drive.replace(":", "").strip("\\/")
    return PurePath(*([drive] if drive else []), *absolute.parts[1:])


def _is_input(path: str | os.PathLike, videos: bool) -> bool:
    return is_image_path(path) or (videos and is_video_path(path))


def _walk(folder: Path, recursive: bool, exclude: Path | None, videos: bool = False) -> Iterator[Path]:
    """Image (and video) files below folder in sorted order, skipping hidden names and the excluded (output) folder."""
    excluded = os.path.abspath(exclude) if exclude is not None else None
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.abspath(os.path.join(dirpath, d)) != excluded) if recursive else []
        for name in sorted(filenames):
            if not name.startswith(".") and _is_input(name, videos):
                yield Path(dirpath, name)


def read_list(source: str) -> list[str]:
    """Paths from a list file ('-' for stdin): one per line, or NUL-separated (find -print0); blank lines skipped."""
    try:
        data = read_bytes(source)
    except UsageError:
        raise UsageError(f"--from-list {source}: no such file") from None
    text = os.fsdecode(data)
    entries = text.split("\0") if "\0" in text else text.splitlines()
    return [e for e in (line.rstrip("\r\n") for line in entries) if e.strip()]


def discover_inputs(
    sources: Sequence[str | os.PathLike] = (),
    recursive: bool = True,
    from_list: str | None = None,
    exclude: str | os.PathLike | None = None,
    warn: Callable[[str], None] | None = None,
    videos: bool = False,
) -> list[InputFile]:
    """Expand folders (walked, recursively by default), globs and files (plus --from-list entries) into images
    (and videos, with videos=True).

    Keys: relative to a folder argument, to a glob's fixed leading folders, or (files, list entries) to the
    current directory. Hidden names and `exclude` (the output folder) are skipped in walks; non-image
    extensions are ignored (with a warning when named explicitly). A missing argument or a glob matching
    nothing is a UsageError; a missing list entry stays in the list and fails when read. The same file
    reached twice is kept once.
    """
    warn = warn or (lambda message: None)
    exclude_path = Path(exclude) if exclude is not None else None
    found: list[InputFile] = []

    def add_file(path: Path, key: PurePath | None = None, explicit: bool = False) -> None:
        if _is_input(path, videos):
            found.append(InputFile(path, key if key is not None else _key_for_file(path)))
        elif explicit:
            known = sorted(IMAGE_EXTENSIONS | (VIDEO_EXTENSIONS if videos else frozenset()))
            warn(f"{path}: ignored (not an image{' or a video' if videos else ''} by its extension: {', '.join(known)})")

    for source in sources:
        text = os.fspath(source)
        path = Path(text)
        if path.is_dir():
            for file in _walk(path, recursive, exclude_path, videos):
                found.append(InputFile(file, PurePath(os.path.relpath(file, path))))
        elif path.exists():
            add_file(path, explicit=True)
        elif _GLOB_MAGIC.search(text):
            matches = sorted(m for m in glob.glob(text, recursive=True) if os.path.isfile(m))
            if not matches:
                raise UsageError(f"{text}: no files match this pattern")
            fixed = []
            for part in PurePath(text).parts:
                if _GLOB_MAGIC.search(part):
                    break
                fixed.append(part)
            base = Path(*fixed) if fixed else Path(".")
            for match in matches:
                add_file(Path(match), PurePath(os.path.relpath(match, base)))
        else:
            raise UsageError(f"{text}: no such file or folder")
    if from_list is not None:
        for line in read_list(from_list):
            path = Path(line)
            if path.is_dir():
                for file in _walk(path, recursive, exclude_path, videos):
                    add_file(file)
            else:
                add_file(path, explicit=True)  # missing files fail later, with the others' results

    unique: dict[str, InputFile] = {}
    for item in found:
        unique.setdefault(os.path.normcase(os.path.abspath(item.path)), item)
    return list(unique.values())


def output_base_names(names: Iterable[str]) -> dict[str, str]:
    """File names in one folder → the base of their output names: the stem, or the whole name if shared.

    A name keeps only its stem unless another name has the same stem or another name equals the stem;
    the bases are then unique, so `base + suffix` never collides (see the module docstring).
    """
    names = list(names)
    stems = {name: PurePath(name).stem for name in names}
    counts = Counter(stems.values())
    present = set(names)
    return {name: stem if counts[stem] == 1 and stem not in present else name for name, stem in stems.items()}


@dataclass(frozen=True)
class OutputPaths:
    """Where one image's results go: the mask PNG, and optionally the overlay JPEG and the probabilities .npy."""

    mask: Path
    overlay: Path | None = None
    probs: Path | None = None
    legend: bool = True  # the overlay carries a legend of the classes present

    def paths(self) -> list[Path]:
        return [p for p in (self.mask, self.overlay, self.probs) if p is not None]


@dataclass(frozen=True)
class Job:
    """One image to segment: where to read it, where to write (None: write nothing), and caller data.

    image: the picture already decoded ((H, W, 3) uint8 RGB, e.g. a video frame); path is then only its name.
    """

    path: Path
    outputs: OutputPaths | None = None
    tag: Any = None
    image: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class VideoOutputs:
    """Where one video's results go: a folder of frame masks and/or a lossless label video, and an overlay.

    overlay: a video file (by its extension, see video.OVERLAY_VIDEO_CODECS) or a folder of NNN.jpg frames.
    """

    masks: Path | None = None
    labels: Path | None = None
    overlay: Path | None = None
    legend: bool = True  # the overlay carries a legend of the classes present in each frame

    @property
    def overlay_video(self) -> Path | None:
        """The overlay when it is a video file."""
        return self.overlay if self.overlay is not None and is_video_path(self.overlay) else None

    @property
    def overlay_frames(self) -> Path | None:
        """The overlay when it is a folder of frames."""
        return self.overlay if self.overlay is not None and not is_video_path(self.overlay) else None

    def paths(self) -> list[Path]:
        return [p for p in (self.masks, self.labels, self.overlay) if p is not None]


@dataclass(frozen=True)
class VideoJob:
    """One video to segment: the file, its outputs and which frames (--start / --end / --every)."""

    path: Path
    outputs: VideoOutputs
    selection: FrameSelection = FrameSelection()


def plan_jobs(
    inputs: Sequence[InputFile], output_dir: str | os.PathLike, overlay: bool = False, save_probs: bool = False,
    legend: bool = True, selection: FrameSelection = FrameSelection(),
) -> list[Job | VideoJob]:
    """Map inputs to output paths mirroring their keys under output_dir, with collision-free names.

    Videos become VideoJobs of that frame selection (save_probs does not apply to them). Raises UsageError
    when two different inputs would write the same file (same key from two sources) or when an output would
    overwrite an input.
    """
    out = Path(output_dir)
    by_folder: dict[PurePath, list[InputFile]] = defaultdict(list)
    subfolders: dict[PurePath, set[str]] = defaultdict(set)  # folder → its subfolders holding inputs
    for item in inputs:
        by_folder[item.key.parent].append(item)
        parts = item.key.parent.parts
        for depth in range(len(parts)):
            subfolders[PurePath(*parts[:depth])].add(parts[depth])
    planned: dict[PurePath, OutputPaths | VideoOutputs] = {}
    for folder, items in by_folder.items():
        seen: dict[str, InputFile] = {}
        for item in items:
            if item.key.name in seen:
                raise UsageError(f"{seen[item.key.name].path} and {item.path} would both be written to "
                                 f"{out / item.key}{MASK_SUFFIX}; segment them in separate runs or -o folders")
            seen[item.key.name] = item
        bases = output_base_names(seen)
        for name, item in seen.items():
            base = out / folder / bases[name]
            if is_video_path(name):
                if bases[name] in subfolders[folder]:
                    base = out / folder / name
                planned[item.key] = VideoOutputs(masks=base, overlay=Path(f"{base}{VIDEO_OVERLAY_SUFFIX}") if overlay
                                                 else None, legend=legend)
                continue
            planned[item.key] = OutputPaths(
                Path(f"{base}{MASK_SUFFIX}"),
                Path(f"{base}{OVERLAY_SUFFIX}") if overlay else None,
                Path(f"{base}{PROBS_SUFFIX}") if save_probs else None,
                legend,
            )
    jobs = [VideoJob(item.path, outputs, selection) if isinstance(outputs := planned[item.key], VideoOutputs)
            else Job(item.path, outputs) for item in inputs]
    check_no_overwrite(jobs)
    return jobs


def check_no_overwrite(jobs: Sequence[Job | VideoJob]) -> None:
    """Raise UsageError when any job's output path is another (or its own) input path."""
    sources = {os.path.normcase(os.path.abspath(job.path)): job.path for job in jobs}
    for job in jobs:
        for path in job.outputs.paths() if job.outputs else ():
            hit = sources.get(os.path.normcase(os.path.abspath(path)))
            if hit is not None:
                raise UsageError(f"{path}: refusing to overwrite the input {hit}; choose another -o folder")


def check_output_dir(output_dir: str | os.PathLike, sources: Sequence[str | os.PathLike]) -> None:
    """Raise UsageError when -o is a file, or is itself one of the input folders (masks would become inputs)."""
    out = Path(output_dir)
    if str(output_dir) == STDIO:
        raise UsageError("batch writes one file per image: -o must be a folder, not '-'")
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: exists and is not a folder")
    for source in sources:
        if Path(source).is_dir() and _same_path(source, out):
            raise UsageError(f"-o {out}: is the input folder; the masks would mix with the images (and be read "
                             f"as inputs next time); choose another folder, e.g. {out / 'masks'}")


def default_output_dir(sources: Sequence[str | os.PathLike], from_list: str | None = None) -> Path:
    """The output folder of `deeplab batch FOLDER` without -o: FOLDER_masks beside FOLDER, never inside it.

    Only a single input folder has one; several inputs, globs, images or a list raise a UsageError.
    """
    if len(sources) != 1 or from_list is not None or not Path(sources[0]).is_dir():
        raise UsageError("-o DIR is required with several inputs, a glob, an image or --from-list "
                         "(only a single input folder gets a default: FOLDER_masks beside it)")
    folder = Path(sources[0]).resolve()
    if folder.parent == folder:
        raise UsageError(f"{sources[0]}: is the file system's root; give -o DIR")
    return folder.parent / f"{folder.name}_masks"


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def is_complete(job: Job) -> bool:
    """True when every output of the job exists and is not empty (outputs are only ever renamed in whole)."""
    if job.outputs is None:
        return False
    for path in job.outputs.paths():
        try:
            if path.stat().st_size == 0:
                return False
        except OSError:
            return False
    return True


def remove_stale_parts(folders: Iterable[str | os.PathLike]) -> int:
    """Delete temporary `.NAME.xxxxxxxx.part` files a killed run left in these folders; returns how many."""
    removed = 0
    for folder in set(map(str, folders)):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if _PART_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
    return removed
