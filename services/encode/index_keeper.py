"""The encode driver's side of OUTPUT/shard_index.json (shared.shard_index): an entry per shard as it is
published, saved at each progress tick and at the end, and checked against the whole listing when the job
finishes (which also gives an output encoded before the index existed its index, on a re-run)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from shared.schema import published_shard_file, published_shard_files
from shared.shard_index import ShardIndex, index_location, read_entry


class IndexKeeper:
    """The driver is the file's only writer while it runs (it holds the output's lock), so it keeps the index in
    memory and rewrites the file whole."""

    def __init__(self, output: Path, log: Callable[[str], None] = print):
        self.output, self.log = output, log
        self.location = index_location(output)
        self.index = ShardIndex.load(self.location)
        self.unsaved = False

    def published(self, shard_id: int) -> None:
        """A shard was just published: read its light columns (one small read) into its entry."""
        try:
            self.index.add(read_entry(published_shard_file(self.output, shard_id)))
        except OSError as exc:  # a cache entry lost is read again by its reader; the job goes on
            self.log(f"shard index: shard {shard_id} not indexed ({exc}); readers will read it")
            return
        self.unsaved = True

    def save(self) -> None:
        if self.unsaved:
            self.index.save(self.location)
            self.unsaved = False

    def reconcile(self) -> None:
        """Entries for exactly the published shards (missing or re-published ones read), then saved."""
        before = set(self.index.entries)
        read = self.index.reconcile(published_shard_files(self.output))
        if read:
            self.log(f"shard index: read {len(read)} shard(s) it lacked")
        self.unsaved = self.unsaved or bool(read) or before != set(self.index.entries)
        self.save()
