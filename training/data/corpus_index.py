"""The training job's copy of the output's shard index (shared.shard_index): what the speaker table and the
lr schedule's step estimate need, from one file instead of one read per shard.

Rank 0 loads OUTPUT/shard_index.json and checks it against the published listing: shards missing from it
(published since the driver last saved it, or an output encoded before the index existed) or re-published
since are read, here once, and the result is cached for the next start: in the output directory once the
encode job is complete (its driver, the file's writer while it runs, is done), else, or where the output
cannot be written, under the run directory (RUN/shard_index.json, also consulted on the next start).
"""
from __future__ import annotations

import logging
from pathlib import Path

from shared import schema
from shared.shard_index import ShardIndex, index_location
from training.data.stream import is_complete

log = logging.getLogger(__name__)

ShardFigures = dict[int, tuple[int, int]]  # shard id -> (trainable rows, their frames)


def read_corpus_index(output: Path, run_dir: Path) -> tuple[ShardIndex, list[str], int]:
    """The index of every shard published now, writing nothing (the checks before a run): the output's index,
    then the run's cached copy, and the shards neither describes read. Also the names of those read, and the
    count of shards published."""
    files = schema.published_shard_files(output)
    index = ShardIndex.load(index_location(output))
    read = index.reconcile(files, ShardIndex.load(Path(run_dir) / schema.INDEX_FILE))
    return index, read, len(files)


def load_corpus_index(output: Path, run_dir: Path) -> ShardIndex:
    """The index of every shard published now (rank 0, before the first step), cached when shards were read."""
    index, read, published = read_corpus_index(output, run_dir)
    if read:
        log.info("shard index: read %d of %d shards (not in %s); cached", len(read), published,
                 index_location(output))
        _save(index, output, run_dir / schema.INDEX_FILE)
    return index


def _save(index: ShardIndex, output: Path, cache: Path) -> None:
    if is_complete(output):
        try:
            index.save(index_location(output))
            return
        except OSError as exc:  # e.g. a read-only output: the run directory keeps it instead
            log.info("shard index: %s not writable (%s); caching it under %s", output, exc, cache.parent)
    index.save(cache)


def shard_figures(index: ShardIndex, needs_reference: bool = True) -> ShardFigures:
    """What the step estimate needs per shard: its trainable rows and their frames (held-out rows included;
    `needs_reference` False: rows without ref_audio too)."""
    return {schema.shard_id_of(e.name): e.figures(needs_reference) for e in index.entries.values()}
