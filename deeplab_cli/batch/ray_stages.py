"""The work `deeplab batch --engine ray` runs inside Ray workers: decode tasks, the network actor, CRF + write tasks.

Every stage takes and returns a Ray Data batch (a dict of NumPy columns, one row per image) and never
raises for one image: a row that fails gets status 'failed' and a one-line `error`, and is passed on
untouched by the later stages, so every planned row comes back to the driver. Columns:

  from the driver   index (int), path (input file or URL), mask, overlay, probs (output paths; '' = none), legend
  decode            image ((h, w, 3) uint8 at the working resolution), height, width (the photo's full size),
                    status ('ok' | 'failed'), error, t_decode, decode_node
  network           scores (fc8 (C, h, w) float32, ~250 KB for a VOC photo: 16 MB less than probabilities), t_network,
                    network_node
  crf_and_write     only the small columns: index, height, width, status, error, t_* seconds, *_node

Decode and CRF + write are torch-free (a worker importing torch costs seconds and ~480 MB): the ×8
upsampling and softmax run in NumPy (`numpy_transforms`), the CRF in pydensecrf. Only the network actor
imports torch; it loads the model once, in `__init__`.

Crashes: Ray retries a task whose worker died (segfault, OOM kill, lost node) and restarts a dead actor.
An image that kills its worker every time (a "poison" image) would be retried for ever, so each stage
records its attempts in the run's `AttemptLedger` actor: a batch that was started before and never
finished is redone image by image, each image marked before it starts, and an image that was started
alone `max_crashes` times without finishing is reported failed instead of being tried again.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..crf import CRFParams, dense_crf, dense_crf_pydensecrf
from ..io import decode_photo
from ..numpy_transforms import probs_from_scores
from ..resolution import downscale, upsample_labels, working_size
from ..storage import URL, is_url, read_bytes
from .results import error_text, write_outputs
from .inputs import OutputPaths

Batch = dict[str, np.ndarray]
SMALL_COLUMNS = ("index", "height", "width", "status", "error", "t_decode", "t_network", "t_upsample", "t_crf",
                 "t_write", "decode_node", "network_node", "crf_node")
_EMPTY_IMAGE = np.zeros((0, 0, 3), np.uint8)
_EMPTY_SCORES = np.zeros((0, 0, 0), np.float32)


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (unit tests): no node
        return ""


def _path(text: str) -> Path | URL | None:
    """A row's output column ('' = none) as the path or URL OutputPaths holds."""
    return None if not text else URL(text) if is_url(text) else Path(text)


def _objects(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array holding the given arrays as they are (NumPy would otherwise stack equal shapes)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


# ---------------------------------------------------------------------------------------------
# Bounded attempts


class AttemptLedger:
    """Counts, per key, how often work was started and finished; run as one Ray actor per run (num_cpus=0)."""

    def __init__(self) -> None:
        self.started: dict[str, int] = defaultdict(int)
        self.finished: dict[str, int] = defaultdict(int)

    def begin(self, key: str) -> int:
        """Mark key as started; returns how many earlier starts never finished (crashes, lost workers)."""
        unfinished = self.started[key] - self.finished[key]
        self.started[key] += 1
        return unfinished

    def finish(self, key: str) -> None:
        """Mark key as finished; a key whose every start finished is forgotten (the ledger holds work in flight)."""
        self.finished[key] += 1
        if self.finished[key] >= self.started[key]:
            del self.started[key], self.finished[key]


def guarded(ledger: Any, stage: str, indices: Sequence[int], max_crashes: int, process: Callable[[list[int]], None],
            fail: Callable[[int, str], None]) -> None:
    """Run process(all positions) once; after a crash of the same batch, image by image with bounded attempts.

    ledger: an AttemptLedger actor handle (None: no bookkeeping); indices: the rows' run-wide indices;
    process(positions) computes rows in place; fail(position, reason) marks a row failed.
    """
    positions = list(range(len(indices)))
    if ledger is None or not positions:
        process(positions)
        return
    import ray

    batch_key = f"{stage}:{indices[0]}-{indices[-1]}:{len(indices)}"
    if ray.get(ledger.begin.remote(batch_key)) == 0:
        process(positions)
        ledger.finish.remote(batch_key)
        return
    for position in positions:  # this batch killed its worker before: find the culprit
        key = f"{stage}:{indices[position]}"
        crashes = ray.get(ledger.begin.remote(key))
        if crashes >= max_crashes:
            fail(position, f"{stage} crashed its worker process on this image {crashes + 1} times "
                           f"(killed, out of memory, or a crash in native code); not tried again")
            ledger.finish.remote(key)
            continue
        process([position])
        ledger.finish.remote(key)
    ledger.finish.remote(batch_key)


# ---------------------------------------------------------------------------------------------
# Stage 1: read + decode (CPU tasks)


def decode_rows(batch: Batch, max_side: int | None = None, ledger: Any = None, max_crashes: int = 2) -> Batch:
    """Read and decode each row's `path` at the working resolution for max_side (resolution.py; large JPEGs at a
    reduced DCT scale): adds image, height, width (full size), status, error, t_decode, decode_node."""
    n = len(batch["index"])
    images: list[np.ndarray] = [_EMPTY_IMAGE] * n
    sizes = np.zeros((n, 2), np.int64)
    status, error = ["ok"] * n, [""] * n
    seconds = np.zeros(n, np.float64)

    def process(positions: list[int]) -> None:
        for i in positions:
            path = str(batch["path"][i])
            t0 = time.perf_counter()
            try:
                # as the local engine: an overlay needs every pixel, so no reduced-scale decoding then
                draft = None if batch["overlay"][i] else max_side
                image, (height, width) = decode_photo(read_bytes(path), path, draft)
                images[i] = downscale(image, working_size(height, width, max_side))
                sizes[i] = height, width
            except Exception as exc:  # noqa: BLE001 - this image's failure
                status[i], error[i] = "failed", error_text(exc, path)
            seconds[i] = time.perf_counter() - t0

    def fail(i: int, reason: str) -> None:
        status[i], error[i] = "failed", reason

    guarded(ledger, "decode", [int(x) for x in batch["index"]], max_crashes, process, fail)
    out = dict(batch)
    out.update(image=_objects(images), height=sizes[:, 0], width=sizes[:, 1], status=np.array(status, object),
               error=np.array(error, object), t_decode=seconds, decode_node=np.array([_node_id()] * n, object))
    return out


# ---------------------------------------------------------------------------------------------
# Stage 2: the network (one actor per GPU, or a few on CPU-only clusters)


class NetworkStage:
    """Callable class for `map_batches(compute=ActorPoolStrategy(...))`: the model, loaded once per actor."""

    def __init__(self, weights: Any, device: str = "cpu", precision: str | None = None, pad_to: int | None = None,
                 channels_last: bool = True, threads: int | None = None, ledger: Any = None,
                 max_crashes: int = 2) -> None:
        import torch

        from ..pipeline import Segmenter
        from ..weightfiles.formats import build_model

        # Ray sets OMP_NUM_THREADS to the actor's CPU reservation (1); on a CPU-only node the network should use
        # the cores as the local engine's does, sharing them with the CRF tasks.
        torch.set_num_threads(threads or os.cpu_count() or 1)
        if isinstance(weights, list):  # [ObjectRef] of the driver's Weights (put once, read by every actor)
            import ray

            weights = ray.get(weights[0])
        # Images arrive at their working resolution already (max_side=None here: no second downscaling).
        self.segmenter = Segmenter(build_model(weights), device=device, precision=precision, pad_to=pad_to,
                                   crf=None, channels_last=channels_last, max_side=None)
        self.ledger, self.max_crashes = ledger, max_crashes
        self.node = _node_id()

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["index"])
        self._scores: list[np.ndarray] = [_EMPTY_SCORES] * n
        self._status, self._error = list(batch["status"]), list(batch["error"])
        self._seconds = np.zeros(n, np.float64)
        self._batch = batch
        guarded(self.ledger, "network", [int(x) for x in batch["index"]], self.max_crashes, self._process, self._fail)
        out = dict(batch)
        out.update(scores=_objects(self._scores), status=np.array(self._status, object),
                   error=np.array(self._error, object), t_network=self._seconds,
                   network_node=np.array([self.node] * n, object))
        return out

    def _fail(self, i: int, reason: str) -> None:
        self._status[i], self._error[i] = "failed", reason

    def _process(self, positions: list[int]) -> None:
        """Group the rows still ok by padded input size, one network call per group."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in positions:
            if self._status[i] != "ok":
                continue
            image = self._batch["image"][i]
            try:
                self.segmenter.check_memory(*image.shape[:2])  # e.g. --max-side none on a huge photo: refused
                groups[self.segmenter.input_size(*image.shape[:2])].append(i)
            except Exception as exc:  # noqa: BLE001 - e.g. larger than --pad-to, or than the memory
                self._fail(i, error_text(exc, str(self._batch["path"][i])))
        for size, rows in groups.items():
            self._run(size, rows)

    def _run(self, size: tuple[int, int], rows: list[int]) -> None:
        import torch

        seg = self.segmenter
        t0 = time.perf_counter()
        try:
            scores = seg.scores(seg.prepare([self._batch["image"][i] for i in rows], size)).float()
            if seg.device.type == "cuda":
                torch.cuda.synchronize(seg.device)
            scores = scores.cpu().numpy()
        except Exception as exc:  # noqa: BLE001 - e.g. CUDA out of memory: retry one by one, then fail the image
            if len(rows) > 1:
                for i in rows:
                    self._run(size, [i])
                return
            self._fail(rows[0], f"network failed: {error_text(exc, str(self._batch['path'][rows[0]]))}")
            return
        share = (time.perf_counter() - t0) / len(rows)
        for k, i in enumerate(rows):
            self._scores[i] = np.ascontiguousarray(scores[k])
            self._seconds[i] = share


# ---------------------------------------------------------------------------------------------
# Stage 3: upsampling + softmax + CRF + write (CPU tasks)


def refine_pydensecrf(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """The default CRF of the CPU tasks: pydensecrf, single-threaded → Q (C, H, W) float32."""
    return dense_crf_pydensecrf(image, probs, params)


def refine_torch_cpu(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """--crf-backend torch in a CPU task: one torch thread per task (imports torch in that worker)."""
    import torch

    torch.set_num_threads(1)
    return dense_crf(image, probs, params, backend="torch", device="cpu")


def crf_and_write(batch: Batch, params: CRFParams | None = None, stride: int = 8, offset: int = 0,
                  refine: Callable[[np.ndarray, np.ndarray, CRFParams], np.ndarray] = refine_pydensecrf,
                  class_names: Sequence[str] | None = None, ledger: Any = None, max_crashes: int = 2) -> Batch:
    """Upsample + softmax the scores, run the CRF (None: skip it) at the working resolution, bring the labels to
    full size (in tiles), write the outputs (class_names: a legend on overlays); returns SMALL_COLUMNS only."""
    n = len(batch["index"])
    status, error = list(batch["status"]), list(batch["error"])
    timings = {k: np.zeros(n, np.float64) for k in ("t_upsample", "t_crf", "t_write")}

    def process(positions: list[int]) -> None:
        for i in positions:
            if status[i] != "ok":
                continue
            row = {k: str(batch[k][i]) for k in ("path", "mask", "overlay", "probs")}
            image = batch["image"][i]
            try:
                t0 = time.perf_counter()
                probs = probs_from_scores(batch["scores"][i], image.shape[0], image.shape[1], stride, offset)
                t1 = time.perf_counter()
                final = refine(image, probs, params) if params is not None else probs
                labels = upsample_labels(final, (int(batch["height"][i]), int(batch["width"][i])))
                t2 = time.perf_counter()
                outputs = OutputPaths(_path(row["mask"]), _path(row["overlay"]), _path(row["probs"]),
                                      bool(batch["legend"][i]))
                write_outputs(outputs, image, labels, probs, class_names, source=row["path"])
                t3 = time.perf_counter()
            except Exception as exc:  # noqa: BLE001 - this image's failure
                status[i], error[i] = "failed", error_text(exc, row["path"])
                continue
            # as the local engine: restoring the labels to full size counts as CRF, or as upsampling without one
            crf_seconds = t2 - t1 if params is not None else 0.0
            timings["t_upsample"][i], timings["t_crf"][i] = t2 - t0 - crf_seconds, crf_seconds
            timings["t_write"][i] = t3 - t2

    def fail(i: int, reason: str) -> None:
        status[i], error[i] = "failed", reason

    guarded(ledger, "crf", [int(x) for x in batch["index"]], max_crashes, process, fail)
    out = {k: batch[k] for k in SMALL_COLUMNS if k in batch}
    out.update(status=np.array(status, object), error=np.array(error, object), crf_node=np.array([_node_id()] * n, object),
               **timings)
    return out

