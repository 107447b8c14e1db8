"""An encoder's start on a cold page cache: its imports then the codec load, with and without reading the weight
files on a thread beside the imports (services.encode.encoder.warm_page_cache), each in a fresh process, in turns.

    python benchmarks/codec_cold_load.py                  # released-size codec, 3 rounds
    python benchmarks/codec_cold_load.py --rounds 5 --json out/cold.json

Before every run the weight files are dropped from the page cache (posix_fadvise DONTNEED, no root needed), as on
a node's first job or with weights on network storage.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/X.py` from anywhere

from benchmarks import inputs  # noqa: E402
from benchmarks.common import (base_parser, child_env, evict_from_page_cache, machine_info, markdown_table,  # noqa: E402
                               parse_result, python, run_measured, write_json)

# One encoder start in a fresh process: what ShardEncoder.__init__ does before its first shard, timed.
START = """
import sys, time
started = time.perf_counter()
from services.encode.encoder import skip_scikit_learn_in_transformers, use_huge_pages_for_host_tensors, warm_page_cache
use_huge_pages_for_host_tensors()
if sys.argv[2] == "warm":
    warm_page_cache(sys.argv[1])
skip_scikit_learn_in_transformers()
import torch
torch.set_num_threads(1)
from shared.qwen import load_codec
imported = time.perf_counter()
load_codec(sys.argv[1], "cpu")
loaded = time.perf_counter()
from benchmarks.common import emit_result
emit_result({"imports_s": imported - started, "load_s": loaded - imported, "total_s": loaded - started})
"""


def main(argv=None) -> None:
    p = base_parser(__doc__)
    p.add_argument("--codec-size", choices=("tiny", "full"), default="full")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    codec = inputs.codec(args.work_dir, args.codec_size)
    env = child_env(1)
    rows, totals = [], {"cold": [], "warm": []}
    for number in range(1, args.rounds + 1):
        for mode in ("cold", "warm"):
            evict_from_page_cache(codec)
            measured = run_measured([python(), "-c", START, str(codec), mode], env, timeout=600)
            result = parse_result(measured.stdout)
            if measured.returncode != 0 or result is None:
                raise SystemExit(f"{mode} failed: {measured.tail()}")
            label = "imports, then the load" if mode == "cold" else "weights read beside the imports"
            rows.append([number, label, result["imports_s"], result["load_s"], result["total_s"]])
            totals[mode].append(result["total_s"])
    print(markdown_table(["round", "encoder start", "imports s", "codec load s", "total s"], rows))
    medians = {mode: statistics.median(values) for mode, values in totals.items()}
    print(f"median total: {medians['cold']:.2f} s without, {medians['warm']:.2f} s with the weights read beside "
          f"the imports (saved {medians['cold'] - medians['warm']:.2f} s)")
    write_json(args.json, {"benchmark": "codec_cold_load", "machine": machine_info({"kind": "cpu"}), "rows": rows,
                           "medians": medians})


if __name__ == "__main__":
    main()
