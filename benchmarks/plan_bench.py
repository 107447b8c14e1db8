"""Planning cost: services.encode.plan.prepare_plan on generated manifests of 250k, 500k and 1M rows.

    python benchmarks/plan_bench.py --quick
    python benchmarks/plan_bench.py --rows 250000,500000,1000000 --json out/plan.json

The manifests name audio files that do not exist: planning must never touch audio (an audit hook counts
every file the planner opens under the fake audio root, and it must be zero). Each size is planned in a
fresh child process, so its peak RSS is its own; time per row at each size shows whether time is linear.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/X.py` from anywhere

from benchmarks import inputs  # noqa: E402
from benchmarks.common import (GIB, base_parser, child_env, current_rss_self, emit_result, gib,  # noqa: E402
                               machine_info, markdown_table, parse_result, peak_rss_self, python, ratio,
                               run_measured, timed_calls, write_json)

FAKE_AUDIO_ROOT = "/nonexistent-bench-audio"
PHASES = ("input_fingerprint", "hash_directory", "write_normalised", "plan_shards", "plan_bytes")
_TEXTS = ["今天天气很好我们一起去公园散步", "语音合成模型需要大量的训练数据", "the quick brown fox jumps over the lazy dog",
          "学习语音合成", "hello world, this is a longer line of English text for the manifest"]


def write_fake_manifest(work_dir: Path, rows: int) -> Path:
    path = work_dir / f"fake-manifest-{rows}.jsonl"
    if path.is_file():
        return path
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"utt{i:08d}", "audio": f"{FAKE_AUDIO_ROOT}/spk{i % 997:03d}/utt{i:08d}.wav",
                                "text": _TEXTS[i % len(_TEXTS)], "ref_audio": f"{FAKE_AUDIO_ROOT}/ref.wav"},
                               ensure_ascii=False) + "\n")
    tmp.rename(path)
    return path


def worker(manifest: Path, codec: Path, output: Path, shard_size: int) -> None:
    """In the child: time prepare_plan and each of its parts (wrapped in place), count audio opens."""
    import services.encode.plan as plan

    opened = []
    sys.addaudithook(lambda event, a: opened.append(a[0]) if event == "open" and isinstance(a[0], str)
                     and a[0].startswith(FAKE_AUDIO_ROOT) else None)
    phases = {name: 0.0 for name in PHASES}
    for name in PHASES:
        setattr(plan, name, timed_calls(phases, name, getattr(plan, name)))
    baseline = current_rss_self()
    start = time.perf_counter()
    result = plan.prepare_plan(output, manifest, codec, shard_size, log=lambda *_: None)
    seconds = time.perf_counter() - start
    emit_result({"rows": result.num_rows, "shards": len(result.shards), "seconds": seconds, "phases": phases,
                 "maxrss_bytes": peak_rss_self(), "rss_before_bytes": baseline, "audio_opens": len(opened)})


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--rows", default="250000,500000,1000000", help="manifest sizes, comma separated")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3, help="plan each size this many times (interleaved); keep the "
                   "fastest, the run least disturbed by other load")
    p.add_argument("--worker", nargs=3, metavar=("MANIFEST", "CODEC", "OUTPUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.repeat = "50000,100000,200000", 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        manifest, codec, output = map(Path, args.worker)
        return worker(manifest, codec, output, args.shard_size)
    import shutil

    sizes = [int(n) for n in args.rows.split(",")]
    codec = inputs.codec(args.work_dir, "tiny")
    manifests = {rows: write_fake_manifest(args.work_dir, rows) for rows in sizes}
    runs: dict[int, list[dict]] = {rows: [] for rows in sizes}
    for attempt in range(args.repeat):
        for rows, manifest in manifests.items():
            output = args.work_dir / "runs" / f"plan-{rows}"
            shutil.rmtree(output, ignore_errors=True)  # an existing plan would be reused, not made
            measured = run_measured([python(), str(Path(__file__).resolve()), "--shard-size", str(args.shard_size),
                                     "--worker", str(manifest), str(codec), str(output)], child_env(1))
            r = parse_result(measured.stdout)
            if r is None:
                raise SystemExit(f"planning {rows} rows failed:\n{measured.tail()}")
            r.update(manifest_bytes=manifest.stat().st_size, tree_peak_rss_bytes=measured.peak_rss_bytes)
            runs[rows].append(r)
            shutil.rmtree(output, ignore_errors=True)
            print(f"{rows} rows (run {attempt + 1}): {r['seconds']:.2f} s, peak RSS {gib(r['maxrss_bytes']):.3f} GiB",
                  flush=True)
    results = [min(rs, key=lambda r: r["seconds"]) | {"all_seconds": [r["seconds"] for r in rs],
                                                      "maxrss_bytes": max(r["maxrss_bytes"] for r in rs)}
               for rs in runs.values()]
    table = []
    base = results[0]["seconds"] / results[0]["rows"]
    for r in results:
        per_row = r["seconds"] / r["rows"]
        table.append([r["rows"], r["shards"], r["manifest_bytes"] / 2**20, r["seconds"], 1e6 * per_row,
                      ratio(per_row, base), *(r["phases"][p] for p in PHASES), gib(r["maxrss_bytes"]),
                      gib(r["maxrss_bytes"] - r["rss_before_bytes"]), r["audio_opens"]])
    print()
    print(markdown_table(["rows", "shards", "manifest MiB", "plan s", "µs/row", "µs/row ÷ first", "fingerprint s",
                          "codec hash s", "normalise s", "shard s", "plan.json s", "peak RSS GiB",
                          "RSS growth GiB", "audio opens"], table))
    largest = results[-1]
    print(f"largest: {largest['rows']} rows planned in {largest['seconds']:.1f} s with {gib(largest['maxrss_bytes']):.3f}"
          f" GiB peak RSS (target < 1 GiB: {'met' if largest['maxrss_bytes'] < GIB else 'NOT met'}); "
          f"time per row at the largest size is {ratio(largest['seconds'] / largest['rows'], base):.2f}x that at the "
          f"smallest (1.00 = linear)")
    write_json(args.json, {"benchmark": "plan", "machine": machine_info(), "results": results,
                           "args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
