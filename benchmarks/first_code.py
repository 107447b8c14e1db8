"""Time to the first code, and the whole small job: the upstream-style script against `python -m services.encode`,
each a whole process from its start to its exit, side by side in one run.

    python benchmarks/first_code.py                     # 40 clips of 1-5 s, released-size random codec, CPU
    python benchmarks/first_code.py --clips 40 --repeats 5 --json out/first_code.json

  (a32) upstream: `benchmarks.encode_flows reference`, sequential batches of 32 paths through
      Qwen3TTSTokenizer.encode, as upstream's finetuning/prepare_data.py ships (BATCH_INFER_NUM = 32): imports,
      codec load, encode, JSONL at the end;
  (a8) the same with batches of 8, which run faster on a CPU (smaller padded calls): the kinder baseline;
  (b) the encode job with its defaults on this machine (one CPU encoder, private local Ray, shards of 256
      rows: one shard for 40 clips);
  (c) the same job with shards of --shard-size rows, so that the first published shard marks the first codes.
For (b) and (c) the job's own log gives its phases (Ray ready, plan, first encoder ready); the first code is the
modification time of the first published shard. For (a), start-up is its wall time less its encode phase.
Each round runs every flow in turn; the ratios are the medians over --repeats rounds, because this shared
machine's speed changes by ±20 % from one minute to the next. Target: (a32)'s wall time over (b)'s >= 1.5 (the
issue's "upstream script"); a8/b is printed beside it.
"""
from __future__ import annotations

import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/X.py` from anywhere

from benchmarks import inputs  # noqa: E402
from benchmarks.common import (add_corpus_args, base_parser, child_env, machine_info, markdown_table,  # noqa: E402
                               evict_from_page_cache, parse_last, parse_result, python, ratio, ratio_lines,
                               resolve_device, run_measured, write_json)

PHASES = {  # the job's log lines that end each phase, seconds since the driver started
    "ray_ready_s": r"Ray ready after ([\d.]+) s",
    "first_encoder_ready_s": r"first encoder ready ([\d.]+) s after the driver started",
}
# The tree sampler walks /proc for every process of the tree: (b) runs a dozen (Ray's daemons), (a) one, so a fast
# sampler takes CPU from (b) on a 2-core machine. Only CPU seconds are read from it here, not memory peaks.
SAMPLE_SECONDS = 0.5
PLANNED = r"planned in ([\d.]+) s"
THROUGHPUT = r"throughput this run: \d+ shards in ([\d.]+) s"
FIRST_PROGRESS = r"progress rows=\d+ audio_seconds=[\d.]+ elapsed=([\d.]+)"


def parse_args(argv=None):
    p = base_parser(__doc__)
    add_corpus_args(p, clips=40)
    p.set_defaults(max_seconds=5.0, device="cpu")
    p.add_argument("--shard-size", type=int, default=4, help="(c) rows per shard")
    p.add_argument("--reference-batches", default="32,8", help="(a<N>) paths per Qwen3TTSTokenizer.encode call; "
                   "the first is upstream's own")
    p.add_argument("--cold-codec", action="store_true", help="drop the codec's weight files from the page cache "
                   "before every flow (posix_fadvise DONTNEED): a node's first job, or weights on network storage")
    p.add_argument("--repeats", type=int, default=3, help="rounds of every flow; the ratios are their medians")
    p.add_argument("--timeout", type=float, default=1800.0)
    return p.parse_args(argv)


def upstream(args, manifest: Path, codec: Path, runs: Path, env: dict, device: str, batch: int) -> dict:
    label = f"a{batch}"
    if args.cold_codec:
        evict_from_page_cache(codec)
    command = [python(), "-m", "benchmarks.encode_flows", "reference", "--manifest", str(manifest), "--codec",
               str(codec), "--device", device, "--threads", str(args.threads), "--batch", str(batch),
               "--output", str(runs / f"first-code-reference-{batch}.jsonl")]
    print(f"[{label}] {' '.join(command)}", flush=True)
    measured = run_measured(command, env, args.timeout, interval=SAMPLE_SECONDS, log_to=runs / f"first-code-{label}")
    result = parse_result(measured.stdout)
    if measured.returncode != 0 or result is None:
        raise SystemExit(f"({label}) failed: {measured.tail()}")
    start_up = measured.wall_s - result["encode_seconds"]
    first_batch = float(re.search(FIRST_PROGRESS, measured.stdout)[1])  # the first batch's end
    return {"flow": f"({label}) upstream-style script, batch {batch}", "wall_s": measured.wall_s,
            "start_up_s": start_up,
            "first_code_s": start_up + first_batch, "encode_s": result["encode_seconds"],
            "codec_load_s": result["load_seconds"], "cpu_s": measured.cpu_s}


def job(args, manifest: Path, codec: Path, runs: Path, env: dict, device: str, label: str,
        shard_size: int | None) -> dict:
    from shared.schema import published_shards

    if args.cold_codec:
        evict_from_page_cache(codec)
    output = runs / f"first-code-job-{label}"
    shutil.rmtree(output, ignore_errors=True)
    command = [python(), "-m", "services.encode", "--manifest", str(manifest), "--codec", str(codec), "--output",
               str(output), "--device", device, "--cpus-per-encoder", str(args.threads), "--status-port", "-1",
               "--progress-seconds", "60"]
    if shard_size:
        command += ["--shard-size", str(shard_size)]
    print(f"[{label}] {' '.join(command)}", flush=True)
    started = time.time()
    measured = run_measured(command, env, args.timeout, interval=SAMPLE_SECONDS, log_to=runs / f"first-code-{label}")
    if measured.returncode != 0:
        raise SystemExit(f"({label}) failed: {measured.tail()}")
    first_shard = min(p.stat().st_mtime for p in published_shards(output).values())
    phases = {name: float(parse_last(pattern, measured.stdout)[1]) for name, pattern in PHASES.items()}
    encode_s = float(parse_last(THROUGHPUT, measured.stdout)[1])
    flow = f"({label}) python -m services.encode" + (f" --shard-size {shard_size}" if shard_size else "")
    return {"flow": flow, "wall_s": measured.wall_s,
            "start_up_s": phases["first_encoder_ready_s"], "first_code_s": first_shard - started,
            "encode_s": encode_s, "plan_s": float(parse_last(PLANNED, measured.stdout)[1]), **phases,
            "cpu_s": measured.cpu_s}


def main(argv=None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    manifest, audio = inputs.corpus(args.work_dir, args.clips, args.min_seconds, args.max_seconds)
    codec = inputs.codec(args.work_dir, args.codec_size)
    runs = args.work_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    env = child_env(args.threads)
    info = machine_info(device)
    print(f"corpus: {args.clips} clips, {audio:.0f} s of audio ({args.min_seconds:g}-{args.max_seconds:g} s); codec "
          f"{args.codec_size}; device {device['kind']}; {args.threads} torch thread(s)", flush=True)
    batches = [int(b) for b in args.reference_batches.split(",")]
    rounds = []  # the flows take turns, so that a change in the machine's speed falls on all of them alike
    for number in range(1, args.repeats + 1):
        print(f"round {number} of {args.repeats}", flush=True)
        flows = {f"a{batch}": upstream(args, manifest, codec, runs, env, device["kind"], batch) for batch in batches}
        flows["b"] = job(args, manifest, codec, runs, env, device["kind"], "b", None)
        flows["c"] = job(args, manifest, codec, runs, env, device["kind"], "c", args.shard_size)
        rounds.append(flows)
    columns = ["round", "flow", "wall s", "start-up s", "first code s", "encode s", "CPU s"]
    print()
    print(markdown_table(columns, [[number, r["flow"], r["wall_s"], r["start_up_s"], r["first_code_s"], r["encode_s"],
                                    r["cpu_s"]] for number, flows in enumerate(rounds, 1) for r in flows.values()]))
    for number, flows in enumerate(rounds, 1):
        for label in ("b", "c"):
            r = flows[label]
            print(f"round {number} ({label}) phases, seconds since the driver started: Ray ready "
                  f"{r['ray_ready_s']:.1f}, plan (on a thread beside Ray's start) took {r['plan_s']:.1f}, first "
                  f"encoder ready {r['first_encoder_ready_s']:.1f}, first shard published {r['first_code_s']:.1f}")
    per_round = {}
    for batch in batches:
        a = f"a{batch}"
        per_round[f"{a}/b whole process"] = [ratio(f[a]["wall_s"], f["b"]["wall_s"]) for f in rounds]
        per_round[f"{a}/c whole process, small shards"] = [ratio(f[a]["wall_s"], f["c"]["wall_s"]) for f in rounds]
        per_round[f"{a}/c time to the first code"] = [ratio(f[a]["first_code_s"], f["c"]["first_code_s"])
                                                      for f in rounds]
    for name, values in per_round.items():
        print(f"{name}, each round: {', '.join(f'{v:.2f}' for v in values)}")
    checks = [(f"{name} (median of {len(values)})", statistics.median(values),
               1.5 if name.endswith("/b whole process") else None) for name, values in per_round.items()]
    for line in ratio_lines(checks):
        print(line)
    print(f"load average at start {info['loadavg_at_start']} on {info['nproc']} cores")
    write_json(args.json, {"benchmark": "first_code", "machine": info,
                           "args": {k: str(v) for k, v in vars(args).items()}, "audio_seconds": audio, "rounds": rounds, "ratios_per_round": per_round,
                           "ratios": {name: value for name, value, _ in checks}})

if __name__ == "__main__":
    main()
