"""Training data from published shards: deterministic, rank-split, frame-budget batches with a resumable position.

Work is organised in *rounds*: a group of shards read together, shuffled, length-bucketed and packed into
micro-batches of at most `frame_budget` padded positions. Every rank computes the same plan from the same
shard ids and seed, and takes its own micro-batches of each step, so ranks always run the same number of
steps. An epoch is a sequence of rounds covering every shard once; with `follow`, rounds are formed from
shards as the encode service publishes them, and the epoch (and training) ends once `_COMPLETE` is present
and every shard has been consumed.

Only names from shared.schema.published_shards are ever opened: a shard still being written has a
temporary name and is invisible until its atomic rename.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from shared import schema
from training.config import DataConfig
from training.layout import sequence_length
from training.split import RowFilter

log = logging.getLogger(__name__)

_COLUMNS = ["id", "text", "ref_audio", "codes", "error", "speaker"]


@dataclass
class Row:
    id: str
    text_ids: list[int]  # text tokens only (the prompt's [3:-5])
    ref_audio: str
    codes: np.ndarray  # (frames, 16) int64
    speaker: str | None = None

    @property
    def length(self) -> int:
        return sequence_length(len(self.text_ids), len(self.codes))


@dataclass
class DataPosition:
    """Where the stream is: saved with every checkpoint, so a restart continues with the next step."""
    epoch: int = 0
    consumed: list[int] = field(default_factory=list)  # shard ids finished in this epoch, in order
    round_shards: list[int] = field(default_factory=list)  # shard ids of the round in progress
    step_in_round: int = 0  # steps of that round already taken

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        return cls(int(d["epoch"]), [int(x) for x in d["consumed"]], [int(x) for x in d["round_shards"]],
                   int(d["step_in_round"]))


def resolve_output_dir(shards: str | Path) -> Path:
    """Accept the encode output directory or its shards/ subdirectory."""
    path = Path(shards)
    if path.name == schema.SHARDS_DIR and not (path / schema.SHARDS_DIR).is_dir():
        return path.parent
    return path


def is_complete(output: Path) -> bool:
    return (output / schema.COMPLETE_MARKER).exists()


def read_shard(path: Path, tokenize: Callable[[str], list[int]], row_filter: RowFilter | None = None) -> list[Row]:
    """Good rows of one published shard (error rows skipped), in file order; with `row_filter`, only the rows
    it keeps (decided from ids and speakers, so the codes of the others are never read)."""
    positions = None
    if row_filter is not None:
        shard_id = schema.shard_id_of(Path(path).name)
        positions = [i for i, r in enumerate(schema.read_rows(path, ["id", "speaker"]))
                     if row_filter.keeps(shard_id, r.id, r.speaker)]
    return [Row(r.id, tokenize(r.text or ""), r.ref_audio, r.codes, r.speaker)
            for r in schema.read_rows(path, _COLUMNS, positions) if r.ok and r.ref_audio and len(r.codes)]


def pack(rows: list[Row], config: DataConfig, rng: random.Random) -> list[list[Row]]:
    """Shuffle, sort within buckets by length, then fill micro-batches up to the padded frame budget."""
    rows = rows[:]
    rng.shuffle(rows)
    batches: list[list[Row]] = []
    for start in range(0, len(rows), config.bucket_size):
        bucket = sorted(rows[start:start + config.bucket_size], key=lambda r: (r.length, r.id))
        current: list[Row] = []
        for row in bucket:  # ascending lengths: the row being added is the longest of the batch
            if current and (row.length * (len(current) + 1) > config.frame_budget
                            or len(current) >= config.max_batch_size):
                batches.append(current)
                current = []
            current.append(row)  # a row longer than the budget still trains, alone
        if current:
            batches.append(current)
    rng.shuffle(batches)  # mix lengths across steps; lengths within a batch stay similar
    return batches


def plan_round(rows: list[Row], config: DataConfig, seed: int, epoch: int, round_shards: list[int],
               world: int, grad_accum: int) -> list[list[list[Row]]]:
    """steps[s][rank * grad_accum + a] = the rows of micro-batch a of rank `rank` at step s.

    The batch count is padded to a multiple of world x grad_accum by repeating the round's first batches,
    so no row is dropped and every rank takes the same number of steps.
    """
    rng = random.Random(f"{seed}/{epoch}/{','.join(map(str, round_shards))}")
    batches = pack(rows, config, rng)
    per_step = world * grad_accum
    if not batches:
        return []
    missing = -len(batches) % per_step
    batches = batches + [batches[i % len(batches)] for i in range(missing)]
    return [batches[s:s + per_step] for s in range(0, len(batches), per_step)]


class ShardStream:
    """Yields this rank's micro-batches step by step; `position` is what a checkpoint stores.

    `agree` makes every rank use rank 0's view of the shard directory (a broadcast under torch.distributed):
    ranks must never plan from different shard lists.
    """

    def __init__(self, config: DataConfig, tokenize: Callable[[str], list[int]], seed: int, rank: int, world: int,
                 grad_accum: int, agree: Callable[[object], object] = lambda x: x):
        self.config, self.tokenize, self.seed = config, tokenize, seed
        self.rank, self.world, self.grad_accum, self.agree = rank, world, grad_accum, agree
        self.output = resolve_output_dir(config.shards)
        self.position = DataPosition()
        self.verbose = True  # log each round planned (rank 0)
        self.row_filter: RowFilter | None = None  # the training side of the eval split, when there is one

    def _published(self) -> tuple[list[int], bool]:
        complete = is_complete(self.output)  # read before listing: _COMPLETE is written after the last shard
        return sorted(schema.published_shards(self.output)), complete

    def _next_round(self) -> list[int] | None:
        """Shard ids of the next round of this epoch, or None when the epoch is over."""
        pos = self.position
        while True:
            shards, complete = self.agree(self._published())
            if self.config.follow:  # arrival order
                order = shards
            else:  # a fresh shuffle of the shard order each epoch
                if not complete and not pos.consumed and self.rank == 0:
                    log.warning("%s has no %s marker: training on the %d shards published so far "
                                "(set data.follow=true to wait for the rest)", self.output, schema.COMPLETE_MARKER,
                                len(shards))
                order = random.Random(f"{self.seed}/order/{pos.epoch}").sample(shards, len(shards))
            done = set(pos.consumed)
            fresh = [s for s in order if s not in done]
            if fresh:
                return fresh[: self.config.shards_per_round]
            if not self.config.follow or complete:
                if not shards:
                    raise FileNotFoundError(f"no published shards under {self.output / schema.SHARDS_DIR}")
                return None
            time.sleep(self.config.poll_seconds)  # follow: wait for the encode service

    def _round_steps(self, shard_ids: list[int]) -> list[list[list[Row]]]:
        published = schema.published_shards(self.output)
        rows = [row for sid in shard_ids for row in read_shard(published[sid], self.tokenize, self.row_filter)]
        steps = plan_round(rows, self.config, self.seed, self.position.epoch, shard_ids, self.world, self.grad_accum)
        if self.verbose and self.rank == 0:
            log.info("epoch %d round: shards %s, %d rows, %d steps", self.position.epoch, shard_ids, len(rows),
                     len(steps))
        return steps

    def epoch_steps(self) -> Iterator[list[list[Row]]]:
        """This rank's micro-batches for each remaining step of the current epoch; advances `position`."""
        pos = self.position
        while True:
            if not pos.round_shards:
                nxt = self._next_round()
                if nxt is None:
                    return
                pos.round_shards, pos.step_in_round = nxt, 0
            steps = self._round_steps(pos.round_shards)
            while pos.step_in_round < len(steps):
                step = steps[pos.step_in_round]
                pos.step_in_round += 1  # counted before yielding: a checkpoint after this step resumes past it
                yield step[self.rank * self.grad_accum:(self.rank + 1) * self.grad_accum]
            pos.consumed.extend(pos.round_shards)
            pos.round_shards, pos.step_in_round = [], 0

    def next_epoch(self) -> None:
        self.position = DataPosition(epoch=self.position.epoch + 1)
