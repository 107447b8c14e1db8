"""Training data from published shards: planned from metadata, loaded per rank, deterministic and resumable.

Work is organised in *rounds*: a group of shards planned together. A round's plan needs only metadata (ids,
texts, references, `num_frames`): texts are tokenized in one batched call, lengths computed, and the rows
packed into micro-batches (training.data.packing). Every rank computes the same plan from the same shard ids and
seed and takes its own micro-batches of each step, so ranks always run the same number of steps; a rank then
reads the codes (the heavy column) of only the rows of its own micro-batches. The plan does not depend on the
world size or grad_accum (only its grouping into steps does), so the position is global: the epoch, the round
and how many of its micro-batches were trained; a restart on another layout continues from there. An epoch
is a sequence of rounds covering every shard once; with `follow`, rounds are formed from shards as the encode
service publishes them, and the epoch (and training) ends once `_COMPLETE` is present and every shard was consumed.

Start-up therefore costs one round, whatever the corpus size; the micro-batch total for the lr schedule comes
from the per-shard figures of the output's shard index (training.data.corpus_index) plus one round's plan
(`estimate_micro_batches_per_epoch`).

Only names from shared.schema.published_shards are ever opened: a shard still being written has a
temporary name and is invisible until its atomic rename.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import pickle
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

from shared import schema
from shared.shard_index import read_entry
from shared.store import is_s3_uri, open_store
from training.config import DataConfig
from training.data.packing import BatchShape, batch_shape, plan_packed, plan_unpacked
from training.data.samples import PlannedRow, SampleBuilder
from training.data.split import RowFilter

log = logging.getLogger(__name__)

# What planning reads: everything but the codes.
METADATA = ["id", "text", "ref_audio", "speaker", "language", "num_frames", "error"]

MicroBatch = list[list[PlannedRow]]  # sequences (rows of the batch) of packed utterances


@dataclass
class DataPosition:
    """Where the stream is, as one global record (the same on every rank, whatever the world size): saved with
    every checkpoint, so a restart continues with the next micro-batch of the round in progress, on any number
    of ranks and with any grad_accum (a round's micro-batch plan does not depend on either)."""
    epoch: int = 0
    consumed: list[int] = field(default_factory=list)  # shard ids finished in this epoch, in order
    round_shards: list[int] = field(default_factory=list)  # shard ids of the round in progress
    round_micro_batches: int = 0  # micro-batches of that round's plan already trained (padding repeats not counted)
    round_digest: str = ""  # fingerprint of that round's plan: a resume that would plan it differently is refused

    def to_dict(self) -> dict:
        return copy.deepcopy(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict, legacy_per_step: int = 0) -> "DataPosition":
        """`legacy_per_step`: micro-batches per step (world x grad_accum) of a checkpoint that counted steps of
        the round per rank (`step_in_round`, an older format), which resumes only on the same layout."""
        if "step_in_round" in d:
            if legacy_per_step < 1:
                raise ValueError("a per-rank data position (step_in_round) needs the layout that wrote it")
            done = int(d["step_in_round"]) * legacy_per_step  # capped at the plan's length when grouped
            return cls(int(d["epoch"]), [int(x) for x in d["consumed"]], [int(x) for x in d["round_shards"]], done)
        return cls(int(d["epoch"]), [int(x) for x in d["consumed"]], [int(x) for x in d["round_shards"]],
                   int(d["round_micro_batches"]), str(d.get("round_digest", "")))


@dataclass
class Step:
    """One optimizer step's input: this rank's micro-batches (codes read), the shapes of every rank's
    micro-batches (the global token counts the loss is normalised by, known without a collective), which of
    them repeat a micro-batch of the round to fill the step (padding), and the stream position after the step."""
    micro_batches: list[MicroBatch]
    shapes: list[BatchShape]  # all ranks' micro-batches of the step
    repeated: list[bool]  # per entry of `shapes`: a padding repeat
    own_repeated: list[bool]  # per entry of `micro_batches`
    position: DataPosition
    rehearsal_rows: int = 0  # rows of the built-in speakers' rehearsal set in the step (all ranks, repeats not counted)

    def total(self, key: str) -> int:
        return sum(getattr(s, key) for s in self.shapes)

    @property
    def trained_micro_batches(self) -> int:
        """Micro-batches of the plan this step advanced by (all ranks, padding repeats not counted)."""
        return self.repeated.count(False)

    @property
    def repeated_utterances(self) -> int:
        return sum(s.utterances for s, again in zip(self.shapes, self.repeated) if again)


def resolve_output_dir(shards: str | Path) -> Path | str:
    """Accept the encode output directory or its shards/ subdirectory: a path, or an s3:// URI (returned as
    one; shards are then listed and read through pyarrow.fs with column projection and ranged reads)."""
    if is_s3_uri(str(shards)):
        uri = str(shards).rstrip("/")
        parent, _, name = uri.rpartition("/")
        if name == schema.SHARDS_DIR and not open_store(uri).listing(schema.SHARDS_DIR):
            return parent
        return uri
    path = Path(shards)
    if path.name == schema.SHARDS_DIR and not (path / schema.SHARDS_DIR).is_dir():
        return path.parent
    return path


def is_complete(output: Path | str) -> bool:
    return open_store(output).exists(schema.COMPLETE_MARKER)


def read_planned(path, shard: int, builder: SampleBuilder, row_filter: RowFilter | None = None) -> list[PlannedRow]:
    """Good rows of one published shard (error rows, rows without frames and, unless the builder's run needs
    none, rows without a reference skipped), metadata only, with text tokens and lengths; with `row_filter`,
    only the rows it keeps (one side of the eval split)."""
    rows = schema.read_rows(path, METADATA)
    good = [(i, r) for i, r in enumerate(rows) if r.trains(builder.needs_reference)
            and (row_filter is None or row_filter.keeps(shard, r.id, r.speaker))]
    if not good:  # e.g. a shard of error rows, or one held out whole (eval.shards): nothing to tokenize
        return []
    return builder.plan_rows(shard, [i for i, _ in good], [r for _, r in good])


def plan_micro_batches(rows: list[PlannedRow], config: DataConfig, rng: random.Random) -> list[MicroBatch]:
    lengths = [r.length for r in rows]
    if config.packing:
        plans = plan_packed(lengths, config.frame_budget, config.pack_length, rng)
    else:
        plans = plan_unpacked(lengths, config.frame_budget, config.max_batch_size, config.bucket_size, rng)
    return [[[rows[i] for i in seq] for seq in plan] for plan in plans]


def shape_of(micro_batch: MicroBatch) -> BatchShape:
    return batch_shape([[r.length for r in seq] for seq in micro_batch], [[r.frames for r in seq]
                                                                          for seq in micro_batch])


def round_rng(seed: int, epoch: int, round_shards: list[int]) -> random.Random:
    return random.Random(f"{seed}/{epoch}/{','.join(map(str, round_shards))}")


@dataclass
class RoundPlan:
    """A round's micro-batches in training order. The plan depends on the rows, the data settings, the seed and
    the epoch, never on the world size or grad_accum: only its grouping into steps does (`steps`)."""
    batches: list[MicroBatch]

    def steps(self, start: int, per_step: int) -> list[list[tuple[int, bool]]]:
        """Micro-batches `start`.. grouped into steps of `per_step` (world x grad_accum, rank-major), as (index,
        repeated) pairs: the last step is filled by repeating the round's first micro-batches, so no row is
        dropped and every rank takes the same number of steps."""
        if start >= len(self.batches):
            return []
        order = [(i, False) for i in range(start, len(self.batches))]
        order += [(i % len(self.batches), True) for i in range(-len(order) % per_step)]
        return [order[s:s + per_step] for s in range(0, len(order), per_step)]

    def digest(self) -> str:
        """Which rows, in which micro-batches: equal digests mean the same plan."""
        layout = [[[(r.shard, r.position, r.row.id, r.length) for r in seq] for seq in mb] for mb in self.batches]
        return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def plan_round(rows: list[PlannedRow], config: DataConfig, seed: int, epoch: int,
               round_shards: list[int]) -> RoundPlan:
    return RoundPlan(plan_micro_batches(rows, config, round_rng(seed, epoch, round_shards)))


class RoundChanged(ValueError):
    """The round a checkpoint stopped in plans differently now: resuming would train rows twice or skip some."""


class ShardStream:
    """Yields this rank's steps; `position` is where the stream is (each Step carries its own copy).

    `store`: a torch.distributed key-value store through which every rank adopts rank 0's view of the shard
    directory (ranks must never plan from different shard lists). A store, not a collective, because the
    stream runs in a background thread: store keys cannot interleave with the training step's collectives,
    and a rank that stops early leaves no other rank waiting.
    """

    def __init__(self, config: DataConfig, builder: SampleBuilder, seed: int, rank: int, world: int,
                 grad_accum: int, store: "dist.Store | None" = None):
        self.config, self.builder, self.seed = config, builder, seed
        self.rank, self.world, self.grad_accum, self.store = rank, world, grad_accum, store
        self.output = resolve_output_dir(config.shards)
        self.position = DataPosition()
        self.verbose = True  # log each round planned (rank 0)
        self.row_filter: RowFilter | None = None  # the training side of the eval split, when there is one
        # shard id -> (trainable rows, their frames), from the shard index (training.data.corpus_index.shard_figures);
        # a shard it lacks is read when the estimate needs it
        self.figures: dict[int, tuple[int, int]] = {}
        self.rehearsal = None  # training.data.rehearsal.RehearsalSet: rows mixed into every round's plan
        self._agreements = 0
        self._last_round: tuple[list[int] | None, list] = (None, [])
        self._last_plan: tuple[tuple | None, RoundPlan | None] = (None, None)

    def _agree(self, value):
        """Rank 0's `value` on every rank (the n-th call on every rank exchanges the n-th value)."""
        if self.store is None or self.world == 1:
            return value
        key = f"shard-listing-{self._agreements}"
        self._agreements += 1
        if self.rank == 0:
            self.store.set(key, pickle.dumps(value))
            return value
        value = pickle.loads(self.store.get(key))
        if self.store.add(f"{key}/read", 1) == self.world - 1:  # the last reader frees the key
            self.store.delete_key(key)
        return value

    def _published(self) -> tuple[list[int], bool]:
        complete = is_complete(self.output)  # read before listing: _COMPLETE is written after the last shard
        return self._agree((sorted(schema.published_shards(self.output)), complete))

    def _epoch_order(self, shards: list[int], epoch: int) -> list[int]:
        if self.config.follow:  # arrival order
            return shards
        return random.Random(f"{self.seed}/order/{epoch}").sample(shards, len(shards))  # fresh each epoch

    def _next_round(self) -> list[int] | None:
        """Shard ids of the next round of this epoch, or None when the epoch is over."""
        pos = self.position
        while True:
            shards, complete = self._published()
            if not self.config.follow and not complete and not pos.consumed and self.rank == 0:
                log.warning("%s has no %s marker: training on the %d shards published so far "
                            "(set data.follow=true to wait for the rest)", self.output, schema.COMPLETE_MARKER,
                            len(shards))
            done = set(pos.consumed)
            fresh = [s for s in self._epoch_order(shards, pos.epoch) if s not in done]
            if fresh:
                return fresh[: self.config.shards_per_round]
            if not self.config.follow or complete:
                if not shards:
                    raise FileNotFoundError(f"no published shards under {self.output}/{schema.SHARDS_DIR}")
                return None
            time.sleep(self.config.poll_seconds)  # follow: wait for the encode service

    def _round_rows(self, shard_ids: list[int]) -> list[PlannedRow]:
        """Planned rows of a round (fresh objects: codes unread). The last round read is kept, so that the
        step estimate's look at the first round is not repeated when training starts with it."""
        if self._last_round[0] != shard_ids:
            published = schema.published_shards(self.output)
            self._last_round = (shard_ids, [r for sid in shard_ids
                                            for r in read_planned(published[sid], sid, self.builder,
                                                                  self.row_filter)])
        return [dataclasses.replace(r, row=dataclasses.replace(r.row)) for r in self._last_round[1]]

    def _mixed_rows(self, shard_ids: list[int], epoch: int) -> list[PlannedRow]:
        """A round's rows, with the rehearsal rows that join them (when the run rehearses)."""
        rows = self._round_rows(shard_ids)
        if self.rehearsal is None:
            return rows
        return rows + self.rehearsal.rows_for(len(rows), self.seed, epoch, shard_ids)

    def _shard_paths(self) -> dict[int, object]:
        """Where each shard id of a plan is read from: the published shards, and the rehearsal set's."""
        published = schema.published_shards(self.output)
        return published | self.rehearsal.paths if self.rehearsal is not None else published

    def _round_plan(self, shard_ids: list[int], epoch: int) -> RoundPlan:
        """The round's plan (the last one is kept: a resume checks it before training starts with it)."""
        if self._last_plan[0] != (epoch, shard_ids):
            rows = self._mixed_rows(shard_ids, epoch)
            self._last_plan = ((epoch, shard_ids), plan_round(rows, self.config, self.seed, epoch, shard_ids))
            if self.verbose and self.rank == 0:
                log.info("epoch %d round: shards %s, %d rows, %d micro-batches", epoch, shard_ids, len(rows),
                         len(self._last_plan[1].batches))
        return self._last_plan[1]

    def check_round(self) -> RoundPlan | None:
        """The plan of the round in progress (None between rounds), refused with RoundChanged when it differs from
        the plan the position was taken in: other shards, or other packing settings, under the same round."""
        pos = self.position
        if not pos.round_shards:
            return None
        published = schema.published_shards(self.output)
        missing = [s for s in pos.round_shards + pos.consumed if s not in published]
        if missing:
            raise RoundChanged(f"the checkpoint's data position names shards {missing} that {self.output} does not "
                               f"publish: data.shards points at other data; restore it or start a new checkpoint.dir")
        plan = self._round_plan(pos.round_shards, pos.epoch)
        if pos.round_digest and plan.digest() != pos.round_digest:
            raise RoundChanged(f"epoch {pos.epoch}, round of shards {pos.round_shards}: the rows under "
                               f"{self.output} plan into other micro-batches than when the checkpoint was written "
                               f"(the shards were rewritten, or data/seed settings changed), so resuming would "
                               f"train rows twice or skip some; restore the data or start a new checkpoint.dir")
        pos.round_digest = plan.digest()
        return plan

    def epoch_steps(self) -> Iterator[Step]:
        """This rank's remaining steps of the current epoch, codes read; advances `position`."""
        pos, per_step = self.position, self.world * self.grad_accum
        mine = slice(self.rank * self.grad_accum, (self.rank + 1) * self.grad_accum)
        while True:
            if not pos.round_shards:
                nxt = self._next_round()
                if nxt is None:
                    return
                pos.round_shards, pos.round_micro_batches, pos.round_digest = nxt, 0, ""
            plan = self.check_round()
            steps = plan.steps(pos.round_micro_batches, per_step)
            codes = RoundCodes(self._shard_paths(),
                               [r for step in steps for i, _ in step[mine] for seq in plan.batches[i] for r in seq])
            for step in steps:
                own = [plan.batches[i] for i, _ in step[mine]]
                codes.load([r for mb in own for seq in mb for r in seq])
                # counted before yielding: a checkpoint after this step resumes past it
                pos.round_micro_batches += sum(1 for _, again in step if not again)
                rehearsed = sum(r.rehearsal for i, again in step if not again for seq in plan.batches[i] for r in seq)
                yield Step(own, [shape_of(plan.batches[i]) for i, _ in step], [again for _, again in step],
                           [again for _, again in step[mine]], DataPosition.from_dict(pos.to_dict()), rehearsed)
            pos.consumed.extend(pos.round_shards)
            pos.round_shards, pos.round_micro_batches, pos.round_digest = [], 0, ""

    def next_epoch(self) -> None:
        self.position = DataPosition(epoch=self.position.epoch + 1)

    def _training_figures(self, shard: int) -> tuple[float, float]:
        """(rows, frames) of a shard that this stream trains on: none of a shard held out whole (eval.shards);
        of the rest, the share the eval.fraction hash keeps in expectation (the hash is per row, and the index
        holds per-shard figures only), so the schedule is exact without eval.fraction and close with it."""
        if shard not in self.figures:
            entry = read_entry(schema.published_shard_file(self.output, shard))
            self.figures[shard] = entry.figures(self.builder.needs_reference)
        rows, frames = self.figures[shard]
        held_out = self.row_filter.held_out if self.row_filter is not None else None
        if held_out is None:
            return rows, frames
        held_whole = shard in held_out.shards
        if self.row_filter.eval_side:
            share = 1.0 if held_whole else held_out.fraction
        else:
            share = 0.0 if held_whole else 1.0 - held_out.fraction
        return rows * share, frames * share

    def estimate_micro_batches_per_round(self) -> list[int]:
        """Unpadded micro-batches of each round of epoch 0 (rows that train only), for the lr schedule, without
        reading the corpus: each shard's trainable rows and frames come from the shard index (self.figures);
        positions per row beyond the frames (text tokens and the fixed prefix) and micro-batches per position
        from planning the first round that has rows to train. The same shards and seed give the same figures
        (a resumed run plans the same schedule)."""
        shards, _ = self._published()
        if not shards:
            raise FileNotFoundError(f"no published shards under {self.output}/{schema.SHARDS_DIR}")
        order, size = self._epoch_order(shards, 0), self.config.shards_per_round
        rounds = [order[start:start + size] for start in range(0, len(order), size)]
        totals = [[sum(figures) for figures in zip(*(self._training_figures(s) for s in r))] for r in rounds]
        if self.rehearsal is not None:  # the rows each round's rehearsal adds, by the same count rule
            added = [self.rehearsal.count(rows) for rows, _ in totals]
            totals = [[rows + n, frames + n * self.rehearsal.mean_frames] for (rows, frames), n in zip(totals, added)]
        for sample, (sample_rows, _) in zip(rounds, totals):  # usually the first round (read again to train)
            rows = self._mixed_rows(sample, 0) if sample_rows > 0 else []
            if rows:
                break
        else:
            return [0] * len(rounds)
        batches = plan_micro_batches(rows, self.config, round_rng(self.seed, 0, sample))
        positions, frames = sum(r.length for r in rows), sum(r.frames for r in rows)
        per_row, per_position = (positions - frames) / len(rows), len(batches) / positions
        return [max(1, round((round_frames + round_rows * per_row) * per_position)) if round_rows > 0 else 0
                for round_rows, round_frames in totals]

    def estimate_micro_batches_per_epoch(self) -> int:
        """Unpadded micro-batches of one epoch: the primary figure (steps follow from it and the layout)."""
        return sum(self.estimate_micro_batches_per_round())

    def estimate_steps_per_epoch(self) -> int:
        """Optimizer steps of one epoch: each round's micro-batches padded to whole steps of world x grad_accum."""
        per_step = self.world * self.grad_accum
        return max(1, sum(math.ceil(n / per_step) for n in self.estimate_micro_batches_per_round()))


class RoundCodes:
    """Reads the codes of one rank's rows of a round: per shard, once, only those rows (the first time a
    step needs that shard), with column projection and row selection."""

    def __init__(self, published: dict[int, object], rows: list[PlannedRow]):
        self.published = published
        self.wanted: dict[int, dict[int, list[PlannedRow]]] = {}
        for r in rows:
            self.wanted.setdefault(r.shard, {}).setdefault(r.position, []).append(r)
        self.loaded: set[int] = set()

    def load(self, rows: list[PlannedRow]) -> None:
        for shard in sorted({r.shard for r in rows} - self.loaded):
            positions = sorted(self.wanted[shard])
            for position, read in zip(positions, schema.read_rows(self.published[shard], ["codes"], positions)):
                for planned in self.wanted[shard][position]:
                    planned.row.codes = read.codes
            self.loaded.add(shard)
