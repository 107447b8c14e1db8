"""Feeding the encoder: length-sorted batches bounded by padded audio duration, decoded ahead on a
thread pool so the accelerator never waits for soundfile/soxr (both release the GIL, so threads use
every core they are given)."""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

import soundfile as sf

T = TypeVar("T")


def probe_duration(path: str) -> float:
    """Seconds of audio from the header alone; 0 for anything unreadable (decode reports why later)."""
    try:
        if not os.path.isfile(path):  # never open a FIFO (it would wait for a writer forever) or a directory
            return 0.0
        info = sf.info(path)
        return info.frames / info.samplerate if info.samplerate else 0.0
    except Exception:
        return 0.0


def form_batches(durations: Sequence[float], max_batch_seconds: float, max_batch_items: int) -> list[list[int]]:
    """Indices grouped longest-first so that (items x longest item) stays under the padded budget.

    Sorting by length keeps padding small; the budget bounds activation memory whatever the mix of
    clip lengths, where a fixed item count would not. The longest batch comes first so an
    out-of-memory shows up at once, not at the end of a shard.
    """
    order = sorted(range(len(durations)), key=lambda i: (-durations[i], i))
    batches, current, longest = [], [], 0.0
    for i in order:
        d = max(durations[i], 1e-3)
        candidate_longest = max(longest, d)
        if current and (len(current) + 1 > max_batch_items or candidate_longest * (len(current) + 1) > max_batch_seconds):
            batches.append(current)
            current, candidate_longest = [], d
        current.append(i)
        longest = candidate_longest
    if current:
        batches.append(current)
    return batches


class Prefetcher:
    """Runs a loader over the items of upcoming batches on a thread pool, `depth` batches ahead."""

    def __init__(self, threads: int, depth: int = 2):
        self.depth = max(1, depth)
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="decode")

    def run(self, batches: list[list[int]], load: Callable[[int], T]) -> Iterator[tuple[list[int], list[Future]]]:
        pending: deque[tuple[list[int], list[Future]]] = deque()
        upcoming = iter(batches)
        for batch in upcoming:
            pending.append((batch, [self.pool.submit(load, i) for i in batch]))
            if len(pending) > self.depth:
                yield pending.popleft()
        while pending:
            yield pending.popleft()

    def map(self, fn: Callable[[int], T], items: Sequence[int]) -> list[T]:
        return list(self.pool.map(fn, items))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
