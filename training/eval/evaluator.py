"""Held-out evaluation during training: the eval loss over every rank, samples on rank 0, the best checkpoint.

The eval rows are the held-out side of training.data.split, read from the published shards (at most
`eval.max_rows` per speaker, in shard-id then file order; codes read for those rows only). In follow mode
each refresh reads only the shards published since the last one: their rows join speakers that have fewer
than `eval.max_rows`, and rows chosen once stay chosen. Each speaker's rows are packed into micro-batches by
the SampleBuilder the same way whatever the world size; the batches are dealt round-robin to the ranks, summed
losses and target counts are all-reduced, so the eval loss is a token mean over the same rows on 1 or N ranks.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
import torch
import torch.distributed as dist

from shared import schema
from shared.schema import ShardRow
from training.checkpoint import step_folders as checkpoint
from training.config import Config
from training.data.stream import is_complete, read_planned, resolve_output_dir
from training.model.layout import TalkerBatch
from training.data.samples import SampleBuilder
from training.data.split import HeldOut, eval_rows, speaker_of, write_split

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    step: int
    loss: float
    talker_loss: float
    sub_talker_loss: float
    loss_by_speaker: dict[str, float]
    rows: int
    new_best: bool = False
    samples: list = field(default_factory=list)  # voice_check.SampleScore, rank 0 only
    skipped_samples: list = field(default_factory=list)  # <speaker>-<k> not synthesised within eval.budget_seconds
    keep: dict = field(default_factory=dict)  # built-in speaker -> keep_check.KeepScore, rank 0 only

    def record(self) -> dict:
        record = dict(kind="eval", step=self.step, eval_loss=self.loss, eval_talker_loss=self.talker_loss,
                      eval_sub_talker_loss=self.sub_talker_loss, eval_loss_by_speaker=self.loss_by_speaker,
                      eval_rows=self.rows)
        if self.keep:
            record["keep"] = {name: score.to_dict() for name, score in self.keep.items()}
        if self.samples:
            record["samples"] = [s.to_dict() for s in self.samples]
            for name in ("similarity", "cer", "wer"):
                values = [getattr(s, name) for s in self.samples if getattr(s, name) is not None]
                if values:
                    record[f"sample_{name}"] = sum(values) / len(values)
        if self.skipped_samples:
            record["samples_skipped"] = self.skipped_samples
        return record


@dataclass
class SpeakerSet:
    """One speaker's held-out rows (codes read) and the reference its samples are conditioned on."""
    name: str
    rows: list[ShardRow]

    @property
    def reference(self) -> str:
        """The reference this speaker's rows use most (ties: the first in name order)."""
        counts = Counter(r.ref_audio for r in self.rows)
        return min(counts, key=lambda ref: (-counts[ref], ref or ""))  # None: rows without one (trained rows)


def collect_eval_rows(shards: str, held_out: HeldOut, builder: SampleBuilder, max_rows: int,
                      shard_ids: list[int], chosen_before: dict[str, SpeakerSet] | None = None
                      ) -> dict[str, SpeakerSet]:
    """Held-out rows of the given published shards, grouped by speaker, at most max_rows each, with codes;
    added to `chosen_before` (rows of shards read earlier) when given."""
    published = schema.published_shards(resolve_output_dir(shards))
    speakers = {name: SpeakerSet(name, list(s.rows)) for name, s in (chosen_before or {}).items()}
    for sid in sorted(shard_ids):
        if not held_out.fraction and sid not in held_out.shards:
            continue  # only whole shards are held out, and not this one: nothing in it to read
        chosen = []
        for planned in read_planned(published[sid], sid, builder, eval_rows(held_out)):
            name = speaker_of(planned.row.speaker)
            current = speakers.setdefault(name, SpeakerSet(name, []))
            if len(current.rows) < max_rows:
                current.rows.append(planned.row)
                chosen.append(planned)
        positions = [p.position for p in chosen]
        for planned, read in zip(chosen, schema.read_rows(published[sid], ["codes"], positions) if chosen else []):
            planned.row.codes = read.codes
    return dict(sorted(speakers.items()))


def eval_batches(speakers: dict[str, SpeakerSet], builder: SampleBuilder, config: Config
                 ) -> list[tuple[int, TalkerBatch]]:
    """(speaker index, host batch): one speaker per batch, packed independently of the world size."""
    return [(index, batch) for index, speaker in enumerate(speakers.values())
            for batch in builder.batches(speaker.rows, config.data.frame_budget, "cpu", config.data.pack_length)]


@torch.no_grad()
def eval_loss(module, speakers: dict[str, SpeakerSet], batches: list[tuple[int, TalkerBatch]], config: Config,
              step: int) -> EvalResult:
    """Collective: every rank runs the same number of forwards (FSDP gathers parameters in each)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    # Pad to a multiple of the world size with repeats that are run but not counted.
    padded = [(i, batch, True) for i, batch in batches] + [(*batches[k % len(batches)], False)
                                                             for k in range(-len(batches) % world)]
    device = next(module.parameters()).device
    # Per speaker: talker loss sum, talker targets, sub-talker loss sum, sub-talker targets. float32: HCCL has
    # no float64 all-reduce, and counts stay exact below 2**24 targets per speaker.
    sums = torch.zeros(len(speakers), 4, dtype=torch.float32, device=device)
    was_training = module.training
    module.eval()
    for index, batch, counted in padded[rank::world]:
        out = module(batch.to(device))
        if counted:
            counts = torch.tensor([out.talker_targets, out.sub_targets], dtype=torch.float32, device=device)
            sums[index] += torch.stack([out.talker_loss_sum.float(), counts[0], out.sub_loss_sum.float(), counts[1]])
    module.train(was_training)
    dist.all_reduce(sums)
    total = sums.sum(0).tolist()
    weight = config.train.sub_talker_weight

    def combined(t_sum, t_n, s_sum, s_n):
        return t_sum / t_n + weight * s_sum / s_n

    by_speaker = {name: combined(*sums[i].tolist()) for i, name in enumerate(speakers)}
    return EvalResult(step, combined(*total), total[0] / total[1], total[2] / total[3], by_speaker,
                      sum(len(s.rows) for s in speakers.values()))


class Evaluator:
    """Runs at every `eval.interval` steps and at the end: eval loss (all ranks), samples (rank 0), best marker."""

    def __init__(self, config: Config, run_dir: Path, builder: SampleBuilder, metrics, board, voice_check=None):
        self.config, self.run_dir, self.builder = config, run_dir, builder
        self.metrics, self.board, self.voice_check = metrics, board, voice_check
        self.held_out = HeldOut.from_config(config.eval)
        self.rank = dist.get_rank()
        self.speakers: dict[str, SpeakerSet] = {}
        self.batches: list[tuple[int, TalkerBatch]] = []
        self.shards_read: list[int] = []
        best = checkpoint.read_best(config.checkpoint.location())
        self.best_loss = best["eval_loss"] if best else float("inf")
        self.last_step = -1

    def refresh(self) -> None:
        """Read the held-out rows of the shards published now (again in follow mode, as shards arrive)."""
        output = resolve_output_dir(self.config.data.shards)
        complete = is_complete(output)  # read before listing: _COMPLETE is written after the last shard
        listing = [(sorted(schema.published_shards(output)), complete)]
        dist.broadcast_object_list(listing, src=0)  # rank 0's view for every rank
        shard_ids, complete = listing[0]
        if shard_ids == self.shards_read:
            return
        read = set(self.shards_read)
        arrivals_only = read <= set(shard_ids)  # follow mode: shards only arrive, so only new ones are read
        self.speakers = collect_eval_rows(self.config.data.shards, self.held_out, self.builder,
                                          self.config.eval.max_rows,
                                          [s for s in shard_ids if s not in read] if arrivals_only else shard_ids,
                                          self.speakers if arrivals_only else None)
        self.shards_read = shard_ids
        if self.speakers:
            self.batches = eval_batches(self.speakers, self.builder, self.config)
        elif self.config.data.follow and not complete:  # more shards to come: evaluate once some are
            log.warning("eval: no held-out row in the %d shards published so far; eval waits for more",
                        len(shard_ids))
        else:
            raise ValueError(f"eval is on (eval.fraction={self.config.eval.fraction}, eval.shards="
                             f"{self.config.eval.shards}) but no good row of {output} is held out; raise "
                             f"eval.fraction or name shards that exist in eval.shards")
        if self.rank == 0:
            write_split(self.run_dir, self.held_out, {n: [r.id for r in s.rows] for n, s in self.speakers.items()})
            log.info("eval split: %s", ", ".join(f"{n} {len(s.rows)} rows" for n, s in self.speakers.items()))

    def due(self, step: int) -> bool:
        interval = self.config.eval.interval
        return bool(interval) and step % interval == 0 and step != self.last_step

    def run(self, step: int, module) -> EvalResult | None:
        """Collective. Returns the result on every rank (the loss is all-reduced; samples exist on rank 0), or
        None while follow mode has published no held-out row yet."""
        if self.config.data.follow:
            self.refresh()  # held-out rows of shards published since the last eval
        if not self.speakers:
            return None
        result = eval_loss(module, self.speakers, self.batches, self.config, step)
        self.last_step = step
        result.new_best = result.loss < self.best_loss
        if result.new_best:
            self.best_loss = result.loss
        if self.voice_check is not None:
            result.samples, result.skipped_samples = self.voice_check.run(step, module, self.speakers)
            result.keep = self.voice_check.last_keep
        self.metrics.append(result.record())
        self.board.eval(result)
        if self.rank == 0:
            log.info("step %d  eval loss %.4f (talker %.4f, sub-talker %.4f) over %d rows%s%s", step, result.loss,
                     result.talker_loss, result.sub_talker_loss, result.rows,
                     "".join(f"  {n} {v:.4f}" for n, v in result.loss_by_speaker.items())
                     if len(result.loss_by_speaker) > 1 else "", _sample_summary(result))
        return result

    def mark_best(self, result: EvalResult) -> None:
        """After the checkpoint of result.step is saved: point RUN/best at it."""
        if self.rank == 0 and result.new_best:
            checkpoint.record_best(self.config.checkpoint.location(), result.step, result.loss)


def _sample_summary(result: EvalResult) -> str:
    record = result.record()
    parts = [f"{name} {record[f'sample_{name}']:.3f}" for name in ("similarity", "cer", "wer")
             if f"sample_{name}" in record]
    return ("  samples: " + ", ".join(parts)) if parts else ""


def evaluator_for(config: Config, run_dir: Path, builder: SampleBuilder, metrics, board,
                  device: torch.device) -> Evaluator | None:
    """The run's evaluator, its held-out rows read; None when eval is off (no fraction, no shards)."""
    if not config.eval.enabled:
        return None
    from training.eval.voice_check import VoiceCheck

    voice_check = VoiceCheck(config, run_dir, builder, device) if config.eval.samples else None
    evaluator = Evaluator(config, run_dir, builder, metrics, board, voice_check)
    evaluator.refresh()
    return evaluator
