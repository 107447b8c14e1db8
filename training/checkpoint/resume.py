"""What a resume may and may not change.

The world size and train.grad_accum may change: the data position and the lr schedule are counted in
micro-batches of each round's plan, which neither changes. Settings that change the plan itself may not: the
round in progress would be re-planned into other micro-batches, so rows would be trained twice or skipped.
Each checkpoint records them; a start that differs is refused, before anything is written, naming each key.
(Other data under the same shard ids is caught later, when the round in progress is re-planned: see
training.data.stream.ShardStream.check_round.)
"""
from __future__ import annotations

import json
from pathlib import Path

from training.checkpoint.step_folders import STATE_FILE, complete_checkpoints, legacy_world_problem
from training.config import Config

# data.follow is not one: the round in progress is recorded by its shard ids, whichever way it was formed.
PLAN_KEYS = ("data.packing", "data.frame_budget", "data.pack_length", "data.max_batch_size", "data.bucket_size",
             "data.shards_per_round", "data.rehearsal_fraction", "data.rehearsal_targets", "train.seed")


def plan_settings(config: Config) -> dict:
    """The settings a round's micro-batch plan depends on, by dotted key."""
    values = config.to_dict()
    return {key: values[key.split(".")[0]][key.split(".")[1]] for key in PLAN_KEYS}


def resume_problem(config: Config, world: int) -> str | None:
    """Why the newest complete checkpoint of checkpoint.dir cannot resume with `config` on `world` ranks (None:
    it can, or there is none)."""
    found = complete_checkpoints(Path(config.checkpoint.dir))
    if not found:
        return None
    path = found[max(found)]
    state_path = path / STATE_FILE
    if not state_path.exists():
        written = len(list(path.glob("extra-rank*.pt")))
        return legacy_world_problem(path, written, world) if written != world else None
    recorded = json.loads(state_path.read_text()).get("plan_settings", {})
    now = plan_settings(config)
    changed = [f"{key}={now[key]!r} (was {recorded[key]!r})" for key in PLAN_KEYS
               if key in recorded and recorded[key] != now[key]]
    if not changed:
        return None
    return (f"{path} was trained with other data-plan settings: {', '.join(changed)}; changing them mid-run "
            f"re-plans the epoch (rows trained twice or skipped). Restore them (the world size and "
            f"train.grad_accum may change), or start a new checkpoint.dir")
