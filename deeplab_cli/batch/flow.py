"""Back-pressure between the engine's stages: how many images, and how many bytes, may be in flight.

The engine (batch.engine) bounds its work three ways: a bounded queue of decoded images, which it reads one
entry ahead (`Lookahead`) to batch what is ready; a count of images past the network (`InFlight`); and the
bytes of all images between the feeder and the consumer (`ByteBudget`), charged from each file's header
before it is decoded, so that a folder of 48 MP photos streams in flat memory.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

NOTHING = object()  # no queue entry yet


class Lookahead:
    """Reads a queue one entry ahead, so the reader can see whether the next entry is ready without taking it."""

    def __init__(self, source: queue.Queue) -> None:
        self._source = source
        self._head: Any = NOTHING

    def peek(self) -> Any:
        """The next entry without waiting (NOTHING when there is none yet); it stays next."""
        if self._head is NOTHING:
            with contextlib.suppress(queue.Empty):
                self._head = self._source.get_nowait()
        return self._head

    def get(self, timeout: float) -> Any:
        """Take the next entry, waiting up to timeout seconds (queue.Empty if none came)."""
        head, self._head = self._head, NOTHING
        return self._source.get(timeout=timeout) if head is NOTHING else head


class InFlight:
    """The images past the network: at most `limit` until the consumer takes their results (back-pressure), and
    how many are still being worked on (CRF, writing), so the run ends only when none is."""

    def __init__(self, limit: int) -> None:
        self._slots = threading.Semaphore(limit)
        self._working = 0
        self._changed = threading.Condition()

    def reserve(self, n: int, stop: threading.Event) -> bool:
        """Wait for room for n images; False (holding nothing) once stopped, as no new image starts then."""
        held = 0
        while held < n:
            if self._slots.acquire(timeout=0.1):
                held += 1
            elif stop.is_set():
                self.release(held)
                return False
        return True

    def release(self, n: int = 1) -> None:
        """Give back n slots: the consumer took the results, or the images never went downstream."""
        if n:
            self._slots.release(n)

    def begin(self) -> None:
        """One reserved image goes downstream (CRF, writing)."""
        with self._changed:
            self._working += 1

    def end(self) -> None:
        """One image downstream is done: its result is on its way to the consumer."""
        with self._changed:
            self._working -= 1
            self._changed.notify_all()

    def wait_idle(self, aborting: Callable[[], bool]) -> None:
        """Wait until no image is downstream, or the run is aborted."""
        with self._changed:
            self._changed.wait_for(lambda: self._working <= 0 or aborting())

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()


class ByteBudget:
    """Bytes of the images in flight: a new image waits until its charge fits under the limit; one image alone
    is always let through, however large (the memory pre-flight decides whether it can run at all)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._changed = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> bool:
        """Wait until n bytes fit; False (holding nothing) once stopped."""
        with self._changed:
            while self.used and self.used + n > self.limit:
                if stop.is_set():
                    return False
                self._changed.wait(0.1)
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def release(self, n: int) -> None:
        with self._changed:
            self.used -= n
            self._changed.notify_all()
