"""Where an encoder's time goes: services.encode.encoder.ShardEncoder driven in-process (no Ray) over a planned corpus,
with each phase of encode_shard timed in place.

    python benchmarks/encoder_profile.py --quick
    python benchmarks/encoder_profile.py --device cuda --shard-size 38 --json out/profile.json

Phases: reading the shard's manifest range; probing headers for durations; waiting for decoded clips (decode +
resample that the prefetch did not hide); the codec (shared.qwen.encode_clips, synchronous); publishing the
Parquet shard; the rest (rows, bookkeeping). Anything but "codec" is time the device waits. Also prints how
much padding the encoder's batches carry against one length sort over the whole corpus (what the codec
ceiling of encode_bench.py batches).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/X.py` from anywhere

from benchmarks import inputs  # noqa: E402
from benchmarks.common import (add_corpus_args, base_parser, machine_info, markdown_table, ratio,  # noqa: E402
                               resolve_device, timed_calls, write_json)

PHASES = ("manifest read", "header probe", "decode wait", "codec", "publish", "other")


def parse_args(argv=None):
    p = base_parser(__doc__)
    add_corpus_args(p, clips=120)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--max-batch-seconds", type=float, default=240.0)
    p.add_argument("--max-batch-items", type=int, default=64)
    p.add_argument("--cpu-max-batch-seconds", type=float, default=0.0, help="the encoder's CPU cap (0: its default; "
                   "240 with THP_MEM_ALLOC_ENABLE=0 in the environment reproduces the encoder before that change)")
    p.add_argument("--decode-threads", type=int, default=0, help="0: the encoder's default for the device")
    args = p.parse_args(argv)
    if args.quick:
        args.clips, args.max_seconds = min(args.clips, 24), min(args.max_seconds, 6.0)
    return args


class _TimedFuture:
    def __init__(self, future, phases: dict):
        self.future, self.phases = future, phases

    def result(self):
        start = time.perf_counter()
        try:
            return self.future.result()
        finally:
            self.phases["decode wait"] += time.perf_counter() - start


def instrument(encoder, phases: dict) -> None:
    """Wrap the encoder's collaborators in place; encode_shard itself runs unchanged."""
    import services.encode.encoder as encoder_module
    import shared.qwen

    encoder_module.read_range = timed_calls(phases, "manifest read", encoder_module.read_range)
    shared.qwen.encode_clips = timed_calls(phases, "codec", shared.qwen.encode_clips)  # imported at call time
    encoder.prefetcher.map = timed_calls(phases, "header probe", encoder.prefetcher.map)
    encoder.writer.publish = timed_calls(phases, "publish", encoder.writer.publish)
    run = encoder.prefetcher.run

    def timed_run(batches, load):
        for batch, futures in run(batches, load):
            yield batch, [_TimedFuture(f, phases) for f in futures]
    encoder.prefetcher.run = timed_run


def padding_factors(manifest: Path, shard_size: int, budget: float, items: int) -> dict:
    """Padded seconds / audio seconds of the batches per shard (the encoder) and over the whole corpus."""
    import json

    from services.encode.batching import form_batches, probe_duration

    durations = [probe_duration(json.loads(line)["audio"]) for line in manifest.read_text().splitlines()]
    padded = lambda ds: sum(max(ds[i] for i in b) * len(b) for b in form_batches(ds, budget, items))
    per_shard = sum(padded(durations[s:s + shard_size]) for s in range(0, len(durations), shard_size))
    return {"per_shard": per_shard / sum(durations), "whole_corpus": padded(durations) / sum(durations)}


def main(argv=None) -> None:
    from services.encode.encoder import EncoderOptions, ShardEncoder, batch_seconds_for
    from services.encode.plan import prepare_plan

    args = parse_args(argv)
    device = resolve_device(args.device)
    manifest, total = inputs.corpus(args.work_dir, args.clips, args.min_seconds, args.max_seconds)
    codec = inputs.codec(args.work_dir, args.codec_size)
    output = args.work_dir / "runs" / "encoder-profile"
    shutil.rmtree(output, ignore_errors=True)
    plan = prepare_plan(output, manifest, codec, args.shard_size, log=lambda *_: None)
    options = EncoderOptions(codec=str(codec), output=str(output), placement=device["kind"],
                             max_batch_seconds=args.max_batch_seconds, max_batch_items=args.max_batch_items,
                             decode_threads=args.decode_threads, torch_threads=args.threads,
                             **({"cpu_max_batch_seconds": args.cpu_max_batch_seconds} if args.cpu_max_batch_seconds else {}))
    started = time.perf_counter()
    encoder = ShardEncoder(options)
    load_s = time.perf_counter() - started
    phases = {name: 0.0 for name in PHASES}
    instrument(encoder, phases)
    started = time.perf_counter()
    audio = sum(encoder.encode_shard(spec).audio_seconds for spec in plan.shards)
    elapsed = time.perf_counter() - started
    phases["other"] = elapsed - sum(phases.values())
    budget = batch_seconds_for(options, device["kind"])
    padding = padding_factors(manifest, args.shard_size, budget, args.max_batch_items)
    print(f"{args.clips} clips, {total:.0f} s of audio in {len(plan.shards)} shards of {args.shard_size}; codec "
          f"{args.codec_size} on {device['kind']}; {budget:g} padded s per call; THP_MEM_ALLOC_ENABLE="
          f"{os.environ.get('THP_MEM_ALLOC_ENABLE')}; encoder start {load_s:.1f} s")
    print()
    print(markdown_table(["phase", "seconds", "share of encode time"],
                         [[name, phases[name], f"{100 * phases[name] / elapsed:.1f}%"] for name in PHASES]
                         + [["total", elapsed, "100%"]]))
    print(f"encoder: {audio / elapsed:.1f} audio-s/s; codec alone within it: {audio / phases['codec']:.1f} audio-s/s")
    print(f"padding (padded / audio seconds): {padding['per_shard']:.3f} with per-shard batches, "
          f"{padding['whole_corpus']:.3f} with one sort over the corpus (x{ratio(padding['per_shard'], padding['whole_corpus']):.3f} codec work)")
    write_json(args.json, {"benchmark": "encoder_profile", "machine": machine_info(device),
                           "args": {k: str(v) for k, v in vars(args).items()}, "audio_seconds": audio,
                           "encode_seconds": elapsed, "phases": phases, "padding": padding, "start_seconds": load_s})


if __name__ == "__main__":
    main()
