"""The CRF executor of `deeplab batch`, `evaluate` and folder `refine`: CRFs in worker processes, or on one
thread of this process.

Workers are single-threaded processes (pydensecrf holds the GIL; the torch backend runs there with one
thread) started by 'forkserver' or 'spawn', so they stay clear of the parent's torch threads. They ignore
SIGINT (the parent decides what an interrupt means), can run at a lower priority (`nice`, so that a thread
feeding a GPU is never kept waiting for a core), and exit when the parent dies, even by SIGKILL. A worker
that dies (the OOM killer) breaks the pool: the work it held fails, and the next submission starts a fresh
pool. This module is torch-free, so a spawned worker imports little.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

from ..crf import CRFParams, dense_crf, dense_crf_pydensecrf
from ..errors import DeeplabError
from ..resolution import upsample_labels

if TYPE_CHECKING:
    import numpy as np

WORKER_DIED = "a CRF worker process died (killed, or out of memory?)"


def mp_context() -> multiprocessing.context.BaseContext:
    """'forkserver' where available (no fork of a process running torch threads), else 'spawn'."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _worker_init(nice: int, lifeline: Any) -> None:
    """Worker set-up: leave Ctrl-C to the parent, lower the priority, and exit when the parent dies: `lifeline`
    is the read end of a pipe only the parent writes to, so it reads EOF then. (A SIGKILLed parent never tells
    its pool, and a forkserver outlives it while its workers live, so neither the pool nor the parent pid
    would tell the worker to go.)"""
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


def _noop() -> None:
    """Submitted once per worker at start-up so the processes exist before the first CRF is due."""


def crf_task(image: np.ndarray, probs: np.ndarray, params: CRFParams, keep_probs: bool, backend: str = "pydensecrf",
             size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None, float]:
    """The CRF in a worker: image (h, w, 3) uint8, probs (C, h, w) → (labels uint8, Q (C, h, w) or None, seconds).

    size: the photo's full (H, W) when it ran at a working resolution; the labels are then upsampled to it
    (resolution.upsample_labels), else they are (h, w).
    """
    t0 = time.perf_counter()
    if backend == "pydensecrf":
        q = dense_crf_pydensecrf(image, probs, params)
    else:
        import torch  # imported by the worker on its first torch task only

        torch.set_num_threads(1)  # one core per worker: the pool, not torch's threads, uses the cores
        q = dense_crf(image, probs, params, backend="torch", device="cpu")
    labels = upsample_labels(q, size or q.shape[1:])
    return labels, (q if keep_probs else None), time.perf_counter() - t0


class CRFPool:
    """Runs CRF tasks on `workers` processes (at `nice`), or on one thread here when workers is 0 or in_process."""

    def __init__(self, workers: int, nice: int = 0, in_process: bool = False) -> None:
        self.workers = workers
        self.nice = nice
        self.in_process = in_process or workers == 0
        self._lock = threading.Lock()
        self._executor: Executor | None = None
        self._lifeline: tuple[Any, Any] | None = None  # (read end for the workers, write end held here)

    def start(self) -> None:
        """Start the workers now (they then start while other work is under way), unless already running."""
        with self._lock:
            if self._executor is None:
                self._executor = self._new_executor()

    def _new_executor(self) -> Executor:
        if self.in_process:
            return ThreadPoolExecutor(1, thread_name_prefix="deeplab-crf")
        ctx = mp_context()
        if self._lifeline is None:
            self._lifeline = ctx.Pipe(duplex=False)
        pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_worker_init,
                                   initargs=(self.nice, self._lifeline[0]))
        for _ in range(self.workers):
            pool.submit(_noop)
        return pool

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn(*args) on a worker (fn must be picklable unless in-process); a broken pool is replaced once.

        Raises DeeplabError when no pool can be started.
        """
        for _ in range(2):
            with self._lock:
                if self._executor is None:  # the previous pool broke (a worker died): start a fresh one
                    self._executor = self._new_executor()
                executor = self._executor
            try:
                future = executor.submit(fn, *args)
            except BrokenProcessPool:
                self._forget(executor)
                continue
            future.add_done_callback(functools.partial(self._on_done, executor))
            return future
        raise DeeplabError("CRF worker processes cannot be started")

    @staticmethod
    def result(future: Future) -> Any:
        """A finished task's result; a DeeplabError when its worker died."""
        try:
            return future.result()
        except BrokenProcessPool:
            raise DeeplabError(WORKER_DIED) from None

    def _on_done(self, executor: Executor, future: Future) -> None:
        if not future.cancelled() and isinstance(future.exception(), BrokenProcessPool):
            self._forget(executor)

    def _forget(self, executor: Executor) -> None:
        """Drop a broken pool so the next submission starts a fresh one."""
        with self._lock:
            if self._executor is executor:
                self._executor = None
                executor.shutdown(wait=False, cancel_futures=True)

    def pids(self) -> list[int]:
        """The worker processes' ids (empty in-process): for tests and diagnostics."""
        executor = self._executor
        return list(getattr(executor, "_processes", None) or ()) if isinstance(executor, ProcessPoolExecutor) else []

    def shutdown(self, wait: bool = True) -> None:
        """Cancel what has not started; with wait, finish what has, else leave it and let the workers exit."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)
        if self._lifeline is not None:
            for end in self._lifeline:
                end.close()  # workers still running (only when not waiting) exit now
            self._lifeline = None
