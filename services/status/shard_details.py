"""What the status page and /metrics need from each published shard beyond its footer totals: when it was
published, its error rows (id and reason code) and the durations of its good rows as histogram counts.

A published shard never changes (it appears whole), so each is read once, keyed by its version (services.status.file_cache); only the `index`, `id`, `duration` and `error` columns are
read, never the codes. Nothing read here is served as is: reasons are reduced to their code, ids are cut.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from services.status.file_cache import FileVersionCache
from shared.store import ObjectInfo
from shared.schema import STATS_KEY, ShardStats, shard_id_of

# Upper edges (seconds) of the duration histogram's bins; a last bin holds everything longer.
DURATION_EDGES = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0, 45.0, 60.0)
ERRORS_KEPT_PER_SHARD = 20  # the page shows the most recent error rows; older ones are only counted
ID_SHOWN_CHARS = 80
# An error is "<reason>: <file>: <what to do>"; only the reason code is shown. Anything that does not look like
# one of the encoder's codes becomes "other", so a strange file can neither leak text nor grow label sets.
REASON_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")
OTHER_REASON = "other"


@dataclass(frozen=True)
class ErrorRow:
    shard: int
    index: int  # manifest line
    id: str
    reason: str


@dataclass(frozen=True)
class ShardDetail:
    shard: int
    published: float  # file mtime: when the encoder finished writing it
    stats: ShardStats
    errors_by_reason: dict[str, int]
    recent_errors: tuple[ErrorRow, ...]  # the last ERRORS_KEPT_PER_SHARD error rows, in manifest order
    duration_counts: tuple[int, ...]  # per bin of DURATION_EDGES (+ one for longer clips)


def reason_code(error: str) -> str:
    head = error.split(":", 1)[0].strip()
    return head if REASON_RE.fullmatch(head) else OTHER_REASON


def shown_id(value: object) -> str:
    text = "" if value is None else str(value)
    text = "".join(c if c.isprintable() else "?" for c in text[:ID_SHOWN_CHARS + 1])
    return text if len(text) <= ID_SHOWN_CHARS else text[:ID_SHOWN_CHARS - 1] + "…"


def duration_counts(durations: np.ndarray) -> tuple[int, ...]:
    bins = np.searchsorted(np.asarray(DURATION_EDGES), durations, side="right")
    return tuple(int(n) for n in np.bincount(bins, minlength=len(DURATION_EDGES) + 1))


def read_shard_detail(shard: int, path: Path, published: float) -> ShardDetail:
    """Raises on a file that is not a readable shard (the caller counts it without details)."""
    parquet = pq.ParquetFile(path)
    stats = ShardStats(**json.loads((parquet.schema_arrow.metadata or {})[STATS_KEY]))
    # a few small columns: pyarrow's thread pool costs more than it saves here
    table = parquet.read(columns=["index", "id", "duration", "error"], use_threads=False)
    errors_column = table.column("error")
    is_error = np.asarray(errors_column.is_valid())
    durations = table.column("duration").to_numpy(zero_copy_only=False)
    good = ~is_error & np.isfinite(durations.astype(np.float64))
    errors_by_reason: dict[str, int] = {}
    error_positions = np.flatnonzero(is_error)
    for error in errors_column.filter(errors_column.is_valid()).to_pylist():
        code = reason_code(error)
        errors_by_reason[code] = errors_by_reason.get(code, 0) + 1
    kept = error_positions[-ERRORS_KEPT_PER_SHARD:]
    indexes, ids, errors = (table.column(name).take(kept).to_pylist() for name in ("index", "id", "error"))
    recent = tuple(ErrorRow(shard, int(i), shown_id(v), reason_code(e)) for i, v, e in zip(indexes, ids, errors))
    return ShardDetail(shard, published, stats, errors_by_reason, recent,
                       duration_counts(durations[good].astype(np.float64)))


class ShardDetailsCache(FileVersionCache[ShardDetail]):
    """ShardDetail per published shard, re-read only when the file changes (services.status.file_cache)."""

    def read(self, path: Path | str, info: ObjectInfo) -> ShardDetail:
        name = str(path).rsplit("/", 1)[-1]
        shard = shard_id_of(name)
        if shard is None:
            raise ValueError(f"{name} is not a shard name")
        return read_shard_detail(shard, path, info.mtime)

    def details(self, shards: dict[int, Path | str], infos: dict[int, ObjectInfo] | None = None) -> list[ShardDetail]:
        """The readable ones among `shards` (`infos`: their versions from a listing), oldest publication first;
        forgets files no longer listed."""
        infos = infos or {}
        found = [d for d in (self.get(path, infos.get(sid)) for sid, path in shards.items()) if d is not None]
        self.keep_only(shards.values())
        return sorted(found, key=lambda d: (d.published, d.shard))
