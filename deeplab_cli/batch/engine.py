"""The streaming engine: many images through the Segmenter with every stage overlapping; resumable, never
losing work.

    run = run_batch(segmenter, jobs, crf_workers=2)        # jobs: batch.inputs.Job
    for result in run:                                     # ImageResult, in completion order
        print(result.job.path, result.status, result.error, result.timings)
    run.interrupted                                        # True when Ctrl-C (or run.stop()) ended it early

A `Job` with `outputs=None` (e.g. `Job(Path("x.jpg"), tag=label_path)`) is computed but writes nothing:
the consumer takes what it needs from the result. `keep_probs=True` keeps the probabilities before the CRF,
`keep_crf_probs=True` those after it, `keep_images=True` the decoded image. One network pass gives both
`labels_before_crf` (argmax of the network's probabilities) and `labels_after_crf` (argmax after the CRF;
None when the Segmenter has no CRF or `use_crf=False`), which is what `evaluate --crf both` needs. `tag` is
carried through untouched (a ground-truth path, a sample id).

Pipeline (each arrow a bounded queue, so memory stays flat however many files there are):
  read + decode on a thread pool → group images of one padded size into batches of `batch_size`
  → network + 8× upsampling + softmax on the segmenter's device (one thread; torch.set_num_threads(net_threads))
  → CRF on batch.crf_pool.CRFPool: worker processes (each single-threaded; on a GPU machine at a lower
    priority, `crf_nice`, so the thread feeding the device is never kept waiting for a core) or, for the torch
    CRF backend on CUDA, one thread on the device
  → encode + atomic write on a thread pool → the consumer.
At most a fixed number of images are past the network and not yet taken by the consumer (`flow.InFlight`), and
the bytes of all images between the feeder and the consumer stay under `max_bytes` (`flow.ByteBudget`, charged
from each file's header before it is decoded), so a folder of 48 MP photos streams in flat memory.
Working resolution (Segmenter.max_side): a photo larger than it is decoded at a reduced JPEG scale where
possible and downscaled for the network and the CRF (the `decode` stage); its labels come back at full size
in the CRF workers (the `crf` stage), or on the device thread without a CRF (`upsample`).
Per-image seconds per stage land in `ImageResult.timings` (stages.BATCH_STAGES). A batch's network and
upsampling time is shared equally among its images.

Interrupts: while a run is iterated in the main thread, the first SIGINT stops feeding new images, the
images already past decoding are finished (and written), then the iteration ends with `interrupted` set
(`run.stop()` does the same from code; `run.close()` or leaving the loop ends it without marking it
interrupted). A second SIGINT drops the work in flight, lets only the network call under way finish,
and raises KeyboardInterrupt. Outputs are written to a temporary name and renamed (the mask last), so
even a SIGKILL leaves no truncated file; `batch.inputs.remove_stale_parts` clears the temporary files it
may leave. A CRF worker that dies (OOM killer) fails the images it held; a fresh pool takes the rest.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DeeplabError, UsageError
from ..io import decode_photo, photo_size, read_bytes
from ..memory import available_bytes
from ..resolution import downscale, upsample_labels
from .crf_pool import CRFPool, crf_task
from .flow import NOTHING, ByteBudget, InFlight, Lookahead
from .inputs import Job
from .results import ImageResult, error_text, write_outputs

if TYPE_CHECKING:
    from ..pipeline import Segmenter


@dataclass(eq=False)
class _Item:
    job: Job
    image: np.ndarray | None = None  # at the working resolution (h, w, 3)
    size: tuple[int, int] = (0, 0)  # padded network input (H', W')
    full: tuple[int, int] = (0, 0)  # the photo's size (H, W), which the labels get
    full_image: np.ndarray | None = None  # (H, W, 3) when an overlay or keep_images needs it and (H, W) ≠ (h, w)
    charge: int = 0  # bytes held in the run's _ByteBudget
    probs: np.ndarray | None = None
    labels_before_crf: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def picture(self) -> np.ndarray:
        """The photo at full size (what overlays and keep_images show)."""
        return self.full_image if self.full_image is not None else self.image


class _Message:
    """What the stages send the consumer: a result (holding a slot or not), a crash, or the end."""

    def __init__(self, result: ImageResult | None = None, slot: bool = False, crash: BaseException | None = None):
        self.result, self.slot, self.crash = result, slot, crash


_END = object()  # the last message of a stage


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
        use_crf: bool = True,
        keep_labels_before_crf: bool = False,
        max_bytes: int | None = None,
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
        self.crf = segmenter.crf if use_crf else None  # the CRF parameters this run applies (None: no CRF)
        # Full-size labels before the CRF cost an upsampling per large photo: made only where they are used.
        self.full_labels_before_crf = self.crf is None or keep_labels_before_crf
        self._budget = ByteBudget(max_bytes or max(256 << 20, min(2 << 30, available_bytes() // 4)))
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
        self._in_flight = InFlight(2 * max(self.crf_workers, 1) + self.write_workers + self.batch_size)
        crf_on_device = self.crf is not None and segmenter.crf_backend == "torch" and segmenter.device.type == "cuda"
        self._crf_pool = CRFPool(self.crf_workers, self.crf_nice, in_process=crf_on_device)

    # -- control

    @property
    def stopping(self) -> bool:
        """True once stop(), a Ctrl-C or an abort asked the run to end (a lazy jobs iterable may stop waiting)."""
        return self._stop.is_set()

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
        self._in_flight.wake()

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
        if self.crf is not None:
            self._crf_pool.start()  # the workers start while the first images decode
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
                    self._in_flight.release()
                if message.crash is not None:
                    raise message.crash
                yield message.result
            clean = True
        except KeyboardInterrupt:
            self._abort()
            raise
        finally:
            self.wall = time.perf_counter() - t0
            if install:  # from here a Ctrl-C must not raise inside the pools' shutdown (their finalizers)
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(signal.SIGINT, self._on_sigint_while_closing)
            if not clean:
                self._stop.set()
            aborting = self._aborting
            feeder.join()
            device.join()
            self._decode_pool.shutdown(wait=not aborting, cancel_futures=True)
            self._write_pool.shutdown(wait=not aborting, cancel_futures=aborting)
            self._crf_pool.shutdown(wait=not aborting)
            if install:
                with contextlib.suppress(ValueError, TypeError):
                    if signal.getsignal(signal.SIGINT) in (self._on_sigint, self._on_sigint_while_closing):
                        signal.signal(signal.SIGINT, self._previous_sigint)

    def _on_sigint_while_closing(self, signum: int, frame: Any) -> None:
        """A Ctrl-C while the run closes: nothing new starts any more, so it only marks the run interrupted."""
        self.interrupted = True
        self._abort()

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        """Run a stage thread; a bug in it reaches the consumer as an exception instead of a hang."""

        def run() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer's thread
                self._stop.set()
                self._results.put(_Message(crash=exc))
                if target == self._device_loop:
                    self._in_flight.wait_idle(lambda: self._aborting)
                    self._results.put(_END)

        return run

    # -- stage 1: read + decode (thread pool), fed in job order through a bounded queue

    def _feed(self) -> None:
        for job in self._jobs:
            if self._stop.is_set():
                break
            charge = self._charge(job)
            if not self._budget.acquire(charge, self._stop):
                break
            future = self._decode_pool.submit(self._decode, job, charge)
            if not self._put(self._decoded, (job, future, charge)):
                future.cancel()
                self._budget.release(charge)
                break
        self._put(self._decoded, _END, force=True)

    def _charge(self, job: Job) -> int:
        """Bytes an image holds at most while in flight, from its header: the decoded photo, the working-size
        image and class maps, the full-size labels and overlay."""
        size = job.image.shape[:2] if job.image is not None else photo_size(job.path)
        if size is None:
            return 1 << 20  # unreadable: it fails at decoding
        seg = self.segmenter
        full = size[0] * size[1]
        h, w = seg.working_size(*size)
        overlay = job.outputs is not None and job.outputs.overlay is not None
        return full * (3 + 1 + (3 if overlay else 0)) + h * w * (3 + 3 * 4 * seg.num_classes)

    def _drop(self, entry: Any) -> None:
        """A queued entry that will not run (stopped): cancel its decoding and give back its bytes."""
        if entry is not _END:
            entry[1].cancel()
            self._budget.release(entry[2])

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
                        self._drop(q.get_nowait())  # stopped: the device side discards queued work anyway

    def _decode(self, job: Job, charge: int = 0) -> _Item:
        t0 = time.perf_counter()
        seg = self.segmenter
        wants_full = self.keep_images or (job.outputs is not None and job.outputs.overlay is not None)
        if job.image is not None:  # decoded already (a video frame)
            image, full = job.image, job.image.shape[:2]
        else:
            image, full = decode_photo(read_bytes(job.path), str(job.path), None if wants_full else seg.max_side)
        seg.check_memory(*full)
        work = seg.working_size(*full)
        small = downscale(image, work)
        item = _Item(job, small, seg.input_size(*work), full, image if wants_full and work != full else None, charge)
        item.timings["decode"] = time.perf_counter() - t0
        return item

    # -- stage 2: batching + network + upsampling on the device (one thread)

    def _device_loop(self) -> None:
        import torch

        previous_threads = torch.get_num_threads()
        if self.net_threads:
            torch.set_num_threads(self.net_threads)
        buckets: OrderedDict[tuple[int, int], list[_Item]] = OrderedDict()
        decoded = Lookahead(self._decoded)
        try:
            while not self._stop.is_set():
                if buckets and not self._ready(decoded.peek()):
                    self._run_network(buckets.popitem(last=False)[1])  # don't let the device idle waiting
                    continue
                try:
                    entry = decoded.get(timeout=0.1)
                except queue.Empty:
                    continue
                if entry is _END:
                    while buckets and not self._stop.is_set():
                        self._run_network(buckets.popitem(last=False)[1])
                    break
                job, future, charge = entry
                try:
                    item = future.result()
                except Exception as exc:  # noqa: BLE001 - any decode failure is this image's failure
                    self._budget.release(charge)
                    self._results.put(_Message(ImageResult(job, "failed", error_text(exc, job.path))))
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
                    self._drop(decoded.get(timeout=0))
            for bucket in buckets.values():
                self._budget.release(sum(item.charge for item in bucket))
        finally:
            torch.set_num_threads(previous_threads)
        self._in_flight.wait_idle(lambda: self._aborting)
        self._results.put(_END)

    @staticmethod
    def _ready(entry: Any) -> bool:
        """True when a queue entry is a decoded image ready to be taken (so batching can wait for it)."""
        return entry is not NOTHING and entry is not _END and entry[1].done()

    def _run_network(self, items: list[_Item]) -> None:
        if not self._in_flight.reserve(len(items), self._stop):
            self._budget.release(sum(item.charge for item in items))
            return  # only happens once stopped: these images were never started
        try:
            self._network(items)
            if self._aborting:
                raise _Aborted
        except _Aborted:
            self._in_flight.release(len(items))
            self._budget.release(sum(item.charge for item in items))
            return
        except Exception as exc:  # noqa: BLE001
            _free_device_memory(exc)
            if len(items) > 1:  # e.g. out of memory: retry one by one so only the culprit fails
                self._in_flight.release(len(items))
                for item in items:
                    self._run_network([item])
                return
            self._in_flight.begin()
            self._emit(items[0], ImageResult(items[0].job, "failed", f"network failed: {error_text(exc, items[0].job.path)}",
                                             shape=items[0].full))
            return
        for item in items:
            self._in_flight.begin()
            self._submit_crf(item)

    def _network(self, items: list[_Item]) -> None:
        import torch

        seg = self.segmenter
        sync = torch.cuda.synchronize if seg.device.type == "cuda" else (lambda *a: None)
        needs_probs = self.crf is not None or self.keep_probs or any(i.job.outputs and i.job.outputs.probs for i in items)
        with torch.inference_mode():
            t0 = time.perf_counter()
            scores = seg.scores(seg.prepare([item.image for item in items], items[0].size))
            sync(seg.device)
            t1 = time.perf_counter()
            all_probs = seg.probs_from_scores(scores, [item.image.shape[:2] for item in items])
            for item, probs in zip(items, all_probs):
                if item.full == item.image.shape[:2]:
                    item.labels_before_crf = probs.argmax(0).to(torch.uint8).cpu().numpy()
                    item.probs = probs.cpu().numpy() if needs_probs else None
                else:  # a photo at a working resolution: its labels at full size, in tiles on the host
                    item.probs = probs.cpu().numpy()
                    if self.full_labels_before_crf:
                        item.labels_before_crf = upsample_labels(item.probs, item.full)
            sync(seg.device)
            t2 = time.perf_counter()
        n = len(items)
        for item in items:
            item.timings["network"] = (t1 - t0) / n
            item.timings["upsample"] = (t2 - t1) / n

    # -- stage 3: CRF (worker processes, or one thread on the device for the torch backend on CUDA)

    def _submit_crf(self, item: _Item) -> None:
        if self.crf is None:
            self._write_pool.submit(self._finish, item, None)
            return
        try:
            if self._crf_pool.in_process:
                future = self._crf_pool.submit(self._crf_here, item)
            else:
                future = self._crf_pool.submit(crf_task, item.image, item.probs, self.crf, self.keep_crf_probs,
                                               self.segmenter.crf_backend, item.full)
        except DeeplabError as exc:
            self._emit(item, ImageResult(item.job, "failed", str(exc), shape=item.full))
            return
        future.add_done_callback(lambda f, item=item: self._to_writer(item, f))

    def _to_writer(self, item: _Item, crf: Future) -> None:
        """CRF done (in the pool's thread): hand the image to the writers, unless the run was aborted."""
        if self._aborting:
            return
        with contextlib.suppress(RuntimeError):  # the writers shut down: only after an abort
            self._write_pool.submit(self._finish, item, crf)

    def _crf_here(self, item: _Item) -> tuple[np.ndarray, np.ndarray | None, float]:
        t0 = time.perf_counter()
        q = self.segmenter.refine(item.image, item.probs)
        return upsample_labels(q, item.full), (q if self.keep_crf_probs else None), time.perf_counter() - t0

    # -- stage 4: encode + write (thread pool), then hand the result to the consumer

    def _finish(self, item: _Item, crf: Future | None) -> None:
        job = item.job
        result = ImageResult(job, "done", shape=item.full, labels_before_crf=item.labels_before_crf,
                             timings=item.timings)
        try:
            if crf is not None:
                labels, q, seconds = self._crf_pool.result(crf)
                result.labels_after_crf, result.crf_probs = labels, q
                item.timings["crf"] = seconds
            probs = item.probs if isinstance(item.probs, np.ndarray) else None
            t0 = time.perf_counter()
            if job.outputs is not None:
                write_outputs(job.outputs, item.picture, result.labels, probs, self.segmenter.class_names)
            item.timings["write"] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - a failure of this image only
            result.status, result.error = "failed", error_text(exc, job.path)
            result.labels_after_crf = result.crf_probs = None
        if self.keep_images:
            result.image = item.picture
        if self.keep_probs and result.ok:
            result.probs = probs
        self._emit(item, result)

    def _emit(self, item: _Item, result: ImageResult) -> None:
        item.image = item.full_image = item.probs = None
        self._budget.release(item.charge)
        self._results.put(_Message(result, slot=True))
        self._in_flight.end()

    @property
    def peak_bytes(self) -> int:
        """The most bytes of images in flight at once (estimated from their headers), for tests and diagnostics."""
        return self._budget.peak


def _free_device_memory(exc: BaseException) -> None:
    """After a CUDA out-of-memory error, give the cached blocks back so the retry image by image can fit."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_batch(segmenter: Segmenter, jobs: Iterable[Job], **options: Any) -> BatchRun:
    """Stream jobs through decode → network → upsample → CRF → write; iterate the returned run for ImageResults.

    Options (all keyword): batch_size (images of one padded size per network call; default 1 on CPU, 8 on
    CUDA), crf_workers (CRF processes for the pydensecrf backend, default the core count; 0 runs it on one
    thread here; the torch backend always runs on one thread), decode_workers (default min(4, cores)),
    write_workers (2), net_threads (torch.set_num_threads while running, restored after; None leaves
    torch's setting), crf_nice (added to the CRF workers' niceness; 0 on CPU, 10 on CUDA), keep_images / keep_probs /
    keep_crf_probs (keep those arrays in the results), handle_sigint (first Ctrl-C stops gracefully,
    True; only in the main thread), on_interrupt (called from the signal handler), use_crf (False: skip the
    segmenter's CRF), keep_labels_before_crf (full-size labels_before_crf of photos at a working resolution
    even when the CRF runs; always made when it does not), max_bytes (bound on the bytes of images in flight;
    default a quarter of the available memory, between 256 MiB and 2 GiB). Results arrive in completion order;
    failures are results with status 'failed' and a one-line error, never exceptions. jobs may be lazy.
    """
    return BatchRun(segmenter, jobs, **options)
