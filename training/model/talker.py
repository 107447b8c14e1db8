"""The training forward: talker and sub-talker (code predictor) losses on the inference layout.

The module wraps only `model.talker`: the speaker encoder is frozen (its output is detached upstream too),
so it runs outside FSDP in the data path and its x-vectors arrive in the batch. Parameter names stay
`talker.*`, the same names as in the full Qwen3TTSForConditionalGeneration state dict, so a checkpoint
loads straight into a full model for export.

Correctness points (each an upstream bug; docs/training.md, "What the loss is"):
- text embeddings go through `text_projection`, as in inference;
- talker labels are shifted once, in `training.model.layout`; the cross-entropy here does not shift;
- the sub-talker gets the hidden state of the position that *predicted* the frame (p-1), not of the frame;
- code-predictor head k is scored against codebook k, unshifted.

No device->host synchronisation happens here: target counts come from the batch's host-side shape, every
index is a precomputed tensor (no boolean masking, no .item()), and the codec head runs only where a
target is (text positions need no logits).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.model.document_mask import packed_causal_block_mask
from training.model.layout import TalkerBatch


@dataclass
class TalkerOutput:
    talker_loss_sum: torch.Tensor  # summed cross-entropy over talker targets
    sub_loss_sum: torch.Tensor  # summed cross-entropy over 15 codebooks x frames
    talker_targets: int
    sub_targets: int
    utterance_talker_loss: torch.Tensor  # (U,) talker cross-entropy summed per utterance
    utterance_sub_loss: torch.Tensor  # (U,) sub-talker cross-entropy summed per utterance
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
        # Each utterance's speaker slot carries the x-vector itself as its codec-channel input.
        rows, positions = batch.speaker_index.unbind(1)
        vectors = batch.speaker.to(codec.dtype)
        if batch.speaker_learned is not None:  # a trainable speaker row: the slot keeps its own embedding
            vectors = torch.where(batch.speaker_learned.unsqueeze(1), codec[rows, positions], vectors)
        codec = codec.index_put((rows, positions), vectors)
        return text + codec

    def hidden_states(self, batch: TalkerBatch) -> torch.Tensor:
        """The talker's last hidden states, (B, L, D): packed utterances see only themselves."""
        embeds = self.input_embeddings(batch)
        return self.talker.model(inputs_embeds=embeds, position_ids=batch.position_ids, use_cache=False,
                                 **self.attention_kwargs(batch, embeds.device)).last_hidden_state

    def attention_kwargs(self, batch: TalkerBatch, device: torch.device) -> dict:
        """How the packed rows' block boundaries reach the attention. With no mask, sdpa and eager get the
        block-diagonal causal mask transformers derives from the restarting position ids: a dense (B, 1, L, L)
        tensor, every pair computed. The varlen paths skip the pairs between utterances instead."""
        implementation = str(self.talker.config._attn_implementation)
        if "flash" in implementation:
            # Varlen boundaries computed once per batch on the host, instead of from position ids in every layer.
            return dict(attention_mask=None, cu_seq_lens_q=batch.cu_seq_lens, cu_seq_lens_k=batch.cu_seq_lens,
                        max_length_q=batch.max_block, max_length_k=batch.max_block)
        if implementation == "flex_attention":
            # A 4-D mask passes through transformers' mask creation untouched, so every layer shares this one.
            rows, length = batch.text_ids.shape
            return dict(attention_mask=packed_causal_block_mask(batch.cu_seq_lens, rows, length, device))
        return dict(attention_mask=None)

    def sub_talker_inputs(self, hidden: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """[h_(p-1), emb(c0), emb_1(c1), ..., emb_14(c14)]: 16 inputs, as code-predictor generation sees them."""
        talker = self.talker
        parts = [hidden.unsqueeze(1), talker.get_input_embeddings()(frames[:, :1])]
        for k, embedding in enumerate(talker.code_predictor.get_input_embeddings()[:-1], start=1):
            parts.append(embedding(frames[:, k:k + 1]))
        return torch.cat(parts, dim=1)

    def forward(self, batch: TalkerBatch, return_logits: bool = False) -> TalkerOutput:
        talker = self.talker
        hidden = self.hidden_states(batch)
        at_targets = hidden[batch.target_index[:, 0], batch.target_index[:, 1]]
        talker_ce = F.cross_entropy(talker.codec_head(at_targets).float(), batch.target_labels, reduction="none")

        predicting = hidden[batch.predictor_index[:, 0], batch.predictor_index[:, 1]]
        sub_inputs = self.sub_talker_inputs(predicting, batch.frames)
        # forward_finetune applies lm_head[k-1] to position k; no labels passed, so nothing shifts inside.
        sub_logits = talker.code_predictor.forward_finetune(inputs_embeds=sub_inputs).logits  # (N, 15, 2048)
        sub_ce = F.cross_entropy(sub_logits.float().flatten(0, 1), batch.frames[:, 1:].flatten(),
                                 reduction="none").view(-1, 15).sum(1)
        utterances = batch.speaker.shape[0]
        per_talker = talker_ce.new_zeros(utterances).index_add(0, batch.target_utterance, talker_ce)
        per_sub = sub_ce.new_zeros(utterances).index_add(0, batch.frame_utterance, sub_ce)
        return TalkerOutput(talker_ce.sum(), sub_ce.sum(), batch.shape.talker_targets, batch.shape.sub_targets,
                            per_talker, per_sub, talker.codec_head(hidden) if return_logits else None,
                            sub_logits if return_logits else None)


def speaker_embedding(speaker_encoder: nn.Module, mel: torch.Tensor) -> torch.Tensor:
    """x-vector of one reference: mel (frames, 128) -> (D,). Frozen, so no graph is kept."""
    param = next(speaker_encoder.parameters())
    with torch.no_grad():
        return speaker_encoder(mel.unsqueeze(0).to(param.device, param.dtype))[0].float()
