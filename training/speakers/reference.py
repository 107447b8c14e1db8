"""Speakers and their x-vectors: reference audio -> x-vector once per distinct reference, and one vector per
speaker, the mean of its references' x-vectors.

A row's speaker is its manifest `speaker`, compared lower-cased (inference looks custom-voice names up
lower-cased); rows without one form one unnamed speaker. Every row of a speaker trains with the same vector,
the one `training.export` writes into the custom-voice model, so training and inference see the same input.
With one reference per speaker (the common case) that vector is the reference's own x-vector.

Upstream asserts 24 kHz references and concatenates all mels of a batch (so they must be equally long).
Here references are resampled to 24 kHz by shared.audio, each distinct reference's log-mel is computed once
and cached, and the frozen speaker encoder embeds each mel on its own, so lengths may differ freely.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from shared.audio import REFERENCE_MAX_SECONDS, AudioLimits, load_audio
from shared.qwen import speaker_mel
from shared.shard_index import ShardIndex, current_index
from training.model.talker import speaker_embedding

# References may be long; the encode service's default 60 s cap does not apply to them.
_REFERENCE_LIMITS = AudioLimits(min_seconds=0.1, max_seconds=REFERENCE_MAX_SECONDS)


def speaker_key(name: str | None) -> str | None:
    """The speaker a manifest `speaker` value names: lower-cased; None (the unnamed speaker) when absent."""
    name = (name or "").strip().lower()
    return name or None


@dataclass
class SpeakerTable:
    """What the published shards say about speakers: each speaker's distinct references, and the languages."""
    references: dict[str | None, list[str]] = field(default_factory=dict)  # speaker key -> sorted references
    languages: set[str] = field(default_factory=set)

    def add(self, speaker: str | None, reference: str) -> bool:
        """Record a (speaker, reference) pair; True when the reference is new for that speaker."""
        refs = self.references.setdefault(speaker_key(speaker), [])
        if reference in refs:
            return False
        refs.append(reference)
        refs.sort()  # the mean is taken in one fixed order, so every reader gets the same vector
        return True

    @property
    def named(self) -> list[str]:
        return sorted(k for k in self.references if k is not None)

    @classmethod
    def from_index(cls, index: ShardIndex, needs_reference: bool = True) -> "SpeakerTable":
        """Speakers, references and languages of the trainable rows of the shards the index describes
        (`needs_reference` False: rows without ref_audio train too, so their speakers count, maybe reference-less)."""
        references: dict[str | None, set[str]] = {}
        languages: set[str] = set()
        for entry in index.entries.values():
            for figures in entry.speakers:
                if needs_reference and not figures.rows:
                    continue
                references.setdefault(speaker_key(figures.speaker), set()).update(figures.references)
            languages.update(entry.languages)
        return cls({key: sorted(refs) for key, refs in references.items()}, languages)


def scan_speakers(output: str | Path, needs_reference: bool = True) -> SpeakerTable:
    """The speaker table of every published shard, from the output's shard index (shards it lacks are read)."""
    return SpeakerTable.from_index(current_index(output), needs_reference)


class ReferenceCache:
    """x-vectors per reference and per speaker. `speakers` fixes each speaker's references up front (all the
    published shards); a reference met later (follow mode: shards published after the start) joins its
    speaker's mean from then on."""

    def __init__(self, speaker_encoder: nn.Module, speakers: SpeakerTable | None = None):
        self.speaker_encoder = speaker_encoder.eval().requires_grad_(False)
        self.speakers = speakers or SpeakerTable()
        self.mels: dict[str, torch.Tensor] = {}
        self.xvectors: dict[str, torch.Tensor] = {}
        self.speaker_vectors: dict[str | None, torch.Tensor] = {}

    def mel(self, path: str) -> torch.Tensor:
        if path not in self.mels:
            self.mels[path] = speaker_mel(load_audio(path, _REFERENCE_LIMITS).samples)
        return self.mels[path]

    def xvector(self, path: str) -> torch.Tensor:
        """(D,) float32 on CPU; the encoder is frozen, so the vector is as stable as the mel."""
        if path not in self.xvectors:
            self.xvectors[path] = speaker_embedding(self.speaker_encoder, self.mel(path)).cpu()
        return self.xvectors[path]

    def speaker_vector(self, speaker: str | None, reference: str | None = None) -> torch.Tensor:
        """(D,) the mean x-vector of the speaker's references (`reference` is one of them, added if new)."""
        key = speaker_key(speaker)
        if reference is not None and self.speakers.add(key, reference):
            self.speaker_vectors.pop(key, None)
        if key not in self.speaker_vectors:
            refs = self.speakers.references.get(key)
            if not refs:
                raise KeyError(f"speaker {key!r} has no reference audio in the shards")
            self.speaker_vectors[key] = torch.stack([self.xvector(r) for r in refs]).mean(0)
        return self.speaker_vectors[key]

    def batch(self, rows: list[tuple[str | None, str]]) -> torch.Tensor:
        """(B, D) for (speaker, reference) pairs: each row gets its speaker's vector."""
        return torch.stack([self.speaker_vector(speaker, ref) for speaker, ref in rows])
