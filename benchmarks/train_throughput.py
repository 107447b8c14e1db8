"""Training throughput on CPU, before/after, side by side in one run: frames/s of a reduced-depth model of the
1.7B's widths (every hidden size of the released model, `--layers` talker layers, the full 5-layer code
predictor; random weights, benchmarks/model_1p7b.py) on the same shards with a realistic length mix, and the
achieved FLOP/s as a fraction of this machine's fp32 matmul FLOP/s, measured in the same run.

    python benchmarks/train_throughput.py --json throughput.json
    python benchmarks/train_throughput.py --skip-unpacked   # before and after only (~20 min here)

Flows: "before" = another revision's training code (default: main just before packing landed: right-padded,
bucketed micro-batches, per-step syncs);
"after, unpacked" = this checkout with data.packing=false (the same layout, the new loop);
"after, packed" = this checkout as shipped. One rank, fp32, sdpa, no activation checkpointing.
FLOP/s are training FLOPs of the useful work (training.train.flops: every packed position, code-predictor
positions and heads; padding not counted); for "before" they are its frames/s times the useful FLOPs per
frame the packed flow measured on the same shards.
"""
from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/X.py` from anywhere

from benchmarks import inputs  # noqa: E402
from benchmarks.common import GIB, REPO, base_parser, machine_info, markdown_table, ratio, write_json  # noqa: E402
from benchmarks.train_runs import BEFORE, export_revision, run_training  # noqa: E402


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--layers", type=int, default=2, help="talker layers (28 in the released 1.7B)")
    p.add_argument("--frame-budget", type=int, default=256, help="positions per micro-batch")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the averages")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training process and the matmul")
    p.add_argument("--before", default=BEFORE, help="git revision of the 'before' code ('' to skip it)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per flow")
    p.add_argument("--memory-limit-gib", type=float, default=17.0, help="stop a flow whose process tree exceeds "
                   "this (2 talker layers: ~10 GiB of fp32 weights, gradients and AdamW state, 13.5 GiB peak)")
    p.add_argument("--skip-unpacked", action="store_true", help="leave out the 'after, unpacked' flow")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.skip_unpacked = 2, True
    return args


def matmul_gflops(threads: int, size: int = 2048, seconds: float = 5.0) -> float:
    """Best fp32 GFLOP/s of size^3 matmuls over about `seconds` (this process, `threads` threads)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best / 1e9


def plan_padding(rows: int = 20_000, seed: int = 0) -> list[dict]:
    """Micro-batches and padded share of computed positions when planning `rows` utterances of the speech mix
    (3-40 words ~ 4-50 text tokens) at the shipped 1.7B config's budget, packed and unpacked: no model needed."""
    import random

    import numpy as np

    from benchmarks.inputs import REALISTIC_LENGTHS
    from training.data.packing import batch_shape, plan_packed, plan_unpacked

    rng = np.random.default_rng(seed)
    lengths = [-(-int(REALISTIC_LENGTHS.seconds(rng) * 24_000) // 1920) + int(rng.integers(4, 51)) + 11
               for _ in range(rows)]
    layouts = {"packed, 16384 / rows of 4096": plan_packed(lengths, 16384, 4096, random.Random(seed)),
               "packed, 16384 / one row": plan_packed(lengths, 16384, 0, random.Random(seed)),
               "unpacked, 16384, <= 32 rows (main before)": plan_unpacked(lengths, 16384, 32, 512, random.Random(seed)),
               "unpacked, 16384, <= 1024 rows": plan_unpacked(lengths, 16384, 1024, 512, random.Random(seed))}
    out = []
    for name, plans in layouts.items():
        shapes = [batch_shape([[lengths[i] for i in seq] for seq in plan], [[0] * len(seq) for seq in plan])
                  for plan in plans]
        computed = sum(s.positions for s in shapes)
        out.append(dict(layout=name, micro_batches=len(plans), positions_per_micro_batch=computed / len(plans),
                        padding=sum(s.padding for s in shapes) / computed))
    return out


def summarise(name: str, run, warmup: int) -> dict:
    timed = run.records[warmup:]
    row = dict(flow=name, status="ok" if timed else f"failed (exit {run.returncode})", peak_rss_gib=run.peak_rss_gib)
    if not timed:
        print(run.log_tail, flush=True)
        return row
    seconds = sum(r["step_time_s"] for r in timed)
    row.update(steps=len(timed), frames_per_s=sum(r["frames"] for r in timed) / seconds,
               step_s=statistics.median(r["step_time_s"] for r in timed), frames_per_step=statistics.mean(
                   r["frames"] for r in timed))
    if "tflops" in timed[0]:
        row.update(gflops=1e3 * sum(r["tflops"] * r["step_time_s"] for r in timed) / seconds,
                   padding=sum(r["padding_fraction"] * r["tokens"] for r in timed) / sum(r["tokens"] for r in timed),
                   data_wait_s=statistics.mean(r["data_wait_s"] for r in timed))
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    peak_before = matmul_gflops(args.threads)
    model = inputs.model_1p7b(args.work_dir, args.layers)
    shards = inputs.train_shards(args.work_dir, 2, 400, inputs.REALISTIC_LENGTHS)
    flows = [("after, packed", REPO, ["data.pack_length=0"])]
    if not args.skip_unpacked:
        flows.append(("after, unpacked", REPO, ["data.packing=false", "data.pack_length=0"]))
    if args.before:
        flows.insert(0, ("before", export_revision(args.before, args.work_dir), []))
    common = [f"model.path={model}", f"data.shards={shards}", f"train.steps={args.steps}", "train.device=cpu",
              "train.grad_accum=1", "train.log_interval=1", "train.warmup_steps=0", "checkpoint.interval=1000000",
              "fsdp.param_dtype=float32", "fsdp.activation_checkpointing=false", "model.attn_implementation=sdpa",
              f"data.frame_budget={args.frame_budget}"]
    rows = []
    for name, code, extra in flows:
        run_dir = args.work_dir / "runs" / f"throughput-{name.replace(', ', '-')}"
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[{name}] training from {code}", flush=True)
        run = run_training(name, code, code / "training/configs/qwen3tts_1.7b.yaml",
                           [*common, f"checkpoint.dir={run_dir}", *extra], run_dir, args.steps, args.threads,
                           args.timeout, int(args.memory_limit_gib * GIB))
        rows.append(summarise(name, run, args.warmup))
        print(f"[{name}] {rows[-1]}", flush=True)
    peak = max(peak_before, matmul_gflops(args.threads))
    packed = next((r for r in rows if r["flow"] == "after, packed" and "gflops" in r), None)
    per_frame = packed["gflops"] / packed["frames_per_s"] if packed else None
    for row in rows:
        if "gflops" not in row and per_frame and "frames_per_s" in row:
            row["gflops"] = row["frames_per_s"] * per_frame  # useful work at the packed flow's FLOPs per frame
        row["of_matmul_peak"] = row["gflops"] / peak if row.get("gflops") else None
    print()
    print(f"fp32 matmul ({args.threads} threads, 2048^3): {peak:.1f} GFLOP/s (best of before/after the flows)")
    print(markdown_table(["flow", "status", "frames/s", "step s (median)", "frames/step", "padding", "data wait s",
                          "useful GFLOP/s", "of matmul peak", "tree RSS GiB"],
                         [[r["flow"], r["status"], r.get("frames_per_s"), r.get("step_s"), r.get("frames_per_step"),
                           r.get("padding"), r.get("data_wait_s"), r.get("gflops"), r.get("of_matmul_peak"),
                           r["peak_rss_gib"]] for r in rows]))
    planning = plan_padding()
    print()
    print("Planning 20,000 utterances of the speech mix at the 1.7B config's budget (16384 positions):")
    print(markdown_table(["layout", "micro-batches", "positions per micro-batch", "padding"],
                         [[p["layout"], p["micro_batches"], p["positions_per_micro_batch"], p["padding"]]
                          for p in planning]))
    ok = {r["flow"]: r for r in rows if "frames_per_s" in r}
    for name in ("after, unpacked", "after, packed"):
        if name in ok and "before" in ok:
            print(f"{name} / before: frames/s x{ratio(ok[name]['frames_per_s'], ok['before']['frames_per_s']):.2f}")
    write_json(args.json, {"benchmark": "train_throughput", "machine": machine_info(), "args": vars(args) | {
        "work_dir": str(args.work_dir), "json": str(args.json)}, "matmul_gflops": peak, "results": rows,
                "planning": planning})


if __name__ == "__main__":
    main()
