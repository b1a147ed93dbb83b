"""`deeplab batch --engine ray`: the same jobs, results and outputs as the local engine, run on Ray Data.

    run = RayRun(jobs, weights, device="auto", crf=CRFParams())   # weights: weights.load_weights(...)
    for result in run:      # Ray: the one already initialised, else $RAY_ADDRESS, else a private local Ray (stopped after)
        print(result.job.path, result.status, result.error, result.timings)   # ImageResult, in completion order

Pipeline (ray_stages.py): the driver turns the planned jobs into small rows (`ray.data.from_items`: paths
only) → decode on CPU tasks → the network on an actor pool (one actor per GPU, `num_gpus=1`; one actor on
a CPU-only cluster), fc8 scores out → upsampling + softmax + CRF + atomic writes on CPU tasks (torch-free),
only small report columns back to the driver. The stages stay separate operators (decode never runs inside
the model's process: their Ray options differ, so Ray Data does not fuse them). Ray's own progress bars
and logs are off; the caller shows its own.

Faults: a task whose worker dies is retried, a dead actor restarted (Ray); a poison image is failed after
`max_crashes` crashes of its own (ray_stages.AttemptLedger); a block Ray gives up on is dropped
(`max_errored_blocks` unlimited) and each of its images reported failed with the reason 'lost'. An
interrupt (Ctrl-C) stops at once: the work in flight is dropped (outputs are written whole or not at all),
and the rerun resumes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..archs import get_arch
from ..crf import CRFParams, resolve_backend
from ..errors import DeeplabError, UsageError
from ..palette import load_class_names
from ..precision import check_precision
from ..resolution import DEFAULT_MAX_SIDE
from ..stages import BATCH_STAGES
from .results import ImageResult
from .inputs import Job
from .ray_stages import AttemptLedger, NetworkStage, crf_and_write, decode_rows, refine_pydensecrf, refine_torch_cpu

LOST = "lost (its work was dropped by Ray after repeated failures of its worker or node)"
# from_items costs ~1 ms of driver time per block (measured: 1 M rows in 125,000 blocks 159 s, in 15,625 blocks 25 s)
MAX_INPUT_BLOCKS = 2000
DECODE_MEMORY_PER_IMAGE = 64 << 20  # bytes reserved per image of a decode task (a 12 MP photo decodes to 36 MB)
_QUIET_LOGGERS = ("ray", "ray.data", "ray._private", "ray.util")


@dataclass
class RayOptions:
    """How the run uses the cluster. None = the default described per field."""

    address: str | None = None  # a running cluster ('auto', 'ray://…'); default $RAY_ADDRESS, else a private local Ray
    num_cpus: int | None = None  # CPUs of a private local Ray [all cores]
    batch_size: int | None = None  # images per network call [1 on CPU, 8 on CUDA]
    crf_workers: int | None = None  # concurrent CRF tasks [as many as free CPUs]
    net_threads: int | None = None  # torch threads per network actor [the node's core count]
    network_actors: int | None = None  # network actors [one per GPU; 1 without GPUs]
    rows_per_block: int = 8  # images per decode call (more per task when over 2,000 tasks); a crash retries one task
    max_crashes: int = 2  # worker crashes an image may cause on its own before it is reported failed


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect to Ray for the block: an already initialised Ray is used as it is; else `address` or $RAY_ADDRESS;
    else a private local Ray (address='local', no dashboard), shut down at the end. RayRun enters it itself."""
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'deeplab-cli[ray]' (on every node)") from None
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise DeeplabError(f"cannot start or reach {where}: {' '.join(str(exc).split())}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def network_device(spec: str, gpus: float) -> str:
    """Where the network actors run: 'cuda' when the cluster has GPUs (for 'auto') or when asked, else 'cpu'."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return "cuda" if gpus >= 1 else "cpu"
    if spec == "cpu":
        return "cpu"
    if spec == "cuda" or spec.startswith("cuda:"):
        if gpus < 1:
            raise UsageError(f"device {spec!r} asked for, but the Ray cluster has no GPUs")
        return "cuda"  # each actor sees its own GPU as cuda:0
    raise UsageError(f"unknown device {spec!r}; use auto, cpu or cuda")


class RayRun:
    """An iterable run of jobs on the current Ray cluster (see the module docstring); iterate once for ImageResults.

    weights: the model (weights.Weights), shipped once through the object store. device: auto, cpu, cuda.
    crf: None skips the CRF. refine: the CRF function of the CPU tasks (default: from crf_backend). class_names:
    the overlays' legend (default: the weights' VOC classes).
    """

    def __init__(
        self,
        jobs: Sequence[Job],
        weights: Any,
        device: str = "auto",
        precision: str | None = None,
        pad_to: int | None = None,
        crf: CRFParams | None = CRFParams(),
        crf_backend: str = "auto",
        channels_last: bool = True,
        max_side: int | None = DEFAULT_MAX_SIDE,
        class_names: Sequence[str] | None = None,
        options: RayOptions | None = None,
        refine: Callable[[np.ndarray, np.ndarray, CRFParams], np.ndarray] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.jobs = list(jobs)
        self.weights = weights
        self.device, self.precision, self.pad_to = device, precision, pad_to
        self.crf = crf.validate() if crf is not None else None
        backend = resolve_backend(crf_backend, "cpu", in_pool=True)
        self.refine = refine or (refine_pydensecrf if backend == "pydensecrf" else refine_torch_cpu)
        self.channels_last = channels_last
        self.max_side, self.class_names = max_side, list(class_names) if class_names else None
        self.options = options or RayOptions()
        self.log = log or (lambda message: None)
        self.interrupted = False
        self.wall = 0.0  # seconds from the start of the iteration to its end
        self.startup = 0.0  # seconds from the start of the iteration to the first result
        self.placement: Counter[tuple[str, str]] = Counter()  # (stage, node id) → images
        self.description = ""
        self._generator: Iterator[ImageResult] | None = None
        self._weights_ref: list[Any] = []

    def stop(self) -> None:
        """Mark the run interrupted; the iteration ends at the next result."""
        self.interrupted = True

    def close(self) -> None:
        """End an iteration early: the work in flight is dropped, a private Ray stopped."""
        if self._generator is not None:
            self._generator.close()

    def __iter__(self) -> Iterator[ImageResult]:
        if self._generator is not None:
            raise RuntimeError("a RayRun can be iterated only once")
        self._generator = self._generate()
        return self._generator

    # -- the driver

    def _rows(self) -> list[dict[str, Any]]:
        rows = []
        for index, job in enumerate(self.jobs):
            out = job.outputs
            if out is None:
                raise ValueError("the Ray engine writes outputs: every job needs OutputPaths")
            rows.append({"index": index, "path": str(job.path), "mask": str(out.mask),
                         "overlay": str(out.overlay or ""), "probs": str(out.probs or ""), "legend": out.legend})
        return rows

    def build_dataset(self, ledger: Any = None) -> Any:
        """The lazy Ray Data pipeline the iteration executes (ledger: an AttemptLedger actor, None: no bookkeeping)."""
        import ray
        import ray.data
        from ray.data import ActorPoolStrategy, TaskPoolStrategy

        from ..transforms import padded_size

        opts = self.options
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        device = network_device(self.device, gpus)
        precision = check_precision(self.precision, device)
        arch = get_arch(self.weights.arch)
        try:
            padded_size(1, 1, arch, self.pad_to)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        batch_size = opts.batch_size or (8 if device == "cuda" else 1)
        actors = opts.network_actors or (int(gpus) if device == "cuda" else 1)
        per_batch = max(1, opts.rows_per_block)
        per_block = max(per_batch, math.ceil(len(self.jobs) / MAX_INPUT_BLOCKS))
        guard = dict(ledger=ledger, max_crashes=opts.max_crashes)
        self.description = (f"Ray: {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPUs, {gpus:g} GPUs; "
                            f"{actors} network actor(s) on {device} {precision}, batch {batch_size}; "
                            f"CRF {'off' if self.crf is None else self.refine.__name__.removeprefix('refine_')} in CPU tasks")

        self._weights_ref = [ray.put(self.weights)]  # held by the run: a restarted actor reads it again
        rows = self._rows()
        ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / per_block)))
        # Decode tasks reserve memory for their block of images, which also keeps Ray Data from fusing them
        # into the network actors (it fuses a task stage into an actor stage whose resources are the same;
        # decoding would then run one image at a time inside the model's process).
        ds = ds.map_batches(decode_rows, batch_size=per_batch, batch_format="numpy", num_cpus=1,
                            memory=per_batch * DECODE_MEMORY_PER_IMAGE,
                            fn_kwargs=dict(max_side=self.max_side, **guard))
        ds = ds.map_batches(
            NetworkStage, batch_size=batch_size, batch_format="numpy",
            compute=ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
            num_gpus=1 if device == "cuda" else 0, num_cpus=1,
            fn_constructor_kwargs=dict(weights=self._weights_ref, device=device, precision=precision, pad_to=self.pad_to,
                                       channels_last=self.channels_last, threads=opts.net_threads, **guard),
        )
        return ds.map_batches(
            crf_and_write, batch_size=None, batch_format="numpy", num_cpus=1,
            compute=TaskPoolStrategy(size=opts.crf_workers) if opts.crf_workers else None,
            fn_kwargs=dict(params=self.crf, stride=arch.output_stride, offset=arch.crop_offset, refine=self.refine,
                           class_names=self.class_names or load_class_names(None, self.weights.num_classes), **guard),
        )

    def _generate(self) -> Iterator[ImageResult]:
        t0 = time.perf_counter()
        with ray_session(self.options.address, self.options.num_cpus) as ray:
            yield from self._execute(ray, t0)

    def _execute(self, ray: Any, t0: float) -> Iterator[ImageResult]:
        from ray.data import DataContext

        context = DataContext.get_current()
        saved = {k: getattr(context, k) for k in ("enable_progress_bars", "max_errored_blocks", "enable_auto_log_stats")}
        levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
        context.enable_progress_bars, context.max_errored_blocks, context.enable_auto_log_stats = False, -1, False
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        ledger = ray.remote(num_cpus=0)(AttemptLedger).remote()
        seen: set[int] = set()
        try:
            dataset = self.build_dataset(ledger)
            self.log(self.description)
            try:
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    for index, result in self._results(batch):
                        if index in seen:  # a block Ray computed twice (lineage reconstruction)
                            continue
                        if not self.startup:
                            self.startup = time.perf_counter() - t0
                        seen.add(index)
                        yield result
                    if self.interrupted:
                        return
            except KeyboardInterrupt:
                self.interrupted = True
                return
            except DeeplabError:
                raise
            except Exception as exc:  # noqa: BLE001 - Ray's errors (an actor that cannot start, a lost driver): one line
                raise DeeplabError(f"the Ray run failed: {_first_line(exc)}") from None
            for index, job in enumerate(self.jobs):
                if index not in seen:
                    yield ImageResult(job, "failed", LOST)
        finally:
            self.wall = time.perf_counter() - t0
            for key, value in saved.items():
                setattr(context, key, value)
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            with contextlib.suppress(Exception):
                ray.kill(ledger)

    def _results(self, batch: dict[str, np.ndarray]) -> Iterator[tuple[int, ImageResult]]:
        """The rows of a batch of the last stage's small columns → (job index, ImageResult)."""
        stages = [stage for stage in BATCH_STAGES if stage != "crf" or self.crf is not None]
        for k in range(len(batch["index"])):
            index = int(batch["index"][k])
            status = str(batch["status"][k])
            height, width = int(batch["height"][k]), int(batch["width"][k])
            timings = {stage: float(batch[f"t_{stage}"][k]) for stage in stages} if status == "ok" else {}
            for stage in ("decode", "network", "crf"):
                node = str(batch[f"{stage}_node"][k]) if f"{stage}_node" in batch else ""
                if node:
                    self.placement[(stage, node)] += 1
            result = ImageResult(self.jobs[index], "done" if status == "ok" else "failed",
                                 None if status == "ok" else str(batch["error"][k]),
                                 shape=(height, width) if height else None, timings=timings)
            yield index, result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if line.strip() and not line.startswith("Traceback"):
            return " ".join(line.split())
    return type(exc).__name__
