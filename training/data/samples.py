"""Shard rows -> training samples and batches: one object owns the text tokenizer, the special ids and the
reference (x-vector) cache, so the data path and the training loop pass it around instead of
closures.

Used by the training stream (lengths for planning, samples for its micro-batches) and usable on its own,
e.g. by an evaluation loop: `builder.batches(rows, frame_budget, device)` turns any list of shard rows
(with codes) into packed device batches whose forward gives loss sums per batch and per utterance.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.schema import ShardRow
from training.speakers.custom_voice import Voices
from training.model.layout import (Sample, SpecialIds, TalkerBatch, batch_text_token_ids, build_sample, collate,
                             load_text_tokenizer, sequence_length)
from training.data.packing import plan_packed
from training.speakers.reference import ReferenceCache, SpeakerTable, speaker_key


@dataclass
class PlannedRow:
    """A good shard row as the planner sees it: where it is, its text tokens and its length in positions.
    `row.codes` is None until the rank that trains on the row reads them."""
    shard: int
    position: int  # row number inside the shard file
    row: ShardRow
    text_ids: list[int]
    length: int  # positions of its sample
    role_ids: tuple[int, ...]  # its own prompt's first tokens: a leading newline merges into the role's "\n"
    rehearsal: bool = False  # the base model's own speech for a built-in speaker (training.rehearsal)

    @property
    def frames(self) -> int:
        return int(self.row.num_frames)


class SampleBuilder:
    def __init__(self, tokenizer, ids: SpecialIds, references: ReferenceCache | None = None,
                 voices: Voices | None = None, speaker_width: int = 0):
        self.tokenizer, self.ids, self.references = tokenizer, ids, references
        self.voices, self.speaker_width = voices, speaker_width  # a CustomVoice base: the run's speaker rows
        self.roles: dict[tuple[int, ...], tuple[int, ...]] = {}  # one shared tuple per distinct role prefix

    @classmethod
    def for_model(cls, model_path: str | Path, model, speaker_device: torch.device | None = None,
                  speakers: SpeakerTable | None = None, voices: Voices | None = None,
                  speaker_encoder=None) -> "SampleBuilder":
        """From a loaded Qwen3TTSForConditionalGeneration: its special ids, its directory's tokenizer and its
        (frozen) speaker encoder, moved to `speaker_device`; `speakers`: each speaker's references (the run's
        shards), whose mean x-vector its rows train with. A CustomVoice model has no speaker encoder:
        `speaker_encoder` (a Base model's) gives the x-vectors, else each speaker's row of `voices` trains."""
        encoder = speaker_encoder if speaker_encoder is not None else model.speaker_encoder
        references = None
        if encoder is not None:
            references = ReferenceCache(encoder.to(speaker_device) if speaker_device is not None else encoder,
                                        speakers)
        return cls(load_text_tokenizer(model_path), SpecialIds.from_config(model.config), references, voices,
                   model.config.talker_config.hidden_size)

    @property
    def learned_rows(self) -> bool:
        """The speaker slot carries the speaker's own codec-embedding row (it trains) instead of an x-vector."""
        return self.voices is not None and self.voices.learned

    @property
    def needs_reference(self) -> bool:
        """Rows train only with a ref_audio (their x-vector fills the speaker slot), unless the slot is a row."""
        return not self.learned_rows

    def text_ids(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """(role ids, text ids) per text, in one batched tokenizer call, sliced exactly as inference slices
        its tokenized prompt."""
        return batch_text_token_ids(self.tokenizer, texts)

    def plan_rows(self, shard: int, positions: list[int], rows: list[ShardRow]) -> list[PlannedRow]:
        """Good rows (metadata only) with their text tokens and lengths; texts tokenized in one call."""
        if not rows:  # a shard of error rows only: the tokenizer fails on an empty batch
            return []
        tokens = self.text_ids([r.text or "" for r in rows])
        return [PlannedRow(shard, p, r, t, self.length(r, t), self.role(role))
                for p, r, (role, t) in zip(positions, rows, tokens)]

    def role(self, ids: list[int]) -> tuple[int, ...]:
        """Nearly every text has the same role prefix: rows share one tuple instead of a list each."""
        key = tuple(ids)
        return self.roles.setdefault(key, key)

    def length(self, row: ShardRow, text_ids: list[int]) -> int:
        return sequence_length(len(text_ids), int(row.num_frames), row.language)

    def sample(self, planned: PlannedRow) -> Sample:
        row = planned.row
        if row.codes is None:
            raise ValueError(f"row {row.id}: codes not read")
        sample = build_sample(list(planned.role_ids), planned.text_ids, row.codes, self.ids, row.language)
        if planned.rehearsal:  # a built-in speaker speaks from its own row, as upstream generation embeds it
            sample.codec_ids[sample.speaker_pos, 0] = self.voices.builtin[speaker_key(row.speaker)]
        elif self.learned_rows:
            sample.codec_ids[sample.speaker_pos, 0] = self.voices.row_of(row.speaker)
        return sample

    def speaker(self, row: ShardRow) -> torch.Tensor:
        """The x-vector fed at the row's speaker slot: its speaker's (the mean over the speaker's references);
        zeros where the slot keeps the speaker's trainable row instead."""
        if self.learned_rows:
            return torch.zeros(self.speaker_width)
        if self.references is None:
            raise ValueError("this SampleBuilder has no speaker encoder (built without references)")
        return self.references.speaker_vector(row.speaker, row.ref_audio)

    def collate(self, sequences: list[list[PlannedRow]]) -> TalkerBatch:
        """One micro-batch (sequences of planned rows with codes) -> a host batch."""
        planned = [p for seq in sequences for p in seq]
        # a rehearsal row's slot keeps its built-in speaker's codec-embedding row: no x-vector
        speakers = torch.stack([torch.zeros(self.speaker_width) if p.rehearsal else self.speaker(p.row)
                                for p in planned])
        learned = None
        if self.learned_rows or any(p.rehearsal for p in planned):
            learned = torch.tensor([self.learned_rows or p.rehearsal for p in planned], dtype=torch.bool)
        return collate([[self.sample(p) for p in seq] for seq in sequences], speakers, self.ids.tts_pad, learned)

    def batches(self, rows: list[ShardRow], frame_budget: int, device: torch.device | str = "cpu",
                pack_length: int = 0, seed: int = 0) -> list[TalkerBatch]:
        """Rows with codes (e.g. a held-out split) -> packed device batches of <= frame_budget positions."""
        planned = self.plan_rows(-1, list(range(len(rows))), rows)
        plans = plan_packed([p.length for p in planned], frame_budget, pack_length, random.Random(seed))
        return [self.collate([[planned[i] for i in seq] for seq in plan]).to(torch.device(device)) for plan in plans]
