"""Reference audio -> speaker x-vector, once per distinct reference.

Upstream asserts 24 kHz references and concatenates all mels of a batch (so they must be equally long).
Here references are resampled to 24 kHz by shared.audio, each distinct reference's log-mel is computed once
and cached, and the frozen speaker encoder embeds each mel on its own, so lengths may differ freely.
"""
from __future__ import annotations

import torch
from torch import nn

from shared.audio import AudioLimits, load_audio
from shared.qwen import speaker_mel
from training.model import speaker_embedding

# References may be long; the encode service's default 60 s cap does not apply to them.
_REFERENCE_LIMITS = AudioLimits(min_seconds=0.1, max_seconds=600.0)


class ReferenceCache:
    def __init__(self, speaker_encoder: nn.Module):
        self.speaker_encoder = speaker_encoder.eval().requires_grad_(False)
        self.mels: dict[str, torch.Tensor] = {}
        self.xvectors: dict[str, torch.Tensor] = {}

    def mel(self, path: str) -> torch.Tensor:
        if path not in self.mels:
            self.mels[path] = speaker_mel(load_audio(path, _REFERENCE_LIMITS).samples)
        return self.mels[path]

    def xvector(self, path: str) -> torch.Tensor:
        """(D,) float32 on CPU; the encoder is frozen, so the vector is as stable as the mel."""
        if path not in self.xvectors:
            self.xvectors[path] = speaker_embedding(self.speaker_encoder, self.mel(path)).cpu()
        return self.xvectors[path]

    def batch(self, paths: list[str]) -> torch.Tensor:
        return torch.stack([self.xvector(p) for p in paths])
