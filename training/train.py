"""Fine-tune Qwen3-TTS on encoded shards with FSDP2.

    torchrun --nproc_per_node 8 -m training.train --config training/configs/qwen3tts_1.7b.yaml \\
        data.shards=/data/encoded model.path=/models/Qwen3-TTS-12Hz-1.7B-Base

Restarting the same command resumes from the newest complete checkpoint in checkpoint.dir.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from shared.device import peak_memory_bytes, select_device, synchronize
from shared.qwen import load_tts_model
from training import checkpoint
from training.board import Board
from training.config import Config, dump_config, load_config
from training.data import DataPosition, Row, ShardStream
from training.evaluate import evaluator_for
from training.layout import IGNORE, SpecialIds, build_sample, collate, load_text_tokenizer, text_token_ids
from training.metrics import MetricsLog
from training.model import TalkerForTraining
from training.parallelize import build_mesh, parallelize
from training.reference import ReferenceCache
from training.split import HeldOut, check_same_rule, training_rows

log = logging.getLogger("training")


def lr_lambda(config: Config, total_steps: int):
    t = config.train

    def factor(step: int) -> float:  # step = optimizer steps already taken
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        # total_steps 0: unknown in advance (follow mode without train.steps), so no decay can be planned.
        if t.lr_schedule == "constant" or total_steps <= t.warmup_steps:
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def init_distributed(preference: str):
    if "RANK" not in os.environ:  # plain `python -m training.train`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    device = select_device(preference, int(os.environ["LOCAL_RANK"]))
    # torchrun --max-restarts hands the restarted ranks the same store as the failed attempt (torch 2.9): without
    # a per-attempt prefix they read the dead ranks' addresses and never connect (gloo/nccl "connection refused").
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=device.backend, store=attempt, rank=rank, world_size=world)
    return device


class StepBuilder:
    """Rows -> device batches: tokens were made by the stream, x-vectors come from the reference cache."""

    def __init__(self, ids: SpecialIds, role_ids: list[int], references: ReferenceCache, device: torch.device):
        self.ids, self.role_ids, self.references, self.device = ids, role_ids, references, device

    def __call__(self, rows: list[Row]):
        samples = [build_sample(self.role_ids, r.text_ids, r.codes, self.ids) for r in rows]
        speakers = self.references.batch([r.ref_audio for r in rows])
        return collate(samples, speakers, self.ids.tts_pad).to(self.device)


def train(config: Config) -> None:
    device = init_distributed(config.train.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    _setup_logging(rank)
    run_dir = Path(config.checkpoint.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        check_same_rule(run_dir, HeldOut.from_config(config.eval))  # before config.yaml is replaced
        dump_config(config, run_dir / "config.yaml")
    torch.manual_seed(config.train.seed)

    attention = config.for_chip(device)  # fails here on a chip without the config's dtypes
    model = load_tts_model(config.model.path, "cpu", torch.float32, attention)
    ids = SpecialIds.from_config(model.config)
    references = ReferenceCache(model.speaker_encoder.to(device.torch_device))
    module = TalkerForTraining(model.talker).to(device.torch_device).train()
    del model
    parallelize(module, config.fsdp, build_mesh(device))
    t = config.train
    optimizer = torch.optim.AdamW(module.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)

    tokenizer = load_text_tokenizer(config.model.path)
    role_ids = text_token_ids(tokenizer, "")[0]

    def agree(value):
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    stream = ShardStream(config.data, lambda text: text_token_ids(tokenizer, text)[1], t.seed, rank, world,
                         t.grad_accum, agree)
    if config.eval.enabled:  # held-out rows are never trained on
        stream.row_filter = training_rows(HeldOut.from_config(config.eval))
    total_steps = t.steps or _estimate_total_steps(config, stream)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))

    step = 0
    resumed = checkpoint.load_latest(run_dir, module, optimizer, scheduler)
    if resumed:
        step, stream.position = resumed["step"], DataPosition.from_dict(resumed["data"])
    build = StepBuilder(ids, role_ids, references, device.torch_device)
    metrics = MetricsLog(run_dir, rank == 0)
    board = Board(run_dir, rank == 0, step)
    evaluator = evaluator_for(config, run_dir, stream.tokenize, build, agree, metrics, board, references,
                              device.torch_device)
    log.info("training on %s x %d (%s), %s, run dir %s", device.describe(), world, device.backend,
             f"{t.steps} steps" if t.steps else f"{t.epochs} epochs (~{total_steps} steps)", run_dir)

    last_saved = step if resumed else -1
    while not _finished(config, step, stream.position.epoch):
        for micro_rows in stream.epoch_steps():
            start = time.perf_counter()
            batches = [build(rows) for rows in micro_rows]
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves on after it)
            record = _train_step(module, optimizer, batches, config, world)
            scheduler.step()
            step += 1
            synchronize(device)
            elapsed = time.perf_counter() - start
            record.update(step=step, epoch=stream.position.epoch, lr=lr,
                          step_time_s=elapsed, frames_per_s=record["frames"] / elapsed,
                          peak_memory_bytes=peak_memory_bytes(device))
            if step % t.log_interval == 0:
                metrics.write(record)
                board.train(record)
            evaluation = evaluator.run(step, module) if evaluator and evaluator.due(step) else None
            if step % config.checkpoint.interval == 0 or (evaluation and evaluation.new_best):
                _save(run_dir, step, module, optimizer, scheduler, stream, config)
                last_saved = step
            if evaluation:
                evaluator.mark_best(evaluation)  # a new lowest eval loss was just checkpointed
            if t.steps and step >= t.steps:
                break
        else:
            stream.next_epoch()
            if config.data.follow:
                break  # the plan is complete and every shard has been trained on
    evaluation = evaluator.run(step, module) if evaluator and evaluator.last_step != step else None
    # A position saved at the last step of an epoch resumes correctly: replanning that round finds it done.
    if last_saved != step:
        _save(run_dir, step, module, optimizer, scheduler, stream, config)
    if evaluation:
        evaluator.mark_best(evaluation)
    board.close()
    log.info("finished at step %d", step)
    dist.destroy_process_group()


def _setup_logging(rank: int) -> None:
    """Our own logger only: the root logger at INFO would echo every transformers config message."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s"))
    log.handlers[:] = [handler]  # training.* module loggers propagate here
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


def _finished(config: Config, step: int, epoch: int) -> bool:
    if config.train.steps:
        return step >= config.train.steps
    return epoch >= config.train.epochs


def _estimate_total_steps(config: Config, stream: ShardStream) -> int:
    """For the cosine schedule when only epochs are given: a plan over the shards published now."""
    if config.data.follow:
        log.warning("data.follow without train.steps: the data size is unknown, so the lr stays constant "
                    "after warmup; set train.steps for a cosine decay")
        return 0
    probe = ShardStream(config.data, stream.tokenize, stream.seed, stream.rank, stream.world, stream.grad_accum,
                        stream.agree)
    probe.verbose = False
    probe.row_filter = stream.row_filter
    return sum(1 for _ in probe.epoch_steps()) * config.train.epochs


def _save(run_dir, step, module, optimizer, scheduler, stream, config) -> None:
    checkpoint.save(run_dir, step, module, optimizer, scheduler, {"data": stream.position.to_dict()},
                    config.checkpoint.keep)
    log.info("saved %s", run_dir / checkpoint.step_dir_name(step))


def _train_step(module, optimizer, batches, config: Config, world: int) -> dict:
    """One optimizer step over this rank's micro-batches; the loss is a token mean over all ranks' batches."""
    t = config.train
    device = batches[0].labels.device  # collectives run on the accelerator under nccl/hccl
    local = torch.tensor([[float((b.labels != IGNORE).sum()), float(b.frames[:, 1:].numel()), float(b.num_frames)]
                          for b in batches], dtype=torch.float32).sum(0).to(device)
    dist.all_reduce(local)
    talker_targets, sub_targets, frames = local.tolist()
    sums = torch.zeros(2, dtype=torch.float32, device=device)
    for i, batch in enumerate(batches):
        module.set_requires_gradient_sync(i == len(batches) - 1)
        out = module(batch)
        # FSDP averages gradients over ranks; scaling by world makes the result the global token mean.
        loss = (out.talker_loss_sum / talker_targets + t.sub_talker_weight * out.sub_loss_sum / sub_targets) * world
        loss.backward()
        sums += torch.stack([out.talker_loss_sum.detach(), out.sub_loss_sum.detach()]).float()
    max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(sums)
    talker_loss, sub_loss = sums[0].item() / talker_targets, sums[1].item() / sub_targets
    return dict(loss=talker_loss + t.sub_talker_weight * sub_loss, talker_loss=talker_loss, sub_talker_loss=sub_loss,
                grad_norm=float(grad_norm), frames=int(frames), micro_batches=len(batches))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see training/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-5")
    args = parser.parse_args(argv)
    train(load_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
