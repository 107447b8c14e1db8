"""Training throughput: frames/s, step time and peak memory of `training.train` under torchrun, per variant
(ranks x parameter dtype x activation checkpointing), read from the run directory's metrics.jsonl.

    python benchmarks/train_bench.py --quick                          # tiny model, CPU, gloo
    python benchmarks/train_bench.py --json out/train.json            # tiny model, every variant
    python benchmarks/train_bench.py --model-size full --device cuda  # 1.7B-shaped model, MFU (accelerators)

The 1.7B-shaped model (random weights, benchmarks/model_1p7b.py) is skipped on CPU. MFU = achieved training
FLOP/s / peak FLOP/s: "shapes" is what the training job logs (training/train/flops.py, from each batch's real shapes),
the older two per-frame estimates (model_1p7b.training_flops_per_frame) are kept beside it; the peak comes from
--peak-tflops or training.train.flops's table of bf16 dense peaks by device name.
"""
from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/X.py` from anywhere

from benchmarks import inputs  # noqa: E402
from benchmarks.common import (GIB, REPO, base_parser, child_env, gib, machine_info, markdown_table, python,  # noqa: E402
                               ratio, resolve_device, run_measured, write_json)

CONFIGS = {"tiny": REPO / "training/configs/tiny.yaml", "full": REPO / "training/configs/qwen3tts_1.7b.yaml"}


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--model-size", choices=("tiny", "full"), default="tiny")
    p.add_argument("--ranks", default="", help="comma list (default: 1,2 on CPU; 1,N for N accelerators)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="fsdp.param_dtype values")
    p.add_argument("--checkpointing", default="off,on", help="fsdp.activation_checkpointing values")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the averages")
    p.add_argument("--threads-per-rank", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--rows-per-shard", type=int, default=0, help="0: 64 (tiny), 256 (full)")
    p.add_argument("--min-seconds", type=float, default=0.0, help="utterance lengths of the generated data "
                   "(0: 1-6 s for tiny, 3-15 s for full, so that full micro-batches are not mostly overhead)")
    p.add_argument("--max-seconds", type=float, default=0.0)
    p.add_argument("--frame-budget", type=int, default=0, help="data.frame_budget (0: the config's)")
    p.add_argument("--full-layers", type=int, default=28, help="talker layers of the full model (28 = 1.7B)")
    p.add_argument("--force-full-on-cpu", action="store_true", help="run --model-size full on CPU anyway "
                   "(with --full-layers 1: tries the full-size path on a small machine)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (0: from the table)")
    p.add_argument("--override", action="append", default=[], help="extra training override key=value")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per variant")
    p.add_argument("--memory-limit-gib", type=float, default=0.0,
                   help="stop a variant whose process tree exceeds this RSS (0: half of this machine's RAM)")
    args = p.parse_args(argv)
    tiny = args.model_size == "tiny"
    args.rows_per_shard = args.rows_per_shard or (64 if tiny else 256)
    args.min_seconds = args.min_seconds or (1.0 if tiny else 3.0)
    args.max_seconds = args.max_seconds or (6.0 if tiny else 15.0)
    if args.quick:
        args.steps, args.checkpointing = min(args.steps, 6), "off" if args.model_size == "tiny" else args.checkpointing
    return args


def variants(args, device: dict) -> list[dict]:
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else (
        [1, 2] if device["kind"] == "cpu" else sorted({1, max(1, device["count"])}))
    return [{"ranks": r, "dtype": d, "checkpointing": c == "on"}
            for r in ranks for d in args.dtypes.split(",") for c in args.checkpointing.split(",")]


def peak_tflops(args, device: dict) -> float | None:
    """--peak-tflops, else training.train.flops's table by device name (the one the training job's mfu uses)."""
    from training.train.flops import peak_tflops as table_peak

    return table_peak("cpu" if device["kind"] == "cpu" else device["name"], args.peak_tflops)


def run_variant(args, device: dict, model: Path, shards: Path, v: dict) -> dict:
    from training.train.metrics import read_metrics

    name = f"train-{args.model_size}-r{v['ranks']}-{v['dtype']}-ac{'on' if v['checkpointing'] else 'off'}"
    run_dir = args.work_dir / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"model.path={model}", f"data.shards={shards}", f"checkpoint.dir={run_dir}",
                 f"train.steps={args.steps}", "train.grad_accum=1", "train.log_interval=1",
                 f"train.device={device['kind']}", f"fsdp.param_dtype={v['dtype']}",
                 f"fsdp.activation_checkpointing={'true' if v['checkpointing'] else 'false'}",
                 "checkpoint.interval=1000000", *([f"data.frame_budget={args.frame_budget}"] if args.frame_budget else []),
                 *args.override]
    command = [python(), "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={v['ranks']}",
               "-m", "training.train", "--config", str(CONFIGS[args.model_size]), *overrides]
    print(f"[{name}] {' '.join(command)}", flush=True)
    # The full model's final checkpoint (~23 GB of weights and AdamW state) measures nothing: stop once the
    # last step's metrics are written.
    done = (lambda _: len(read_metrics(run_dir)) >= args.steps) if args.model_size == "full" else None
    import psutil

    limit = int(args.memory_limit_gib * GIB or psutil.virtual_memory().total / 2)
    measured = run_measured(command, child_env(args.threads_per_rank), args.timeout, limit, stop_when=done,
                            log_to=args.work_dir / "runs" / f"{name}.log")
    records = read_metrics(run_dir)
    timed = records[args.warmup:]
    row = {**v, "name": name, "steps_logged": len(records), "wall_seconds": measured.wall_s,
           "tree_peak_rss_gib": gib(measured.peak_rss_bytes), "returncode": measured.returncode}
    if len(records) < args.steps or not timed:
        why = f"tree RSS over {gib(limit):.1f} GiB" if measured.killed_for_memory else f"exit {measured.returncode}"
        row["status"] = f"failed ({why}, {len(records)} steps logged)"
        print(f"[{name}] {row['status']}\n{measured.tail(3000)}", flush=True)
        return row
    seconds = sum(r["step_time_s"] for r in timed)
    row.update(status="ok", frames_per_s=sum(r["frames"] for r in timed) / seconds,
               step_time_median_s=statistics.median(r["step_time_s"] for r in timed),
               frames_per_step=statistics.mean(r["frames"] for r in timed),
               peak_memory_gib=gib(max(r["peak_memory_bytes"] for r in records)), final_loss=records[-1]["loss"],
               tflops_measured=sum(r.get("tflops", 0.0) * r["step_time_s"] for r in timed) / seconds,
               padding=statistics.mean(r.get("padding_fraction", 0.0) for r in timed))
    return row


def add_flops(rows: list[dict], flops_per_frame: dict, peak: float | None) -> None:
    for row in rows:
        if row.get("status") != "ok":
            continue
        for key, per_frame in flops_per_frame.items():
            achieved = per_frame * row["frames_per_s"]
            row[f"gflops_{key}"] = achieved / 1e9
            row[f"mfu_{key}"] = achieved / (peak * 1e12) if peak else None
        row["mfu_measured"] = row["tflops_measured"] / peak if peak else None


def comparisons(rows: list[dict]) -> list[str]:
    """Each variant against the one that differs in a single setting."""
    ok = {(r["ranks"], r["dtype"], r["checkpointing"]): r for r in rows if r.get("status") == "ok"}
    lines = []
    for (ranks, dtype, ac), r in sorted(ok.items(), key=lambda kv: str(kv[0])):
        if ranks > 1 and (1, dtype, ac) in ok:
            one = ok[(1, dtype, ac)]
            lines.append(f"{ranks} ranks / 1 rank ({dtype}, AC {'on' if ac else 'off'}): frames/s x"
                         f"{ratio(r['frames_per_s'], one['frames_per_s']):.2f} (ideal {ranks}.00)")
        if ac and (ranks, dtype, False) in ok:
            off = ok[(ranks, dtype, False)]
            lines.append(f"AC on / off ({ranks} rank(s), {dtype}): frames/s x{ratio(r['frames_per_s'], off['frames_per_s']):.2f}, "
                         f"peak memory x{ratio(r['peak_memory_gib'], off['peak_memory_gib']):.2f}")
        if dtype == "bfloat16" and (ranks, "float32", ac) in ok:
            fp32 = ok[(ranks, "float32", ac)]
            lines.append(f"bf16 / fp32 ({ranks} rank(s), AC {'on' if ac else 'off'}): frames/s "
                         f"x{ratio(r['frames_per_s'], fp32['frames_per_s']):.2f}, "
                         f"peak memory x{ratio(r['peak_memory_gib'], fp32['peak_memory_gib']):.2f}")
    return lines


def main(argv=None) -> None:
    from benchmarks.model_1p7b import config_1p7b, flop_parameters, training_flops_per_frame
    from shared.tiny_model import tiny_config

    args = parse_args(argv)
    device = resolve_device(args.device)
    info = machine_info(device)
    report = {"benchmark": "train", "machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    if args.model_size == "full" and device["kind"] == "cpu" and not args.force_full_on_cpu:
        state = 16 * flop_parameters(config_1p7b(args.full_layers))["total"]  # fp32 weights, grads, AdamW m and v
        report["skipped"] = (f"the 1.7B-shaped model is for accelerators: its fp32 weights, gradients and AdamW "
                             f"state alone are {state / GIB:.0f} GiB (this machine has {info['ram_gib']} GiB of RAM "
                             f"and {info['nproc']} cores); run it with --device cuda|npu, or try the path here "
                             f"with --force-full-on-cpu --full-layers 1")
        print(f"--model-size full skipped: {report['skipped']}")
        return write_json(args.json, report)
    config = tiny_config() if args.model_size == "tiny" else config_1p7b(args.full_layers)
    params = flop_parameters(config)
    per_frame = training_flops_per_frame(params)
    model = inputs.tiny_model(args.work_dir) if args.model_size == "tiny" else inputs.model_1p7b(args.work_dir, args.full_layers)
    shards = inputs.train_shards(args.work_dir, args.shards, args.rows_per_shard,
                                 inputs.uniform_lengths(args.min_seconds, args.max_seconds))
    print(f"model {args.model_size}: {params['total'] / 1e6:.1f} M talker parameters "
          f"({params['non_embedding'] / 1e6:.1f} M outside embeddings); training FLOPs per frame: "
          f"6N {per_frame['6N'] / 1e9:.3f} G, per-position {per_frame['per_position'] / 1e9:.3f} G; device {device}",
          flush=True)
    rows = [run_variant(args, device, model, shards, v) for v in variants(args, device)]
    peak = peak_tflops(args, device)
    add_flops(rows, per_frame, peak)
    report.update(parameters=params, flops_per_frame=per_frame, peak_tflops=peak, results=rows)
    print()
    print(markdown_table(
        ["ranks", "param dtype", "AC", "status", "frames/s", "step s (median)", "frames/step", "peak mem GiB",
         "tree RSS GiB", "padding", "TFLOP/s/device (shapes)", "MFU (shapes)", "GFLOP/s (6N)", "MFU 6N",
         "MFU per-position"],
        [[r["ranks"], r["dtype"], "on" if r["checkpointing"] else "off", r["status"], r.get("frames_per_s"),
          r.get("step_time_median_s"), r.get("frames_per_step"), r.get("peak_memory_gib"), r["tree_peak_rss_gib"],
          r.get("padding"), r.get("tflops_measured"), r.get("mfu_measured"), r.get("gflops_6N"), r.get("mfu_6N"),
          r.get("mfu_per_position")] for r in rows]))
    for line in comparisons(rows):
        print(line)
    if peak is None:
        print("MFU not computed: no peak FLOP/s for this device (pass --peak-tflops)")
    print(f"peak mem: metrics.jsonl's peak_memory_bytes of rank 0 (accelerator: max allocated; CPU: host peak RSS); "
          f"tree RSS: every process of the run. Averages leave out the first {args.warmup} steps.")
    write_json(args.json, report)


if __name__ == "__main__":
    main()
