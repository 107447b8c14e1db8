"""The training forward: talker and sub-talker (code predictor) losses on the inference layout.

The module wraps only `model.talker`: the speaker encoder is frozen (its output is detached upstream too),
so it runs outside FSDP in the data path and its x-vectors arrive in the batch. Parameter names stay
`talker.*`, the same names as in the full Qwen3TTSForConditionalGeneration state dict, so a checkpoint
loads straight into a full model for export.

Correctness points (each an upstream bug; README, "What the loss is"):
- text embeddings go through `text_projection`, as in inference;
- talker labels are shifted once, in `training.layout`; the cross-entropy here does not shift;
- the sub-talker gets the hidden state of the position that *predicted* the frame (p-1), not of the frame;
- code-predictor head k is scored against codebook k, unshifted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.layout import IGNORE, TalkerBatch


@dataclass
class TalkerOutput:
    talker_loss_sum: torch.Tensor  # summed cross-entropy over talker targets
    sub_loss_sum: torch.Tensor  # summed cross-entropy over 15 codebooks x frames
    talker_targets: int
    sub_targets: int
    talker_logits: torch.Tensor | None = None  # (B, L, vocab) when asked for
    sub_logits: torch.Tensor | None = None  # (N, 15, 2048) when asked for


class TalkerForTraining(nn.Module):
    def __init__(self, talker: nn.Module):
        super().__init__()
        self.talker = talker

    def input_embeddings(self, batch: TalkerBatch) -> torch.Tensor:
        talker = self.talker
        text = talker.text_projection(talker.get_text_embeddings()(batch.text_ids))
        codec = talker.get_input_embeddings()(batch.codec_ids[..., 0])
        frame = batch.frame_on.unsqueeze(-1).to(codec.dtype)
        for k, embedding in enumerate(talker.code_predictor.get_input_embeddings(), start=1):
            codec = codec + embedding(batch.codec_ids[..., k]) * frame
        codec = codec * batch.codec_on.unsqueeze(-1).to(codec.dtype)
        # The speaker slot carries the x-vector itself as its codec-channel input.
        slot = (batch.speaker_index[:, 0], batch.speaker_index[:, 1])
        codec = codec.index_put(slot, batch.speaker.to(codec.dtype))
        return text + codec

    def sub_talker_inputs(self, hidden: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """[h_(p-1), emb(c0), emb_1(c1), ..., emb_14(c14)]: 16 inputs, as code-predictor generation sees them."""
        talker = self.talker
        parts = [hidden.unsqueeze(1), talker.get_input_embeddings()(frames[:, :1])]
        for k, embedding in enumerate(talker.code_predictor.get_input_embeddings()[:-1], start=1):
            parts.append(embedding(frames[:, k:k + 1]))
        return torch.cat(parts, dim=1)

    def forward(self, batch: TalkerBatch, return_logits: bool = False) -> TalkerOutput:
        talker = self.talker
        embeds = self.input_embeddings(batch)
        hidden = talker.model(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
        logits = talker.codec_head(hidden)
        talker_sum = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE,
                                     reduction="sum")

        predicting = hidden[batch.predictor_index[:, 0], batch.predictor_index[:, 1]]
        sub_inputs = self.sub_talker_inputs(predicting, batch.frames)
        # forward_finetune applies lm_head[k-1] to position k; no labels passed, so nothing shifts inside.
        sub_logits = talker.code_predictor.forward_finetune(inputs_embeds=sub_inputs).logits  # (N, 15, 2048)
        sub_sum = F.cross_entropy(sub_logits.float().flatten(0, 1), batch.frames[:, 1:].flatten(), reduction="sum")
        return TalkerOutput(talker_sum, sub_sum, int((batch.labels != IGNORE).sum()), int(batch.frames[:, 1:].numel()),
                            logits if return_logits else None, sub_logits if return_logits else None)


def speaker_embedding(speaker_encoder: nn.Module, mel: torch.Tensor) -> torch.Tensor:
    """x-vector of one reference: mel (frames, 128) -> (D,). Frozen, so no graph is kept."""
    param = next(speaker_encoder.parameters())
    with torch.no_grad():
        return speaker_encoder(mel.unsqueeze(0).to(param.device, param.dtype))[0].float()
