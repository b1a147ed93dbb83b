"""Stream many images through the Segmenter with every stage overlapping; resumable, never losing work.

Library API (what `deeplab batch` runs, and what `deeplab evaluate` can stream a dataset through):

    inputs = discover_inputs(["photos/"])                  # [InputFile(path, key)] in a stable order
    jobs = plan_jobs(inputs, "masks/", overlay=True)       # [Job(path, outputs=OutputPaths(...))]
    todo = [job for job in jobs if not is_complete(job)]   # resumable: finished outputs are skipped
    run = run_batch(segmenter, todo, crf_workers=2)
    for result in run:                                     # ImageResult, in completion order
        print(result.job.path, result.status, result.error, result.timings)
    run.interrupted                                        # True when Ctrl-C (or run.stop()) ended it early

A `Job` with `outputs=None` (e.g. `Job(Path("x.jpg"), tag=label_path)`) is computed but writes nothing:
the consumer takes what it needs from the result. `keep_probs=True` keeps the probabilities before the CRF,
`keep_crf_probs=True` those after it, `keep_images=True` the decoded image. One network pass gives both
`labels_before_crf` (argmax of the network's probabilities) and `labels_after_crf` (argmax after the CRF;
None when the Segmenter has no CRF), which is what `evaluate --crf both` needs. `tag` is carried through
untouched (a ground-truth path, a sample id).

Pipeline (each arrow a bounded queue, so memory stays flat however many files there are):
  read + decode on a thread pool → group images of one padded size into batches of `batch_size`
  → network + 8× upsampling + softmax on the segmenter's device (one thread; torch.set_num_threads(net_threads))
  → CRF on a pool of worker processes, each single-threaded (pydensecrf holds the GIL; the torch backend
    runs there with one thread on the CPU; 'forkserver' or 'spawn' processes stay clear of torch's
    threads; on a GPU machine they run at a lower priority, `crf_nice`, so the thread feeding the device
    is never kept waiting for a core) or, for the torch CRF backend on CUDA, on one thread on the device
  → encode + atomic write on a thread pool → the consumer.
Per-image seconds per stage land in `ImageResult.timings` (STAGES). A batch's network and upsampling time
is shared equally among its images.

Interrupts: while a run is iterated in the main thread, the first SIGINT stops feeding new images, the
images already past decoding are finished (and written), then the iteration ends with `interrupted` set
(`run.stop()` does the same from code; `run.close()` or leaving the loop ends it without marking it
interrupted). A second SIGINT drops the work in flight, lets only the network call under way finish,
and raises KeyboardInterrupt. Outputs are written to a temporary name and renamed (the mask last), so
even a SIGKILL leaves no truncated file; `remove_stale_parts` clears the temporary files it may leave.
CRF workers ignore SIGINT (the parent decides) and exit when the parent dies. A worker that dies (OOM
killer) fails the images it held; a fresh pool takes the rest.

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
import json
import multiprocessing
import os
import queue
import re
import signal
import sys
import threading
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

from .crf import CRFParams, dense_crf, dense_crf_pydensecrf
from .errors import DeeplabError, UsageError
from .io import (
    IMAGE_EXTENSIONS,
    STDIO,
    atomic_path,
    decode_image,
    encode_mask_png,
    is_image_path,
    overlay_image,
    read_bytes,
    write_bytes,
    write_image,
    write_probs,
)

if TYPE_CHECKING:

    from .pipeline import Segmenter

STAGES: tuple[str, ...] = ("decode", "network", "upsample", "crf", "write")  # keys of ImageResult.timings
MASK_SUFFIX, OVERLAY_SUFFIX, PROBS_SUFFIX = ".png", ".overlay.jpg", ".probs.npy"
_GLOB_MAGIC = re.compile(r"[*?[]")
# atomic_path's temporary names: tempfile.mkstemp(prefix=".NAME.", suffix=".part") adds 8 random characters.
_PART_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.part$")


# ---------------------------------------------------------------------------------------------
# Inputs and output names


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


def _walk(folder: Path, recursive: bool, exclude: Path | None) -> Iterator[Path]:
    """Image files below folder in sorted order, skipping hidden names and the excluded (output) folder."""
    excluded = os.path.abspath(exclude) if exclude is not None else None
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.abspath(os.path.join(dirpath, d)) != excluded) if recursive else []
        for name in sorted(filenames):
            if not name.startswith(".") and is_image_path(name):
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
) -> list[InputFile]:
    """Expand folders (walked, recursively by default), globs and files (plus --from-list entries) into images.

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
        if is_image_path(path):
            found.append(InputFile(path, key if key is not None else _key_for_file(path)))
        elif explicit:
            warn(f"{path}: ignored (not an image by its extension: {', '.join(sorted(IMAGE_EXTENSIONS))})")

    for source in sources:
        text = os.fspath(source)
        path = Path(text)
        if path.is_dir():
            for file in _walk(path, recursive, exclude_path):
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
                for file in _walk(path, recursive, exclude_path):
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

    def paths(self) -> list[Path]:
        return [p for p in (self.mask, self.overlay, self.probs) if p is not None]


@dataclass(frozen=True)
class Job:
    """One image to segment: where to read it, where to write (None: write nothing), and caller data."""

    path: Path
    outputs: OutputPaths | None = None
    tag: Any = None


def plan_jobs(
    inputs: Sequence[InputFile], output_dir: str | os.PathLike, overlay: bool = False, save_probs: bool = False
) -> list[Job]:
    """Map inputs to output paths mirroring their keys under output_dir, with collision-free names.

    Raises UsageError when two different inputs would write the same file (same key from two sources)
    or when an output would overwrite an input.
    """
    out = Path(output_dir)
    by_folder: dict[PurePath, list[InputFile]] = defaultdict(list)
    for item in inputs:
        by_folder[item.key.parent].append(item)
    planned: dict[PurePath, OutputPaths] = {}
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
            planned[item.key] = OutputPaths(
                Path(f"{base}{MASK_SUFFIX}"),
                Path(f"{base}{OVERLAY_SUFFIX}") if overlay else None,
                Path(f"{base}{PROBS_SUFFIX}") if save_probs else None,
            )
    jobs = [Job(item.path, planned[item.key]) for item in inputs]
    check_no_overwrite(jobs)
    return jobs


def check_no_overwrite(jobs: Sequence[Job]) -> None:
    """Raise UsageError when any job's output path is another (or its own) input path."""
    sources = {os.path.normcase(os.path.abspath(job.path)): job.path for job in jobs}
    for job in jobs:
        for path in job.outputs.paths() if job.outputs else ():
            hit = sources.get(os.path.normcase(os.path.abspath(path)))
            if hit is not None:
                raise UsageError(f"{path}: refusing to overwrite the input image {hit}; choose another -o folder")


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


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(eq=False)
class ImageResult:
    """One image's outcome. status: 'done', 'failed' or 'skipped'; arrays are None unless asked for (keep_*).

    labels_before_crf / labels_after_crf: (H, W) uint8; image: (H, W, 3) uint8; probs (before the CRF) and
    crf_probs (after): (C, H, W) float32; timings: seconds per stage (STAGES) spent on this image.
    """

    job: Job
    status: str
    error: str | None = None
    shape: tuple[int, int] | None = None
    labels_before_crf: np.ndarray | None = None
    labels_after_crf: np.ndarray | None = None
    image: np.ndarray | None = None
    probs: np.ndarray | None = None
    crf_probs: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray | None:
        """The final labels: after the CRF when there was one, else the network's argmax."""
        return self.labels_after_crf if self.labels_after_crf is not None else self.labels_before_crf

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def report_record(self) -> dict[str, Any]:
        """The --report line: path, output, status, error, timings (seconds), plus size and extra outputs."""
        outputs = self.job.outputs
        record: dict[str, Any] = {
            "path": str(self.job.path),
            "output": str(outputs.mask) if outputs else None,
            "status": self.status,
            "error": self.error,
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
        }
        if self.shape is not None:
            record["size"] = [self.shape[1], self.shape[0]]  # width, height as image tools print them
        if outputs and outputs.overlay:
            record["overlay"] = str(outputs.overlay)
        if outputs and outputs.probs:
            record["probs"] = str(outputs.probs)
        return record


def skipped_result(job: Job) -> ImageResult:
    """The result recorded for a job whose outputs are already complete."""
    return ImageResult(job, "skipped")


def _error_text(exc: BaseException, path: Path) -> str:
    """An exception as a one-line reason, without the path prefix our own errors carry."""
    text = str(exc) or type(exc).__name__
    prefix = f"{path}: "
    text = text.removeprefix(prefix)
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# Work done in CRF worker processes (module-level and torch-free, so a spawned worker imports little)


def _crf_worker_init(nice: int, lifeline: Any) -> None:
    """Worker set-up: leave Ctrl-C to the parent (it finishes the work in flight), lower the priority, and
    exit when the parent dies: `lifeline` is the read end of a pipe only the parent writes to, so it reads
    EOF then. (A SIGKILLed parent never tells its pool, and a forkserver outlives it while its workers
    live, so neither the pool nor the parent pid would tell the worker to go.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice > 0 and hasattr(os, "nice"):
        with contextlib.suppress(OSError):
            os.nice(nice)

    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                lifeline.recv_bytes()
        os._exit(1)

    threading.Thread(target=watch, name="deeplab-orphan-watch", daemon=True).start()


def _crf_noop() -> None:
    """Submitted once per worker at start-up so the processes exist before the first CRF is due."""


def _crf_task(image: np.ndarray, probs: np.ndarray, params: CRFParams, keep_probs: bool, backend: str = "pydensecrf"
              ) -> tuple[np.ndarray, np.ndarray | None, float]:
    """The CRF in a worker: image (H, W, 3) uint8, probs (C, H, W) → (labels (H, W) uint8, Q or None, seconds)."""
    t0 = time.perf_counter()
    if backend == "pydensecrf":
        q = dense_crf_pydensecrf(image, probs, params)
    else:
        import torch  # imported by the worker on its first torch task only

        torch.set_num_threads(1)  # one core per worker: the pool, not torch's threads, uses the cores
        q = dense_crf(image, probs, params, backend="torch", device="cpu")
    labels = q.argmax(axis=0).astype(np.uint8)
    return labels, (q if keep_probs else None), time.perf_counter() - t0


def mp_context() -> multiprocessing.context.BaseContext:
    """'forkserver' where available (no fork of a process running torch threads), else 'spawn'."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass(eq=False)
class _Item:
    job: Job
    image: np.ndarray | None = None
    size: tuple[int, int] = (0, 0)  # padded network input (H', W')
    probs: np.ndarray | None = None
    labels_before_crf: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)


class _Message:
    """What the stages send the consumer: a result (holding a slot or not), a crash, or the end."""

    def __init__(self, result: ImageResult | None = None, slot: bool = False, crash: BaseException | None = None):
        self.result, self.slot, self.crash = result, slot, crash


_END = object()


class _Aborted(Exception):
    """Raised between stages once a run is aborted, so the images in flight are dropped."""


class BatchRun:
    """An iterable run of the pipeline over jobs; iterate once to get ImageResults as they finish (see run_batch)."""

    def __init__(
        self,
        segmenter: Segmenter,
        jobs: Iterable[Job],
        batch_size: int | None = None,
        crf_workers: int | None = None,
        decode_workers: int | None = None,
        write_workers: int = 2,
        net_threads: int | None = None,
        crf_nice: int | None = None,
        keep_images: bool = False,
        keep_probs: bool = False,
        keep_crf_probs: bool = False,
        handle_sigint: bool = True,
        on_interrupt: Callable[[], None] | None = None,
    ) -> None:
        cores = os.cpu_count() or 1
        self.segmenter = segmenter
        self._jobs = jobs
        self.batch_size = batch_size or (1 if segmenter.device.type == "cpu" else 8)
        self.crf_workers = cores if crf_workers is None else crf_workers
        self.decode_workers = decode_workers or min(4, cores)
        self.write_workers = max(1, write_workers)
        self.net_threads = net_threads
        # On the CPU the network and the CRF share the cores, and equal priority measured best
        # (benchmarks/batch_pipeline.py); on a GPU the thread feeding the device must win the CPU at once.
        self.crf_nice = crf_nice if crf_nice is not None else (0 if segmenter.device.type == "cpu" else 10)
        self.keep_images, self.keep_probs, self.keep_crf_probs = keep_images, keep_probs, keep_crf_probs
        self.handle_sigint = handle_sigint
        self.on_interrupt = on_interrupt
        if self.batch_size < 1 or self.crf_workers < 0 or self.decode_workers < 1:
            raise UsageError("batch size and worker counts must be positive (--crf-workers 0: CRF in this process)")
        self.interrupted = False
        self.wall = 0.0  # seconds from the first result asked for to the end
        self._started = False
        self._generator: Iterator[ImageResult] | None = None
        self._aborting = False
        self._stop = threading.Event()
        self._results: queue.Queue = queue.Queue()
        self._decoded: queue.Queue = queue.Queue(maxsize=max(2 * self.decode_workers, 2 * self.batch_size))
        max_inflight = 2 * max(self.crf_workers, 1) + self.write_workers + self.batch_size
        self._slots = threading.Semaphore(max_inflight)  # images between the network and the consumer
        self._pending = 0
        self._pending_cv = threading.Condition()
        self._pool_lock = threading.Lock()
        self._crf_pool: Executor | None = None
        self._crf_in_process = False
        self._lifeline: tuple[Any, Any] | None = None

    # -- control

    def stop(self) -> None:
        """Stop feeding new images; those past decoding are finished, then the iteration ends."""
        self.interrupted = True
        self._stop.set()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop.is_set():  # a second Ctrl-C aborts at once
            self._abort()
            raise KeyboardInterrupt
        self.stop()
        if self.on_interrupt:
            self.on_interrupt()

    def _abort(self) -> None:
        """Drop the work in flight too: only the network call under way is let finish (torch must not be
        inside a call when the interpreter exits)."""
        self._aborting = True
        self._stop.set()
        with self._pending_cv:
            self._pending_cv.notify_all()

    def close(self) -> None:
        """End an iteration early: in-flight images are finished and written, no new ones start."""
        if self._generator is not None:
            self._generator.close()

    # -- the consumer side

    def __iter__(self) -> Iterator[ImageResult]:
        if self._started:
            raise RuntimeError("a BatchRun can be iterated only once")
        self._started = True
        self._generator = self._generate()
        return self._generator

    def _generate(self) -> Iterator[ImageResult]:
        t0 = time.perf_counter()
        install = self.handle_sigint and threading.current_thread() is threading.main_thread()
        if install:
            self._previous_sigint = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)
        self._decode_pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="deeplab-decode")
        self._write_pool = ThreadPoolExecutor(self.write_workers, thread_name_prefix="deeplab-write")
        self._start_crf_pool()
        feeder = threading.Thread(target=self._guard(self._feed), name="deeplab-feed", daemon=True)
        device = threading.Thread(target=self._guard(self._device_loop), name="deeplab-device", daemon=True)
        feeder.start()
        device.start()
        clean = False
        try:
            while True:
                message = self._results.get()
                if message is _END:
                    break
                if message.slot:
                    self._slots.release()
                if message.crash is not None:
                    raise message.crash
                yield message.result
            clean = True
        except KeyboardInterrupt:
            self._abort()
            raise
        finally:
            self.wall = time.perf_counter() - t0
            if not clean:
                self._stop.set()
            aborting = self._aborting
            feeder.join()
            device.join()
            self._decode_pool.shutdown(wait=not aborting, cancel_futures=True)
            self._write_pool.shutdown(wait=not aborting, cancel_futures=aborting)
            if self._crf_pool is not None:
                self._crf_pool.shutdown(wait=not aborting, cancel_futures=True)
            if self._lifeline is not None:
                for end in self._lifeline:
                    end.close()  # workers still running (only when aborting) exit now
            if install:
                with contextlib.suppress(ValueError, TypeError):
                    if signal.getsignal(signal.SIGINT) == self._on_sigint:
                        signal.signal(signal.SIGINT, self._previous_sigint)

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        """Run a stage thread; a bug in it reaches the consumer as an exception instead of a hang."""

        def run() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer's thread
                self._stop.set()
                self._results.put(_Message(crash=exc))
                if target == self._device_loop:
                    self._wait_pending()
                    self._results.put(_END)

        return run

    # -- stage 1: read + decode (thread pool), fed in job order through a bounded queue

    def _feed(self) -> None:
        for job in self._jobs:
            if self._stop.is_set():
                break
            future = self._decode_pool.submit(self._decode, job)
            if not self._put(self._decoded, (job, future)):
                future.cancel()
                break
        self._put(self._decoded, _END, force=True)

    def _put(self, q: queue.Queue, item: Any, force: bool = False) -> bool:
        """Put with back-pressure; gives up (False) once stopped unless forced."""
        while True:
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                if self._stop.is_set() and not force:
                    return False
                if force and self._stop.is_set():
                    with contextlib.suppress(queue.Empty):
                        entry = q.get_nowait()  # stopped: the device side discards queued work anyway
                        if entry is not _END:
                            entry[1].cancel()

    def _decode(self, job: Job) -> _Item:
        t0 = time.perf_counter()
        image = decode_image(read_bytes(job.path), str(job.path))
        item = _Item(job, image, self.segmenter.input_size(*image.shape[:2]))
        item.timings["decode"] = time.perf_counter() - t0
        return item

    # -- stage 2: batching + network + upsampling on the device (one thread)

    def _device_loop(self) -> None:
        import torch

        previous_threads = torch.get_num_threads()
        if self.net_threads:
            torch.set_num_threads(self.net_threads)
        buckets: OrderedDict[tuple[int, int], list[_Item]] = OrderedDict()
        try:
            while not self._stop.is_set():
                if buckets and not self._next_ready():
                    self._run_network(buckets.popitem(last=False)[1])  # don't let the device idle waiting
                    continue
                try:
                    entry = self._decoded.get(timeout=0.1)
                except queue.Empty:
                    continue
                if entry is _END:
                    while buckets and not self._stop.is_set():
                        self._run_network(buckets.popitem(last=False)[1])
                    break
                job, future = entry
                try:
                    item = future.result()
                except Exception as exc:  # noqa: BLE001 - any decode failure is this image's failure
                    self._results.put(_Message(ImageResult(job, "failed", _error_text(exc, job.path))))
                    continue
                bucket = buckets.setdefault(item.size, [])
                bucket.append(item)
                if len(bucket) >= self.batch_size:
                    del buckets[item.size]
                    self._run_network(bucket)
                elif sum(map(len, buckets.values())) >= 2 * self.batch_size:
                    self._run_network(buckets.popitem(last=False)[1])
            # Stopped: work not yet on the device is dropped (it is not in flight); the rest finishes.
            with contextlib.suppress(queue.Empty):
                while True:
                    entry = self._decoded.get_nowait()
                    if entry is not _END:
                        entry[1].cancel()
        finally:
            torch.set_num_threads(previous_threads)
        self._wait_pending()
        self._results.put(_END)

    def _next_ready(self) -> bool:
        """True when the next decoded image is ready to be taken (so batching can wait for it)."""
        with self._decoded.mutex:
            if not self._decoded.queue:
                return False
            head = self._decoded.queue[0]
        return head is not _END and head[1].done()

    def _acquire_slot(self) -> bool:
        """Wait for room downstream (back-pressure); False once stopped, as no new image starts then."""
        while not self._slots.acquire(timeout=0.1):
            if self._stop.is_set():
                return False
        return True

    def _run_network(self, items: list[_Item]) -> None:
        held = 0
        for _ in items:
            if not self._acquire_slot():
                break
            held += 1
        if held < len(items):  # only happens once stopped: these images were never started
            for _ in range(held):
                self._slots.release()
            return
        try:
            self._network(items)
            if self._aborting:
                raise _Aborted
        except _Aborted:
            for _ in items:
                self._slots.release()
            return
        except Exception as exc:  # noqa: BLE001
            if len(items) > 1:  # e.g. out of memory: retry one by one so only the culprit fails
                for _ in items:
                    self._slots.release()
                for item in items:
                    self._run_network([item])
                return
            self._add_pending(1)
            self._emit(items[0], ImageResult(items[0].job, "failed", f"network failed: {_error_text(exc, items[0].job.path)}",
                                             shape=items[0].image.shape[:2]))
            return
        for item in items:
            self._add_pending(1)
            self._submit_crf(item)

    def _network(self, items: list[_Item]) -> None:
        import torch

        seg = self.segmenter
        sync = torch.cuda.synchronize if seg.device.type == "cuda" else (lambda *a: None)
        needs_probs = seg.crf is not None or self.keep_probs or any(i.job.outputs and i.job.outputs.probs for i in items)
        with torch.inference_mode():
            t0 = time.perf_counter()
            scores = seg.scores(seg.prepare([item.image for item in items], items[0].size))
            sync(seg.device)
            t1 = time.perf_counter()
            all_probs = seg.probs_from_scores(scores, [item.image.shape[:2] for item in items])
            for item, probs in zip(items, all_probs):
                item.labels_before_crf = probs.argmax(0).to(torch.uint8).cpu().numpy()
                item.probs = probs.cpu().numpy() if needs_probs else None
            sync(seg.device)
            t2 = time.perf_counter()
        n = len(items)
        for item in items:
            item.timings["network"] = (t1 - t0) / n
            item.timings["upsample"] = (t2 - t1) / n

    # -- stage 3: CRF (process pool, or one thread on the device for the torch backend)

    @property
    def _crf_on_device(self) -> bool:
        seg = self.segmenter
        return seg.crf is not None and seg.crf_backend == "torch" and seg.device.type == "cuda"

    def _start_crf_pool(self) -> None:
        seg = self.segmenter
        if seg.crf is None:
            return
        if self._crf_on_device or self.crf_workers == 0:
            self._crf_in_process = True
            self._crf_pool = ThreadPoolExecutor(1, thread_name_prefix="deeplab-crf")
            return
        self._crf_in_process = False
        ctx = mp_context()
        if self._lifeline is None:
            self._lifeline = ctx.Pipe(duplex=False)  # (read end for the workers, write end held here)
        pool = ProcessPoolExecutor(self.crf_workers, mp_context=ctx, initializer=_crf_worker_init,
                                   initargs=(self.crf_nice, self._lifeline[0]))
        for _ in range(self.crf_workers):
            pool.submit(_crf_noop)  # start the workers now, while the first images decode
        self._crf_pool = pool

    def _submit_crf(self, item: _Item) -> None:
        seg = self.segmenter
        if seg.crf is None:
            self._write_pool.submit(self._finish, item, None)
            return
        for _ in range(2):
            with self._pool_lock:
                if self._crf_pool is None:  # the previous pool broke (a worker died): start a fresh one
                    self._start_crf_pool()
                pool = self._crf_pool
            try:
                if self._crf_in_process:
                    future = pool.submit(self._crf_here, item)
                else:
                    future = pool.submit(_crf_task, item.image, item.probs, seg.crf, self.keep_crf_probs,
                                         seg.crf_backend)
            except BrokenProcessPool:
                self._forget_pool(pool)
                continue
            future.add_done_callback(lambda f, item=item, pool=pool: self._to_writer(item, f, pool))
            return
        self._emit(item, ImageResult(item.job, "failed", "CRF worker processes cannot be started",
                                     shape=item.image.shape[:2]))

    def _to_writer(self, item: _Item, crf: Future, pool: Executor) -> None:
        """CRF done (in the pool's thread): hand the image to the writers, unless the run was aborted."""
        if self._aborting:
            return
        with contextlib.suppress(RuntimeError):  # the writers shut down: only after an abort
            self._write_pool.submit(self._finish, item, crf, pool)

    def _forget_pool(self, pool: Executor | None) -> None:
        """Drop a broken CRF pool so the next submission starts a fresh one."""
        with self._pool_lock:
            if self._crf_pool is pool:
                self._crf_pool = None
                if pool is not None:
                    pool.shutdown(wait=False, cancel_futures=True)

    def _crf_here(self, item: _Item) -> tuple[np.ndarray, np.ndarray | None, float]:
        t0 = time.perf_counter()
        q = self.segmenter.refine(item.image, item.probs)
        return q.argmax(axis=0).astype(np.uint8), (q if self.keep_crf_probs else None), time.perf_counter() - t0

    # -- stage 4: encode + write (thread pool), then hand the result to the consumer

    def _finish(self, item: _Item, crf: Future | None, pool: Executor | None = None) -> None:
        job = item.job
        result = ImageResult(job, "done", shape=item.image.shape[:2], labels_before_crf=item.labels_before_crf,
                             timings=item.timings)
        try:
            if crf is not None:
                try:
                    labels, q, seconds = crf.result()
                except BrokenProcessPool:
                    self._forget_pool(pool)
                    raise DeeplabError("a CRF worker process died (killed, or out of memory?)") from None
                result.labels_after_crf, result.crf_probs = labels, q
                item.timings["crf"] = seconds
            probs = item.probs if isinstance(item.probs, np.ndarray) else None
            t0 = time.perf_counter()
            if job.outputs is not None:
                self._write_outputs(job.outputs, item.image, result.labels, probs)
            item.timings["write"] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - a failure of this image only
            result.status, result.error = "failed", _error_text(exc, job.path)
            result.labels_after_crf = result.crf_probs = None
        if self.keep_images:
            result.image = item.image
        if self.keep_probs and result.ok:
            result.probs = probs
        self._emit(item, result)

    @staticmethod
    def _write_outputs(outputs: OutputPaths, image: np.ndarray, labels: np.ndarray, probs: np.ndarray | None) -> None:
        if outputs.probs is not None:
            write_probs(outputs.probs, probs)
        if outputs.overlay is not None:
            write_image(outputs.overlay, overlay_image(image, labels))
        write_bytes(outputs.mask, encode_mask_png(labels))  # the mask last: it marks the image as complete

    def _emit(self, item: _Item, result: ImageResult) -> None:
        item.image = item.probs = None
        self._results.put(_Message(result, slot=True))
        self._add_pending(-1)

    def _add_pending(self, n: int) -> None:
        with self._pending_cv:
            self._pending += n
            self._pending_cv.notify_all()

    def _wait_pending(self) -> None:
        with self._pending_cv:
            self._pending_cv.wait_for(lambda: self._pending <= 0 or self._aborting)


def run_batch(segmenter: Segmenter, jobs: Iterable[Job], **options: Any) -> BatchRun:
    """Stream jobs through decode → network → upsample → CRF → write; iterate the returned run for ImageResults.

    Options (all keyword): batch_size (images of one padded size per network call; default 1 on CPU, 8 on
    CUDA), crf_workers (CRF processes for the pydensecrf backend, default the core count; 0 runs it on one
    thread here; the torch backend always runs on one thread), decode_workers (default min(4, cores)),
    write_workers (2), net_threads (torch.set_num_threads while running, restored after; None leaves
    torch's setting), crf_nice (added to the CRF workers' niceness; 0 on CPU, 10 on CUDA), keep_images / keep_probs /
    keep_crf_probs (keep those arrays in the results), handle_sigint (first Ctrl-C stops gracefully,
    True; only in the main thread), on_interrupt (called from the signal handler). Results arrive in
    completion order; failures are results with status 'failed' and a one-line error, never exceptions.
    jobs may be a lazy iterable; at most a few batches' worth of images are decoded ahead.
    """
    return BatchRun(segmenter, jobs, **options)


# ---------------------------------------------------------------------------------------------
# The `deeplab batch` command's engine: progress, report, summary


@dataclass
class BatchSummary:
    """Counts, failures (path, reason), per-stage seconds summed over images, and wall seconds."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    wall: float = 0.0
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        """130 when interrupted, 1 when any image failed, else 0."""
        return 130 if self.interrupted else (1 if self.failed else 0)

    def add(self, result: ImageResult) -> None:
        if result.status == "done":
            self.done += 1
        elif result.status == "skipped":
            self.skipped += 1
        else:
            self.failed.append((str(result.job.path), result.error or "failed"))
        for stage, seconds in result.timings.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds


class _Report:
    """--report FILE: one JSON line per input, written to a temporary name and renamed at the end."""

    def __init__(self, path: str | None) -> None:
        self._stack = contextlib.ExitStack()
        self._file = None
        if path:
            tmp = self._stack.enter_context(atomic_path(path))
            self._file = self._stack.enter_context(open(tmp, "w", encoding="utf-8", errors="backslashreplace"))

    def write(self, result: ImageResult) -> None:
        if self._file is not None:
            self._file.write(json.dumps(result.report_record(), ensure_ascii=False) + "\n")

    def close(self) -> None:
        with _interrupts_deferred():  # a Ctrl-C now would delete the temporary file instead of renaming it
            self._stack.close()  # kept even after an abort: it is the record of what was done


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold back SIGINT for the block, then deliver it to the previous handler (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, None)


def segment_tree(
    jobs: Sequence[Job],
    segmenter: Segmenter | Callable[[], Segmenter] | None,
    overwrite: bool = False,
    report: str | None = None,
    console: Any = None,
    progress: bool = True,
    engine: Callable[[list[Job], Callable[[], None]], Any] | None = None,
    **options: Any,
) -> BatchSummary:
    """Run `deeplab batch` over planned jobs: skip complete ones, stream the rest, show progress, write the report.

    segmenter may be a callable building it, so a run with nothing to do never loads the model. engine, when
    given, replaces run_batch: engine(jobs to do, on_interrupt) → an iterable of ImageResult with `wall` and
    `interrupted` (e.g. ray_engine.RayRun); segmenter and options are then unused.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    summary = BatchSummary(total=len(jobs))
    todo: list[Job] = []
    skipped: list[Job] = []
    for job in jobs:
        (skipped if not overwrite and is_complete(job) else todo).append(job)
    folders = {job.outputs.mask.parent for job in todo if job.outputs}
    remove_stale_parts(folders)
    out = _Report(report)
    try:
        for job in skipped:
            result = skipped_result(job)
            summary.add(result)
            out.write(result)
        if todo:
            if engine is None:
                seg = segmenter() if callable(segmenter) else segmenter
                engine = lambda jobs, on_interrupt: run_batch(seg, jobs, on_interrupt=on_interrupt, **options)  # noqa: E731
            _stream(engine, todo, summary, out, console, progress)
    finally:
        out.close()
    return summary


def _stream(engine: Callable[[list[Job], Callable[[], None]], Any], todo: list[Job], summary: BatchSummary,
            out: _Report, console: Any, progress: bool) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    def interrupted() -> None:
        console.print("[yellow]interrupted: finishing the images in flight (Ctrl-C again to abort)[/]")

    run = engine(todo, interrupted)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
               TextColumn("{task.fields[failures]}"))
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("segmenting", total=len(todo), rate="", failures="")
        t0 = time.perf_counter()
        count = 0
        with contextlib.closing(run):
            for result in run:
                count += 1
                summary.add(result)
                out.write(result)
                elapsed = time.perf_counter() - t0
                bar.update(task, advance=1, rate=f"{count / elapsed:.2f} img/s" if elapsed > 0 else "",
                           failures=f"[red]{len(summary.failed)} failed[/]" if summary.failed else "")
    summary.wall = run.wall
    summary.interrupted = run.interrupted


def exit_on_next_interrupt(code: int = 130) -> None:
    """From now on a Ctrl-C ends the process at once with `code`: for a command whose run is over, so an
    interrupt during interpreter shutdown gives no traceback (unfinished writes leave only temporary files)."""

    def handler(signum: int, frame: Any) -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)


def print_summary(summary: BatchSummary, console: Any = None, max_failures: int = 20) -> None:
    """The summary on stderr: images done / skipped / failed, seconds per stage, wall time, rate, failures."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console(stderr=True)
    table = Table(title="deeplab batch", title_justify="left", header_style="bold")
    table.add_column("")
    table.add_column("images / seconds", justify="right")
    table.add_column("seconds per image", justify="right")
    table.add_row("done", str(summary.done), "")
    table.add_row("skipped", str(summary.skipped), "")
    table.add_row("failed", str(len(summary.failed)), "", style="red" if summary.failed else None)
    if summary.interrupted:
        started = summary.done + len(summary.failed) + summary.skipped
        table.add_row("not started (interrupted)", str(summary.total - started), "", style="yellow")
    table.add_section()
    n = summary.done or None
    for stage in STAGES:
        seconds = summary.stage_seconds.get(stage, 0.0)
        table.add_row(f"{stage} (sum over images)", f"{seconds:.2f}", f"{seconds / n:.3f}" if n else "")
    table.add_section()
    table.add_row("wall", f"{summary.wall:.2f}", f"{summary.wall / n:.3f}" if n else "")
    table.add_row("images/s", f"{summary.done / summary.wall:.2f}" if n and summary.wall > 0 else "-", "")
    console.print(table)
    for path, reason in summary.failed[:max_failures]:
        console.print(Text(f"failed: {path}: {reason}", style="red"), soft_wrap=True)
    if len(summary.failed) > max_failures:
        console.print(f"… and {len(summary.failed) - max_failures} more failures (see --report)")
