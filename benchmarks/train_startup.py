"""Training start-up against corpus size: seconds from `python -m training.train` to its first optimizer step,
for 20k and 2M rows of encoded shards (256 rows per shard, the encode service's default), same config, in one
run; this checkout beside another revision's training code ("before", default: main just before the shard
index).

    python benchmarks/train_startup.py --json startup.json
    python benchmarks/train_startup.py --rows 20000,400000   # a smaller pair
    python benchmarks/train_startup.py --quick               # 2k vs 20k rows

Flows: "after" starts on an output whose shard index (OUTPUT/shard_index.json) is present, as the encode
service leaves it; "after-first" on the same output without it (an output encoded before the index existed:
this first start reads every shard's light columns and caches the index, which "after" then uses);
"before" runs the other revision. All plan epochs (train.steps=0), so the lr schedule's step total is part of
start-up, as in the shipped 1.7B config. The tiny random model keeps model loading negligible: what grows is
the data path.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/X.py` from anywhere

from benchmarks import inputs  # noqa: E402
from benchmarks.common import REPO, base_parser, machine_info, markdown_table, ratio, write_json  # noqa: E402
from benchmarks.train_runs import export_revision, run_training  # noqa: E402
from shared.schema import INDEX_FILE  # noqa: E402

BEFORE_INDEX = "4993e7e"  # main just before the shard index: speakers scan and footers read at start-up


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--rows", default="20000,2000000", help="comma list of corpus sizes (rows)")
    p.add_argument("--rows-per-shard", type=int, default=256)
    p.add_argument("--before", default=BEFORE_INDEX, help="git revision of the 'before' code ('' to skip it)")
    p.add_argument("--no-first", action="store_true", help="skip the after-first flow (no index yet)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.rows = "2000,20000"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    sizes = [int(r) for r in args.rows.split(",")]
    model = inputs.tiny_model(args.work_dir)
    corpora = {n: inputs.train_shards(args.work_dir, n // args.rows_per_shard, args.rows_per_shard,
                                    inputs.uniform_lengths(1.0, 6.0))
               for n in sizes}
    flows = {} if args.no_first else {"after-first": REPO}
    flows["after"] = REPO  # after after-first: the index that run cached is in place
    if args.before:
        flows["before"] = export_revision(args.before, args.work_dir)
    results = []
    for rows in sizes:
        for flow, code in flows.items():
            if flow == "after-first":
                (corpora[rows] / INDEX_FILE).unlink(missing_ok=True)
            elif flow == "after" and not (corpora[rows] / INDEX_FILE).is_file():
                index_as_the_encode_service_leaves_it(corpora[rows])
            run_dir = args.work_dir / "runs" / f"startup-{flow}-{rows}"
            shutil.rmtree(run_dir, ignore_errors=True)
            overrides = [f"model.path={model}", f"data.shards={corpora[rows]}", f"checkpoint.dir={run_dir}",
                         "train.steps=0", "train.epochs=1", "train.log_interval=1", "checkpoint.interval=1000000",
                         "data.frame_budget=2048", "data.shards_per_round=8"]
            print(f"[{flow} {rows} rows] training from {code}", flush=True)
            run = run_training(f"{flow}-{rows}", code, code / "training/configs/tiny.yaml", overrides, run_dir,
                               steps=1, threads=args.threads, timeout=args.timeout)
            status = "ok" if run.first_step_s is not None else f"no step within {args.timeout:.0f} s"
            if run.first_step_s is None:
                print(run.log_tail, flush=True)
            results.append(dict(flow=flow, rows=rows, shards=rows // args.rows_per_shard,
                                first_step_s=run.first_step_s, peak_rss_gib=run.peak_rss_gib, status=status))
            print(f"[{flow} {rows} rows] first step after {run.first_step_s} s", flush=True)
    print()
    print(markdown_table(["flow", "rows", "shards", "s to first step", "peak RSS GiB", "status"],
                         [[r["flow"], r["rows"], r["shards"], r["first_step_s"], r["peak_rss_gib"], r["status"]]
                          for r in results]))
    small, large = min(sizes), max(sizes)
    for flow in flows:
        by = {r["rows"]: r["first_step_s"] for r in results if r["flow"] == flow}
        print(f"{flow}: start-up {large} rows / {small} rows = x{ratio(by.get(large), by.get(small)) or float('nan'):.2f}"
              + (" (target <= 1.2)" if flow == "after" else ""))
    write_json(args.json, {"benchmark": "train_startup", "machine": machine_info(), "before": args.before,
                           "results": results})


def index_as_the_encode_service_leaves_it(output: Path) -> None:
    """The index the encode driver writes as shards publish (tests/test_encode_job.py holds it equal to one
    read from the shards); generated corpora have none."""
    from shared.schema import published_shard_files
    from shared.shard_index import ShardIndex, index_location

    index = ShardIndex()
    index.reconcile(published_shard_files(output))
    index.save(index_location(output))


if __name__ == "__main__":
    main()
