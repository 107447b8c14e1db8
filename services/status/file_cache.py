"""A value computed from a file, recomputed only when the file's version (mtime and size, or an object's ETag)
changes.

Status pages poll every few seconds over thousands of shards: a stat() (or one listing of an object store) per
shard is cheap, opening each Parquet file again is not. Keyed by path, thread-safe (the status server answers
from a thread pool).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Generic, TypeVar

from shared.store import ObjectInfo

T = TypeVar("T")


def stat_info(path: Path) -> ObjectInfo | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return ObjectInfo(st.st_size, st.st_mtime, f"{st.st_mtime_ns}-{st.st_size}")


class FileVersionCache(Generic[T]):
    """Subclasses say how to `read` a file; `get` returns None for a vanished or unreadable one."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[str, T | None]] = {}
        self._lock = threading.Lock()

    def read(self, path: Path | str, info: ObjectInfo) -> T:
        raise NotImplementedError

    def get(self, path: Path | str, info: ObjectInfo | None = None) -> T | None:
        """`info`: the file's version as a listing gave it (an object store's); else the path is stat()ed."""
        info = info or stat_info(path)
        if info is None:
            return None
        key = str(path)
        with self._lock:
            cached = self._entries.get(key)
        if cached is not None and cached[0] == info.tag:
            return cached[1]
        try:
            value = self.read(path, info)
        except Exception:  # corrupt or foreign file under a shard name: status counts it, without numbers
            value = None
        with self._lock:
            self._entries[key] = (info.tag, value)
        return value

    def keep_only(self, paths) -> None:
        """Forget every file not in `paths`, so the cache never outgrows the directory."""
        listed = {str(p) for p in paths}
        with self._lock:
            for key in [k for k in self._entries if k not in listed]:
                del self._entries[key]
