"""Runs an iterator in a background thread, a bounded number of items ahead of its consumer.

The training loop uses it for its input (shard reads, tokenizing, sample building, collating, pinning), so
that the next steps are prepared while the current one computes; `wait_s` is how long the consumer last
waited for an item (0 when the input keeps up). An exception in the producer is raised in the consumer.
With depth 0 the iterator runs inline (no thread), which is what `wait_s` then measures.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher(Iterator[T]):
    def __init__(self, source: Iterable[T], depth: int, name: str = "input"):
        self.depth, self.wait_s = depth, 0.0
        self._source = iter(source)
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._produce, name=f"prefetch-{name}", daemon=True)
            self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(_Failure(error))

    def __next__(self) -> T:
        start = time.perf_counter()
        try:
            if self._thread is None:
                return next(self._source)
            item = self._queue.get()
        finally:
            self.wait_s = time.perf_counter() - start
        if item is _END:
            self._queue.put(_END)  # later calls end too
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item

    def close(self) -> None:
        """Stop the producer (it may be blocked on a full queue) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
