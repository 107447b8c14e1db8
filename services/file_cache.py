"""A value computed from a file, recomputed only when the file's mtime or size changes.

Status pages poll every few seconds over thousands of shards: a stat() per shard is cheap, opening each
Parquet file again is not. Keyed by path, thread-safe (the status server answers from a thread pool).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class FileVersionCache(Generic[T]):
    """Subclasses say how to `read` a file; `get` returns None for a vanished or unreadable one."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, int, T | None]] = {}
        self._lock = threading.Lock()

    def read(self, path: Path, st: os.stat_result) -> T:
        raise NotImplementedError

    def get(self, path: Path) -> T | None:
        try:
            st = path.stat()
        except OSError:
            return None
        key = str(path)
        with self._lock:
            cached = self._entries.get(key)
        if cached is not None and cached[:2] == (st.st_mtime_ns, st.st_size):
            return cached[2]
        try:
            value = self.read(path, st)
        except Exception:  # corrupt or foreign file under a shard name: status counts it, without numbers
            value = None
        with self._lock:
            self._entries[key] = (st.st_mtime_ns, st.st_size, value)
        return value

    def keep_only(self, paths) -> None:
        """Forget every file not in `paths`, so the cache never outgrows the directory."""
        listed = {str(p) for p in paths}
        with self._lock:
            for key in [k for k in self._entries if k not in listed]:
                del self._entries[key]
