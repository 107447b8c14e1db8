"""Publishing shards atomically: a reader sees a whole shard under its final name or nothing."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow.parquet as pq

from shared.schema import SHARDS_DIR, ShardStats, build_table, shard_name


class ShardWriter:
    def __init__(self, output: str | Path):
        self.directory = Path(output) / SHARDS_DIR
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_of(self, shard_id: int) -> Path:
        return self.directory / shard_name(shard_id)

    def publish(self, shard_id: int, rows: list[dict], stats: ShardStats) -> Path:
        """Write under a hidden temporary name, fsync, then rename into place.

        A retried shard rewrites identical rows under the same name, so a shard can never hold a
        row twice and two shards never share a row. On failure the temporary file is removed and
        any previously published shard is left untouched.
        """
        final = self.path_of(shard_id)
        tmp = self.directory / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        table = build_table(sorted(rows, key=lambda r: r["index"]), stats)
        try:
            with open(tmp, "wb") as f:
                pq.write_table(table, f, compression="zstd")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return final
