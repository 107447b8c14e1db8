"""Rank 0's inference model for eval samples: kept on the host, refreshed from the FSDP shards, on the device only
while it generates.

The training module is sharded (FSDP2): no rank holds the full talker. Each eval copies the current weights
into one persistent Qwen3TTSModel in `fsdp.param_dtype`, one parameter at a time: every rank casts its shard to
that dtype and all-gathers it (a collective, in the same parameter order on every rank), rank 0 copies the full
tensor into its host copy and the gathered tensor is freed before the next. So an eval never holds more than
one parameter's full tensor beyond the host copy (the largest: the text embedding), and no fp32 copy of the
whole model exists anywhere.

Between evals the copy lives in host memory: rank 0's device holds what every other rank's holds. The copy
(talker, speaker encoder, codec) is moved to the device for the samples and back afterwards, and the device's
cache is emptied, so its memory goes back to training.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from shared.qwen import load_inference_model, place_inference_model
from training.model.lora import inference_name, merge_adapters


def release_device_cache(device: torch.device) -> None:
    """Return freed blocks of the caching allocator to the device (training allocates them again as it needs)."""
    if device.type != "cpu":
        getattr(torch, device.type).empty_cache()


@torch.no_grad()
def gather_weights(module: torch.nn.Module, target: torch.nn.Module | None, dtype: torch.dtype) -> int:
    """Collective: copy `module`'s (FSDP-sharded) parameters into `target`'s parameters of the same names, one
    at a time, cast to `dtype` before the gather. `target` is None on the ranks that only take part. Returns the
    number of parameters copied (0 where target is None)."""
    for part in module.modules():
        if isinstance(part, FSDPModule):
            # The root (and every layer with fsdp.reshard_after_forward off) stays gathered after a forward:
            # after the eval loss its parameters are full local tensors. Resharding makes each a DTensor again
            # and frees those full copies before the samples need the memory.
            part.reshard()
    targets = dict(target.named_parameters()) if target is not None else {}
    copied, names, adapters = 0, set(), {}
    for training_name, param in module.named_parameters():
        name = inference_name(training_name)  # LoRA: the plain name; None for an adapter (merged below)
        full = param.detach().to(dtype if name else torch.float32)
        if isinstance(full, DTensor):
            full = full.full_tensor()
        if name is None:
            adapters[training_name] = full
            continue
        names.add(name)
        if target is not None:
            if name not in targets or targets[name].shape != full.shape:
                raise RuntimeError(f"training weight {name} {tuple(full.shape)} has no counterpart in the inference "
                                   f"model (model.path must be the model training started from)")
            targets[name].copy_(full)
            copied += 1
        del full
    if target is not None:
        merge_adapters(targets, adapters, module)
        missing = sorted(n for n in targets if n.startswith("talker.") and n not in names)
        if missing:
            raise RuntimeError(f"the inference model has talker weights training does not: {missing[:5]}")
    return copied


class InferenceCopy:
    """The persistent host-side inference model of rank 0 (None elsewhere), loaded once from model.path."""

    def __init__(self, model_path: str, device: torch.device, dtype: torch.dtype, attention: str):
        self.model_path, self.device, self.dtype, self.attention = model_path, device, dtype, attention
        self.rank = dist.get_rank()
        self.tts = None

    def load(self):
        """Rank 0's Qwen3TTSModel (loaded from model.path the first time, on the host), None elsewhere."""
        if self.rank == 0 and self.tts is None:
            self.tts = load_inference_model(self.model_path, "cpu", self.dtype, self.attention)
        return self.tts

    def refresh(self, module: torch.nn.Module):
        """Collective: the current training weights into rank 0's copy; returns the Qwen3TTSModel on rank 0
        (still on the host), None on the other ranks."""
        self.load()
        gather_weights(module, self.tts.model if self.tts is not None else None, self.dtype)
        return self.tts

    @contextlib.contextmanager
    def on_device(self):
        """Rank 0's copy on the training device for the duration of the block, then back on the host."""
        place_inference_model(self.tts, self.device)
        try:
            yield self.tts
        finally:
            place_inference_model(self.tts, torch.device("cpu"))
            release_device_cache(self.device)
