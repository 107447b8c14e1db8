"""Fine-tune Qwen3-TTS on encoded shards with FSDP2.

    torchrun --nproc_per_node 8 -m training.train --config training/configs/qwen3tts_1.7b.yaml \\
        data.shards=/data/encoded model.path=/models/Qwen3-TTS-12Hz-1.7B-Base

Restarting the same command resumes from the newest complete checkpoint in checkpoint.dir.

The input of the next steps is prepared in a background thread (training.data.prefetch) while the current step
runs. A step issues no device->host synchronisation: the token counts that normalise the loss come from
the plan (every rank plans every rank's micro-batches), loss sums and the gradient norm stay on the device,
and they are read once per train.log_interval steps, for the metrics line.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from shared.device import peak_memory_bytes, select_device
from shared.qwen import load_tts_model
from shared.quiet import quiet_fds
from shared.shard_index import ShardIndex
from training.checkpoint import step_folders as checkpoint, object_store as remote_checkpoint
from training.speakers import custom_voice
from training.model import lora
from training.data import rehearsal
from training.train.board import Board
from training.config import Config, dump_config
from training.data.corpus_index import ShardFigures, load_corpus_index, shard_figures
from training.data.stream import DataPosition, RoundChanged, ShardStream, Step, resolve_output_dir
from training.eval.evaluator import evaluator_for
from training.train.flops import FlopModel, accelerator_name, peak_tflops
from training.model.layout import SpecialIds, TalkerBatch
from training.train.metrics import MetricsLog, Throughput
from training.model.talker import TalkerForTraining
from training.model.parallelize import build_mesh, parallelize
from training.data.prefetch import Prefetcher
from training.speakers.reference import SpeakerTable
from training.checkpoint.resume import plan_settings
from training.train.schedule import SampleSchedule
from training.data.samples import SampleBuilder
from training.data.split import HeldOut, check_same_rule, training_rows
from training.data.trace import RowTrace, drop_after
from training.train.validate import EXIT_CODE, validate_or_exit

log = logging.getLogger("training")


def init_distributed(preference: str, timeout_minutes: float = 30.0):
    """The device, and the rendezvous store (the data stream agrees on shard listings through it). A collective
    that waits more than timeout_minutes (a rank gone, or rank 0 still synthesising eval samples) fails the run."""
    if "RANK" not in os.environ:  # plain `python -m training.train`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    device = select_device(preference, int(os.environ["LOCAL_RANK"]))
    # torchrun --max-restarts hands the restarted ranks the same store as the failed attempt (torch 2.9): without
    # a per-attempt prefix they read the dead ranks' addresses and never connect (gloo/nccl "connection refused").
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    with quiet_fds(1):  # gloo prints "[Gloo] Rank r is connected to ..." per rank to stdout; errors still raise
        dist.init_process_group(backend=device.backend, store=attempt, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return device, dist.PrefixStore("data", attempt)


@dataclass
class PreparedStep:
    step: Step
    batches: list[TalkerBatch]  # this rank's micro-batches on the host (pinned for an accelerator)


def prepared_steps(stream: ShardStream, builder: SampleBuilder, config: Config, pin: bool) -> Iterator[PreparedStep]:
    """Every step of the run from the stream's position on: shard reads, samples, collation, pinning."""
    while True:
        taken = 0
        for step in stream.epoch_steps():
            batches = [builder.collate(mb) for mb in step.micro_batches]
            yield PreparedStep(step, [b.pin_memory() for b in batches] if pin else batches)
            taken += 1
        if taken == 0 and not stream.position.consumed and stream.position.epoch == 0:
            raise ValueError(f"no trainable rows under {stream.output}: every row is an error row or lacks "
                             f"frames{' or ref_audio' if builder.needs_reference else ''}; check the encode output "
                             "(errors.jsonl)")
        stream.next_epoch()
        if config.data.follow or (not config.train.steps and stream.position.epoch >= config.train.epochs):
            return


def train(config: Config) -> None:
    device, store = init_distributed(config.train.device, config.train.timeout_minutes)
    rank, world = dist.get_rank(), dist.get_world_size()
    _setup_logging(rank)
    run_dir = config.checkpoint.logs()  # logs; checkpoints go to checkpoint_dir (a path, or an s3:// URI)
    checkpoint_dir = config.checkpoint.location()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        check_same_rule(run_dir, HeldOut.from_config(config.eval))  # before config.yaml is replaced
    torch.manual_seed(config.train.seed)

    attention = config.for_chip(device)  # fails here on a chip without the config's dtypes
    model = load_tts_model(config.model.path, "cpu", torch.float32, attention)
    speakers, figures, index = _corpus(config, SpecialIds.from_config(model.config), rank, store, run_dir)
    # CustomVoice model.path: rank 0 plans the speaker rows from the same index
    voices, speaker_encoder = custom_voice.start(config, model, run_dir, rank, store, index)
    builder = SampleBuilder.for_model(config.model.path, model, device.torch_device, speakers, voices,
                                      speaker_encoder)
    # built before the model moves to the device: rank 0 may load a copy of the base model to synthesise it
    rehearsed = rehearsal.start(config, voices, builder, rank, device.torch_device)
    module = TalkerForTraining(model.talker)
    flops = FlopModel.of(module.talker)  # counted before sharding: FSDP leaves each rank a slice
    rows = lora.speaker_rows(config, voices)  # LoRA on a CustomVoice model: the new speakers' rows train too
    adapters = lora.apply(module, config, rows)  # before sharding and before the move: frozen weights shrink first
    module = module.to(device.torch_device).train()
    del model
    parallelize(module, config.fsdp, build_mesh(device))
    lora.check_sharded(module, config)
    if adapters:
        log.info("%s", adapters)
    t = config.train
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    files = lora.checkpoint_files(config, rows)  # a LoRA run's step folders name their base weights

    stream = ShardStream(config.data, builder, t.seed, rank, world, t.grad_accum, store)
    stream.figures = figures
    stream.rehearsal = rehearsed
    if config.eval.enabled:  # held-out rows are never trained on
        stream.row_filter = training_rows(HeldOut.from_config(config.eval))
    per_step = world * t.grad_accum
    schedule = SampleSchedule(optimizer, t, per_step)

    step = 0
    resumed = checkpoint.load_latest(checkpoint_dir, module, optimizer, schedule)
    if resumed:  # an older checkpoint's per-rank position counted steps of this layout (the same world size)
        step, stream.position = resumed["step"], DataPosition.from_dict(resumed["data"], legacy_per_step=per_step)
    stream.check_round()  # a resume into a round that now plans differently is refused here
    if rank == 0:
        dump_config(config, run_dir / "config.yaml")
        if not isinstance(checkpoint_dir, Path):  # export reads the run's config next to its checkpoints
            remote_checkpoint.write_bytes(remote_checkpoint.join(checkpoint_dir, "config.yaml"),
                                          (run_dir / "config.yaml").read_bytes())
    position = stream.position
    schedule.total = _planned_micro_batches(config, stream, schedule, step, per_step)
    trace = RowTrace(run_dir, rank, config.data.trace_rows)
    if config.data.trace_rows:
        if rank == 0:
            drop_after(run_dir, step)
        dist.barrier()
    metrics = MetricsLog(run_dir, rank == 0)
    board = Board(run_dir, rank == 0, step)
    evaluator = evaluator_for(config, run_dir, builder, metrics, board, device.torch_device)
    peak = peak_tflops(accelerator_name(device.kind), t.peak_tflops)
    log.info("training on %s x %d (%s), %s, run dir %s, peak %s TFLOP/s", device.describe(), world, device.backend,
             f"{t.steps} steps" if t.steps else f"{t.epochs} epochs (~{schedule.total} micro-batches)", run_dir,
             peak or "unknown (mfu not computed; set train.peak_tflops)")

    last_saved = step if resumed else -1
    inputs = Prefetcher(prepared_steps(stream, builder, config, pin=device.kind != "cpu"), config.data.prefetch_steps)
    meter = Throughput(flops, world, peak)
    try:
        for prepared in ([] if t.steps and step >= t.steps else inputs):
            batches = [b.to(device.torch_device) for b in prepared.batches]
            lr = schedule.step(prepared.step.trained_micro_batches)  # the rate of this step, by data consumed
            sums, grad_norm = _train_step(module, optimizer, batches, prepared.step, config, world)
            step += 1
            position = prepared.step.position
            trace.write(step, prepared.step)
            counts = meter.add(prepared.step, inputs.wait_s)
            if step % t.log_interval == 0:
                record = (_record(sums, grad_norm, prepared.step, config) | counts | meter.rates()
                          | dict(step=step, epoch=position.epoch, lr=lr, consumed_micro_batches=schedule.consumed,
                                 peak_memory_bytes=peak_memory_bytes(device)))
                if rehearsed is not None:  # rows of the step that rehearsed a built-in speaker (all ranks)
                    record["rehearsal"] = prepared.step.rehearsal_rows
                metrics.write(record)
                board.train(record)
            evaluation = evaluator.run(step, module) if evaluator and evaluator.due(step) else None
            if step % config.checkpoint.interval == 0 or (evaluation and evaluation.new_best):
                _save(checkpoint_dir, step, module, optimizer, schedule, position, config, files)
                last_saved = step
            if evaluation:
                evaluator.mark_best(evaluation)  # a new lowest eval loss was just checkpointed
            if evaluation or last_saved == step:
                meter.restart_clock()
            if t.steps and step >= t.steps:
                break
    finally:
        inputs.close()
    evaluation = evaluator.run(step, module) if evaluator and evaluator.last_step != step else None
    # A position saved at the last step of an epoch resumes correctly: replanning that round finds it done.
    if last_saved != step:
        _save(checkpoint_dir, step, module, optimizer, schedule, position, config, files)
    if evaluation:
        evaluator.mark_best(evaluation)
    board.close()
    log.info("finished at step %d", step)
    dist.destroy_process_group()


def _corpus(config: Config, ids: SpecialIds, rank: int, store: dist.Store,
            run_dir: Path) -> tuple[SpeakerTable, ShardFigures, ShardIndex | None]:
    """The shards' speakers and per-shard figures (for the step estimate), from the shard index that rank 0
    loads, on every rank (all must average the same references; exchanged through the store, as the stream's
    shard listings are), with every manifest language checked against the model before any step runs; and
    that index on rank 0 (None elsewhere)."""
    if rank == 0:
        index = load_corpus_index(resolve_output_dir(config.data.shards), run_dir)
        needs_reference = custom_voice.needs_reference(config)
        table, figures = SpeakerTable.from_index(index, needs_reference), shard_figures(index, needs_reference)
        store.set("corpus", pickle.dumps((table, figures)))
    else:
        table, figures, index = *pickle.loads(store.get("corpus")), None
    for language in sorted(table.languages):
        ids.codec_prefix(language)  # raises, naming the language and the model's languages
    log.info("speakers: %s", ", ".join(f"{k or '(unnamed)'}: {len(v)} reference(s)"
                                       for k, v in sorted(table.references.items(), key=lambda kv: kv[0] or "")))
    return table, figures, index


def _setup_logging(rank: int) -> None:
    """Our own logger only: the root logger at INFO would echo every transformers config message."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s"))
    log.handlers[:] = [handler]  # training.* module loggers propagate here
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


def _planned_micro_batches(config: Config, stream: ShardStream, schedule: SampleSchedule, step: int,
                           per_step: int) -> int:
    """The schedule's end, in global micro-batches: epochs x an epoch's plan (see
    ShardStream.estimate_micro_batches_per_epoch; the same on any layout), or with train.steps what the steps
    left take on this layout after what was consumed (a resume on the layout that planned it keeps its total:
    padding repeats make a step train fewer than world x grad_accum new micro-batches, so re-deriving it would
    move the curve); 0 (no decay) in follow mode without train.steps."""
    if config.train.steps:
        if schedule.total and schedule.planned_per_step == per_step:
            return schedule.total
        return schedule.consumed + max(0, config.train.steps - step) * per_step
    if config.data.follow:
        log.warning("data.follow without train.steps: the data size is unknown, so the lr stays constant "
                    "after warmup; set train.steps for a cosine decay")
        return 0
    return stream.estimate_micro_batches_per_epoch() * config.train.epochs


def _save(run_dir, step, module, optimizer, schedule, position: DataPosition, config: Config, files: dict) -> None:
    extra = {"data": position.to_dict(), "plan_settings": plan_settings(config)}
    log.info("saved %s", checkpoint.save(run_dir, step, module, optimizer, schedule, extra, config.checkpoint.keep,
                                         files))


def _train_step(module, optimizer, batches: list[TalkerBatch], step: Step, config: Config, world: int):
    """One optimizer step over this rank's micro-batches; the loss is a token mean over all ranks' batches.
    Returns the (talker, sub-talker) loss sums of this rank and the gradient norm, on the device."""
    t = config.train
    talker_targets, sub_targets = step.total("talker_targets"), step.total("sub_targets")  # every rank's
    sums = torch.zeros(2, dtype=torch.float32, device=batches[0].frames.device)
    for i, batch in enumerate(batches):
        module.set_requires_gradient_sync(i == len(batches) - 1)
        out = module(batch)
        # FSDP averages gradients over ranks; scaling by world makes the result the global token mean.
        loss = (out.talker_loss_sum / talker_targets + t.sub_talker_weight * out.sub_loss_sum / sub_targets) * world
        loss.backward()
        sums += torch.stack([out.talker_loss_sum.detach(), out.sub_loss_sum.detach()]).float()
    max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], max_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm


def _record(sums: torch.Tensor, grad_norm: torch.Tensor, step: Step, config: Config) -> dict:
    """The losses of a logged step: one collective and the loop's one device->host copy."""
    dist.all_reduce(sums)
    talker_sum, sub_sum, norm = torch.cat([sums, grad_norm.reshape(1).float()]).tolist()
    talker_loss, sub_loss = talker_sum / step.total("talker_targets"), sub_sum / step.total("sub_targets")
    return dict(loss=talker_loss + config.train.sub_talker_weight * sub_loss, talker_loss=talker_loss,
                sub_talker_loss=sub_loss, grad_norm=norm)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see training/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-5")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config = validate_or_exit(args.config, args.overrides)  # one line and exit 2 on a bad input, nothing written
    try:
        train(config)
    except RoundChanged as exc:  # found once the round in progress is re-planned; every rank finds it
        if dist.get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CODE)
