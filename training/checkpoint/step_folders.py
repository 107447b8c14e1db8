"""torch.distributed.checkpoint folders RUN_DIR/step-NNNNNN/: model, optimizer, scheduler, data position, RNG.

Model and optimizer state are DCP shards that load on any number of ranks. The step, the lr schedule and the
data position are one global record (train_state.json, written by rank 0); each rank's RNG state is in
extra-rankNNNNN.pt. A checkpoint therefore resumes on another world size; one of an older format (the data
position per rank in extra-rankNNNNN.pt, no train_state.json) resumes only on the world size that wrote it.

A folder is written as .step-NNNNNN.tmp and renamed once every rank has finished, so a step-NNNNNN/ name
always means a complete checkpoint; a crash mid-save leaves only a temporary that the next save replaces.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from training.checkpoint import object_store as remote

log = logging.getLogger(__name__)
# DCP's filesystem writer calls the deprecated tensor.storage() on every tensor; nothing to act on.
warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)

STEP_RE = re.compile(r"^step-(\d{6,})$")
MODEL_KEY = "model"
BEST_FILE = "best.json"  # {"step", "eval_loss"} of the checkpoint with the lowest eval loss so far
STATE_FILE = "train_state.json"  # {"step", "scheduler", "data", ...}: the same for every rank
BEST_NAME = "best"  # RUN/best: a link to that step-NNNNNN/ (export also resolves the name through best.json)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(run_dir: Path | str) -> dict[int, Path | str]:
    if remote.is_remote(run_dir):
        return remote.complete_checkpoints(run_dir, STEP_RE)
    found = {}
    if run_dir.is_dir():
        for entry in run_dir.iterdir():
            m = STEP_RE.match(entry.name)
            if m and entry.is_dir():
                found[int(m.group(1))] = entry
    return dict(sorted(found.items()))


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def model_options(module: torch.nn.Module) -> StateDictOptions:
    """Frozen parameters (LoRA's base weights) are not saved: they come from the base model, which the run's
    step folders name (training.model.lora.META_FILE). Loading then fills the trainable parameters only."""
    frozen = any(not p.requires_grad for p in module.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def save(run_dir: Path, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler, extra: dict, keep: int, files: dict[str, str] | None = None) -> Path:
    """Collective: every rank calls it. `extra` (data position etc., JSON) is global and `files` (name -> text,
    the same on every rank) are written into the folder: both by rank 0."""
    rank = dist.get_rank()
    if remote.is_remote(run_dir):  # no rename there: a commit marker instead (training.checkpoint.object_store)
        final = remote.join(run_dir, step_dir_name(step))
        remote.save(final, _train_state(module, optimizer), {"rng": _rng_state()},
                    _rank0_files(step, scheduler, extra, files) if rank == 0 else {})
        if rank == 0:
            _apply_retention(run_dir, keep, remote.remove)
        dist.barrier()
        return final
    final = run_dir / step_dir_name(step)
    temporary = run_dir / f".{final.name}.tmp"
    if rank == 0 and temporary.exists():
        shutil.rmtree(temporary)
    dist.barrier()
    dcp.save(_train_state(module, optimizer), checkpoint_id=str(temporary))
    torch.save({"rng": _rng_state()}, temporary / f"extra-rank{rank:05d}.pt")
    if rank == 0:
        for name, text in _rank0_files(step, scheduler, extra, files).items():
            (temporary / name).write_text(text)
    dist.barrier()
    if rank == 0:
        if final.exists():  # re-saving the same step (e.g. final save after an interval save)
            shutil.rmtree(final)
        temporary.rename(final)
        _apply_retention(run_dir, keep, lambda path: shutil.rmtree(path, ignore_errors=True))
    dist.barrier()
    return final


def _train_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {MODEL_KEY: get_model_state_dict(module, options=model_options(module)),
            "optim": get_optimizer_state_dict(module, optimizer)}


def _rank0_files(step: int, scheduler, extra: dict, files: dict[str, str] | None) -> dict[str, str]:
    """What rank 0 writes into a step folder: the global training state and the run's `files`."""
    return {STATE_FILE: json.dumps({"step": step, "scheduler": scheduler.state_dict(), **extra}), **(files or {})}


def _local_extra(path: Path) -> tuple[dict, dict | None]:
    """(global state, this rank's RNG state or None) of a step folder on a path."""
    rank_path = path / f"extra-rank{dist.get_rank():05d}.pt"
    state_path = path / STATE_FILE
    if state_path.exists():
        rng = torch.load(rank_path, weights_only=False)["rng"] if rank_path.exists() else None
        return json.loads(state_path.read_text()), rng
    # the older format: everything per rank, so only the world size that wrote it can resume
    written = len(list(path.glob("extra-rank*.pt")))
    if written != dist.get_world_size():
        raise RuntimeError(legacy_world_problem(path, written, dist.get_world_size()))
    extra = torch.load(rank_path, weights_only=False)
    return extra, extra.pop("rng")


def _apply_retention(run_dir, keep: int, delete) -> None:
    best = read_best(run_dir)
    for old_step, path in list(complete_checkpoints(run_dir).items())[:-keep]:
        if not best or old_step != best["step"]:  # the best checkpoint outlives retention
            delete(path)


def read_best(run_dir: Path | str) -> dict | None:
    if remote.is_remote(run_dir):
        return remote.read_json(remote.join(run_dir, BEST_FILE))
    path = Path(run_dir) / BEST_FILE
    return json.loads(path.read_text()) if path.exists() else None


def record_best(run_dir: Path, step: int, eval_loss: float) -> None:
    """Rank 0, once step-NNNNNN/ is complete: best.json and the RUN/best link, each replaced atomically (on an
    object store best.json alone, written whole)."""
    if remote.is_remote(run_dir):
        return remote.write_json(remote.join(run_dir, BEST_FILE), {"step": step, "eval_loss": eval_loss})
    temporary = run_dir / f".{BEST_FILE}.tmp"
    temporary.write_text(json.dumps({"step": step, "eval_loss": eval_loss}))
    temporary.rename(run_dir / BEST_FILE)
    link = run_dir / f".{BEST_NAME}.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(step_dir_name(step), link)
    link.rename(run_dir / BEST_NAME)


def resolve_checkpoint(path: Path) -> Path:
    """A step-NNNNNN/ folder as given, or RUN/best -> the step folder best.json names."""
    if remote.is_remote(str(path)):
        return _resolve_remote(str(path).rstrip("/"))
    path = Path(path)
    if path.name == BEST_NAME:
        best = read_best(path.parent)
        if best is None:
            raise FileNotFoundError(f"{path.parent / BEST_FILE} not found: this run has no eval loss yet; set "
                                    f"eval.fraction (or eval.shards) when training, or pass a step-NNNNNN folder")
        path = path.parent / step_dir_name(best["step"])
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no .metadata); pass a step-NNNNNN folder "
                                f"of a run, or RUN/best")
    return path


def _resolve_remote(uri: str) -> str:
    parent, _, name = uri.rpartition("/")
    if name == BEST_NAME:
        best = read_best(parent)
        if best is None:
            raise FileNotFoundError(f"{parent}/{BEST_FILE} not found: this run has no eval loss yet; pass a "
                                    "step-NNNNNN folder")
        uri = remote.join(parent, step_dir_name(best["step"]))
    if not remote.is_complete(uri):
        raise FileNotFoundError(f"{uri} is not a complete checkpoint (no {remote.COMMIT_MARKER}); pass a "
                                "step-NNNNNN folder of a run, or RUN/best")
    return uri


def load_latest(run_dir: Path | str, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict | None:
    """Restore the newest complete checkpoint into module/optimizer/scheduler/RNG; returns its extra state."""
    found = complete_checkpoints(run_dir)
    # Every rank must resume the same step: rank 0's listing decides.
    choice = [max(found) if found else None]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    options = model_options(module)
    state = _train_state(module, optimizer)
    if remote.is_remote(run_dir):
        path = remote.join(run_dir, step_dir_name(choice[0]))
        remote.load(path, state)
    else:
        path = run_dir / step_dir_name(choice[0])
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(module, state[MODEL_KEY], options=options)
    set_optimizer_state_dict(module, optimizer, state["optim"])
    if remote.is_remote(run_dir):  # always the current format (train_state.json + per-rank RNG)
        extra = json.loads(remote.read_text(remote.join(path, STATE_FILE)) or "{}")
        rank_state = remote.load_extra(path, dist.get_rank())
        rng = rank_state["rng"] if rank_state else None
    else:
        extra, rng = _local_extra(path)
    scheduler.load_state_dict(extra.pop("scheduler"))
    if rng is not None:
        _set_rng_state(rng)
    else:  # a rank the checkpoint did not have: its RNG stays as train.seed left it
        log.warning("%s has no RNG state for rank %d (written by fewer ranks)", path, dist.get_rank())
    log.info("resumed from %s", path)
    return extra


def legacy_world_problem(path: Path, written: int, world: int) -> str:
    return (f"{path} was written by {written} rank(s) in an older format (a data position per rank, no "
            f"{STATE_FILE}), which resumes only on the same layout; this start has {world}: relaunch with "
            f"--nproc_per_node {written} (and the same train.grad_accum), or start a new checkpoint.dir")


def load_model_weights(path: Path, module: torch.nn.Module) -> None:
    """Load only the model weights of a checkpoint into an unsharded module (export; no process group)."""
    state = {MODEL_KEY: module.state_dict()}
    with warnings.catch_warnings():  # a single-process load is the intent here, not a missing process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        if remote.is_remote(str(path)):
            remote.load(str(path), state, no_dist=True)
        else:
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
    module.load_state_dict(state[MODEL_KEY])
