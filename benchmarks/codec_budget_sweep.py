"""The codec ceiling (encode_bench's flow c) across batch budgets, with and without transparent huge pages for
torch's CPU allocator (THP_MEM_ALLOC_ENABLE): the evidence behind the encoder's CPU batch budget.

    python benchmarks/codec_budget_sweep.py --quick
    python benchmarks/codec_budget_sweep.py --budgets 20,60,240 --clips 40 --json out/sweep.json

Wall-clock rates on a shared machine move with other people's load; CPU seconds per audio second (user +
system of the child over the timed phase) do much less, so both are printed.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/X.py` from anywhere

from benchmarks import inputs  # noqa: E402
from benchmarks.common import (add_corpus_args, base_parser, child_env, gib, machine_info, markdown_table, parse_result,  # noqa: E402
                               python, ratio, resolve_device, run_measured, write_json)


def parse_args(argv=None):
    p = base_parser(__doc__)
    add_corpus_args(p, clips=40)
    p.add_argument("--budgets", default="20,40,80,240", help="padded audio seconds per codec call")
    p.add_argument("--max-batch-items", type=int, default=64)
    p.add_argument("--thp", default="0,1", help="THP_MEM_ALLOC_ENABLE values to try")
    args = p.parse_args(argv)
    if args.quick:
        args.clips, args.max_seconds, args.budgets = 12, 10.0, "20,80"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    info = machine_info(device)
    manifest, total = inputs.corpus(args.work_dir, args.clips, args.min_seconds, args.max_seconds)
    codec = inputs.codec(args.work_dir, args.codec_size)
    print(f"{args.clips} clips, {total:.0f} s of audio; codec {args.codec_size}; {args.threads} thread(s)", flush=True)
    rows, results = [], []
    for budget in [float(b) for b in args.budgets.split(",")]:
        for thp in args.thp.split(","):  # interleaved, so drifting background load hits both settings alike
            command = [python(), "-m", "benchmarks.encode_flows", "ceiling", "--manifest", str(manifest),
                       "--codec", str(codec), "--device", device["kind"], "--threads", str(args.threads),
                       "--max-batch-seconds", str(budget), "--max-batch-items", str(args.max_batch_items)]
            measured = run_measured(command, child_env(args.threads, THP_MEM_ALLOC_ENABLE=thp))
            r = parse_result(measured.stdout)
            if r is None:
                print(measured.tail(2000))
                continue
            cpu = r["user_seconds"] + r["system_seconds"]
            results.append({"budget_seconds": budget, "thp": thp, **r, "peak_rss_gib": gib(measured.peak_rss_bytes)})
            rows.append([budget, thp, r["batches"], ratio(r["audio_seconds"], r["encode_seconds"]),
                         ratio(r["audio_seconds"], cpu), r["user_seconds"], r["system_seconds"],
                         r["runqueue_wait_seconds"], r["encode_seconds"] - cpu - r["runqueue_wait_seconds"],
                         gib(measured.peak_rss_bytes)])
            print(f"budget {budget:g} s, THP {thp}: {rows[-1][3]:.2f} audio-s/s, {rows[-1][4]:.2f} audio-s per CPU-s",
                  flush=True)
    print()
    print(markdown_table(["budget s", "THP", "batches", "audio-s/s", "audio-s / CPU-s", "user s", "system s",
                          "runqueue wait s", "other off-CPU s", "peak RSS GiB"], rows))
    print("runqueue wait: runnable but another process had the core; other off-CPU: blocked (I/O, page-fault "
          "stalls, locks) = wall - user - system - runqueue wait (main thread)")
    write_json(args.json, {"benchmark": "codec_budget_sweep", "machine": info,
                           "args": {k: str(v) for k, v in vars(args).items()}, "results": results})


if __name__ == "__main__":
    main()
