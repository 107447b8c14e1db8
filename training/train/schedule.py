"""The learning-rate schedule as a function of the data trained, not of optimizer steps.

Its x-axis is the global count of micro-batches trained since the run began (padding repeats not counted: a
consumed-samples counter). A round's micro-batch plan is the same on any world size or grad_accum, so a run
resumed on another layout continues the same curve: after 2 ranks x 1 micro-batch, one rank alone takes steps of
half the size and the rate moves half as much per step.

Linear warmup over the first `warmup` micro-batches (train.warmup_steps x micro-batches per step of the layout
that began the run, kept in the checkpoint), then cosine decay to min_lr_ratio at `total` (or constant).
"""
from __future__ import annotations

import math

from training.config import TrainConfig


class SampleSchedule:
    """Sets each param group's lr (its initial lr x the factor) before every step; checkpointed like a scheduler."""

    def __init__(self, optimizer, config: TrainConfig, per_step: int):
        self.optimizer, self.config, self.per_step = optimizer, config, per_step
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.warmup = config.warmup_steps * per_step
        self.total = 0  # 0: unknown (follow mode without train.steps), so no decay is planned
        self.consumed = 0
        self.planned_per_step = 0  # the layout `total` was planned for (a resumed total is kept on that layout)

    def factor(self, consumed: int) -> float:
        """The lr factor of the step after which `consumed` micro-batches have been trained."""
        if consumed < self.warmup:
            return consumed / self.warmup
        if self.config.lr_schedule == "constant" or self.total <= self.warmup:
            return 1.0
        progress = min(1.0, (consumed - self.warmup) / (self.total - self.warmup))
        low = self.config.min_lr_ratio
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self, micro_batches: int) -> float:
        """Before a step that trains `micro_batches` (all ranks, padding repeats not counted): sets its lr and
        counts them; returns the lr."""
        self.consumed += micro_batches
        factor = self.factor(self.consumed)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"warmup_micro_batches": self.warmup, "consumed_micro_batches": self.consumed,
                "total_micro_batches": self.total, "per_step": self.per_step}

    def load_state_dict(self, state: dict) -> None:
        if "last_epoch" in state:  # torch's LambdaLR of an older checkpoint: it counted steps of this layout
            self.consumed = int(state["last_epoch"]) * self.per_step
            return
        self.warmup, self.consumed = int(state["warmup_micro_batches"]), int(state["consumed_micro_batches"])
        self.total, self.planned_per_step = int(state.get("total_micro_batches", 0)), int(state.get("per_step", 0))
