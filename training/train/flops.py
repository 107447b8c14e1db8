"""Training FLOPs of a micro-batch from its real shapes, and the device peaks MFU is measured against.

Counted (forward multiply-adds x 2, times 3 for forward + backward; activation recomputation not counted,
as MFU conventionally leaves it out):
- talker: every computed position (text, frames and padding) through the decoder layers' projections and
  `text_projection`; causal attention scores and values within each utterance (and padding block), i.e. the
  block-diagonal work; `codec_head` at the talker targets only (where the forward applies it);
- code predictor: 16 positions per frame through `small_to_mtp_projection` and its layers, causal attention
  over those 16, and its 15 heads once per frame.
Embedding lookups are not matmuls and are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from training.data.packing import BatchShape

# Dense bf16 peaks (TFLOP/s, no sparsity), matched against the accelerator's name; Ascend 910B: fp16/bf16.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "910B": 313.0}


def peak_tflops(device_name: str, configured: float = 0.0) -> float | None:
    """train.peak_tflops when set, else the table's entry for this device, else None (e.g. a CPU)."""
    if configured > 0:
        return configured
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def accelerator_name(kind: str) -> str:
    """The accelerator's product name ("NVIDIA H100 80GB HBM3", "Ascend910B2", ...), or "cpu"."""
    import torch

    if kind == "cuda":
        return torch.cuda.get_device_name()
    if kind == "npu":
        return torch.npu.get_device_name()
    return "cpu"


def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class FlopModel:
    talker_position: int  # multiply-adds per talker position (layer projections, text projection)
    talker_layers: int
    talker_attention_width: int  # heads x head_dim
    codec_head: int  # multiply-adds per talker target
    cp_position: int  # multiply-adds per code-predictor position
    cp_layers: int
    cp_attention_width: int
    cp_heads: int  # multiply-adds of one head (applied 15 times per frame)

    @classmethod
    def of(cls, talker: nn.Module) -> "FlopModel":
        """From the (unsharded) talker module: counts its Linear weights, so any size is measured as built."""
        cp = talker.code_predictor
        tc, cc = talker.config, cp.config
        return cls(talker_position=_linear_weights(talker.model.layers) + _linear_weights(talker.text_projection),
                   talker_layers=tc.num_hidden_layers,
                   talker_attention_width=tc.num_attention_heads * getattr(tc, "head_dim", tc.hidden_size //
                                                                           tc.num_attention_heads),
                   codec_head=talker.codec_head.weight.numel(),
                   cp_position=_linear_weights(cp.model.layers) + _linear_weights(cp.small_to_mtp_projection),
                   cp_layers=cc.num_hidden_layers,
                   cp_attention_width=cc.num_attention_heads * getattr(cc, "head_dim", cc.hidden_size //
                                                                        cc.num_attention_heads),
                   cp_heads=cp.lm_head[0].weight.numel())

    def training_flops(self, shape: BatchShape) -> float:
        cp_pairs = 16 * 17 // 2
        forward_macs = (shape.positions * self.talker_position
                        + 2 * shape.attention_pairs * self.talker_attention_width * self.talker_layers
                        + shape.talker_targets * self.codec_head
                        + shape.frames * (16 * self.cp_position + 15 * self.cp_heads
                                          + 2 * cp_pairs * self.cp_attention_width * self.cp_layers))
        return 3 * 2 * float(forward_macs)
