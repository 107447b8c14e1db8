"""Encode throughput: the upstream flow, our encode job, the raw codec, and our job with more encoders.

    python benchmarks/encode_bench.py --quick                      # 1-3 min on a 2-core CPU box
    python benchmarks/encode_bench.py --codec-size full --json out/encode.json
    python benchmarks/encode_bench.py --device cuda --codec-size full   # (d) uses every GPU

On one generated corpus (mixed sample rates), one codec, one device, one torch thread count per encoder:
  (a) reference: sequential batches of paths through Qwen3TTSTokenizer.encode, JSONL written at the end;
  (b) `python -m services.encode` with 1 encoder (encode phase from its "throughput this run" line; the
      end-to-end wall time, Ray start included, separately);
  (c) the ceiling: shared.qwen.encode_clips on pre-decoded 24 kHz clips, the job's batches, no I/O;
  (d) the job with N encoders (2 CPU workers on a CPU box; one per accelerator otherwise).
Every flow is a child process measured the same way: peak RSS and CPU seconds of its whole process tree.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/X.py` from anywhere

from benchmarks import inputs  # noqa: E402
from benchmarks.encoder_profile import padding_factors  # noqa: E402
from benchmarks.common import (GIB, add_corpus_args, base_parser, child_env, gib, machine_info, markdown_table, parse_last,  # noqa: E402
                               parse_result, python, ratio, ratio_lines, resolve_device, run_measured, write_json)

THROUGHPUT_LINE = (r"throughput this run: (\d+) shards in ([\d.]+) s \(([\d.]+) rows/s, ([\d.]+) audio-s/s\)")
PROGRESS_LINE = r"progress rows=(\d+) audio_seconds=([\d.]+) elapsed=([\d.]+)"


def parse_args(argv=None):
    p = base_parser(__doc__)
    add_corpus_args(p, clips=300)
    p.add_argument("--reference-batch", type=int, default=32, help="(a) paths per Qwen3TTSTokenizer.encode call")
    p.add_argument("--reference-fallback-batch", type=int, default=8,
                   help="(a) re-run with this batch if the first one exceeds --memory-limit-gib (0: do not)")
    p.add_argument("--shard-size", type=int, default=0,
                   help="(b, d) rows per shard (0: the job's default, made smaller when (d) would get fewer than "
                        "4 shards per encoder)")
    p.add_argument("--max-batch-seconds", type=float, default=None, help="(b, c, d) padded seconds per codec call "
                   "(default: the encode job's default)")
    p.add_argument("--max-batch-items", type=int, default=None, help="(b, c, d) (default: the job's default)")
    p.add_argument("--encoders", type=int, default=0, help="(d) encoders: 0 = one per accelerator, 2 on CPU")
    p.add_argument("--flows", default="a,b,c,d", help="which flows to run, e.g. b,c")
    p.add_argument("--memory-limit-gib", type=float, default=0.0,
                   help="kill a flow whose process tree exceeds this RSS (0: half of this machine's RAM)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per flow")
    args = p.parse_args(argv)
    if args.quick:
        args.clips, args.min_seconds, args.max_seconds = min(args.clips, 30), 1.0, min(args.max_seconds, 5.0)
    return args


def parallel_encoders(args, device: dict) -> int:
    """(d)'s encoder count: as asked, else one per accelerator, else 2 CPU workers."""
    return args.encoders or (device["count"] if device["kind"] != "cpu" else 2)


def job_defaults(args, device: dict) -> None:
    """Unset sizes take the encode job's own defaults; (c) gets the budget the encoder actually uses on this
    device, so that (c) batches like (b). Shards are the job's default size unless (d) needs more of them to
    keep every encoder busy (whole shards are the unit of work)."""
    from services.encode.driver import parse_args as job_args
    from services.encode.encoder import EncoderOptions, batch_seconds_for

    defaults = job_args(["--manifest", "m", "--codec", "c", "--output", "o"])
    args.max_batch_seconds = args.max_batch_seconds or defaults.max_batch_seconds
    args.max_batch_items = args.max_batch_items or defaults.max_batch_items
    args.encoder_batch_seconds = batch_seconds_for(EncoderOptions("", "", max_batch_seconds=args.max_batch_seconds),
                                                   device["kind"])
    n = parallel_encoders(args, device)
    shards_needed = 4 * n if "d" in args.flows.split(",") and n >= 2 else 1
    args.shard_size = args.shard_size or min(defaults.shard_size, max(1, -(-args.clips // shards_needed)))


class Bench:
    def __init__(self, args, device: dict):
        import psutil

        self.args, self.device = args, device
        self.manifest, self.total_audio = inputs.corpus(args.work_dir, args.clips, args.min_seconds, args.max_seconds)
        self.codec = inputs.codec(args.work_dir, args.codec_size)
        self.runs = args.work_dir / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)
        limit = args.memory_limit_gib * GIB or psutil.virtual_memory().total / 2
        self.memory_limit = int(limit)
        self.env = child_env(args.threads)

    def _measure(self, name: str, command: list[str]):
        print(f"[{name}] {' '.join(command)}", flush=True)
        return run_measured(command, self.env, self.args.timeout, self.memory_limit, log_to=self.runs / name)

    def _row(self, label: str, measured, rows, audio, encode_s, **extra) -> dict:
        status = "ok" if measured.returncode == 0 else (
            f"killed: tree RSS over {gib(self.memory_limit):.1f} GiB" if measured.killed_for_memory
            else f"failed (exit {measured.returncode})")
        return {"flow": label, "status": status, "rows": rows, "audio_seconds": audio, "encode_seconds": encode_s,
                "audio_s_per_s": ratio(audio, encode_s), "rows_per_s": ratio(rows, encode_s),
                "wall_seconds": measured.wall_s, "peak_rss_gib": gib(measured.peak_rss_bytes),
                "peak_single_rss_gib": gib(measured.peak_single_rss_bytes), "cpu_seconds": measured.cpu_s,
                "cpu_s_per_audio_s": ratio(measured.cpu_s, audio), **extra, "process": measured.summary()}

    def in_process(self, flow: str, name: str, label: str, *extra: str) -> dict:
        a = self.args
        command = [python(), "-m", "benchmarks.encode_flows", flow, "--manifest", str(self.manifest),
                   "--codec", str(self.codec), "--device", self.device["kind"], "--threads", str(a.threads), *extra]
        measured = self._measure(name, command)
        result = parse_result(measured.stdout)
        if result is None:  # stopped early: keep the rate of the batches it finished
            last = parse_last(PROGRESS_LINE, measured.stdout)
            rows, audio, seconds = (int(last[1]), float(last[2]), float(last[3])) if last else (0, 0.0, None)
            row = self._row(label, measured, rows, audio, seconds, partial=True)
            print(f"[{name}] {row['status']}; {measured.tail(1500)}", flush=True)
            return row
        return self._row(label, measured, result["rows"], result["audio_seconds"], result["encode_seconds"],
                         load_seconds=result["load_seconds"], device_peak_gib=gib(result["device_peak_bytes"]))

    def reference(self, batch: int) -> dict:
        return self.in_process("reference", f"a-reference-b{batch}", f"(a) reference, batch {batch}",
                               "--batch", str(batch), "--output", str(self.runs / f"reference-b{batch}.jsonl"))

    def ceiling(self) -> dict:
        a = self.args
        return self.in_process("ceiling", "c-ceiling", "(c) codec ceiling", "--max-batch-seconds",
                               str(a.encoder_batch_seconds), "--max-batch-items", str(a.max_batch_items))

    def job(self, name: str, label: str, encoders: int) -> dict:
        from shared.schema import published_shards, read_stats

        a = self.args
        output = self.runs / name
        shutil.rmtree(output, ignore_errors=True)  # a leftover output would be resumed, not re-encoded
        cpus = ["--cpus-per-encoder", str(a.threads)] if self.device["kind"] == "cpu" else []
        command = [python(), "-m", "services.encode", "--manifest", str(self.manifest), "--codec", str(self.codec),
                   "--output", str(output), "--device", self.device["kind"], "--num-encoders", str(encoders), *cpus,
                   "--status-port", "-1", "--shard-size", str(a.shard_size), "--max-batch-seconds",
                   str(a.max_batch_seconds), "--max-batch-items", str(a.max_batch_items), "--progress-seconds", "60"]
        measured = self._measure(name, command)
        line = parse_last(THROUGHPUT_LINE, measured.stdout)
        if line is None:
            print(f"[{name}] no throughput line; {measured.tail(3000)}", flush=True)
            return self._row(label, measured, 0, 0.0, None, encoders=encoders)
        encode_s = float(line[2])  # printed to 0.1 s: runs shorter than ~10 s carry that rounding
        stats = [read_stats(p) for p in published_shards(output).values()]
        busy = sum(s.encode_seconds for s in stats)
        return self._row(label, measured, sum(s.rows_ok for s in stats), sum(s.audio_seconds for s in stats), encode_s,
                         encoders=encoders, shards=len(stats),
                         # Time inside encode_shard over (phase x encoders): below 1, Ray dispatch and idling.
                         encoder_busy_fraction=ratio(busy, encode_s * encoders))


def run(args) -> dict:
    device = resolve_device(args.device)
    job_defaults(args, device)
    bench = Bench(args, device)
    flows = set(args.flows.split(","))
    info = machine_info(device)
    print(f"corpus: {args.clips} clips, {bench.total_audio:.0f} s of audio ({args.min_seconds:g}-{args.max_seconds:g} s, "
          f"{', '.join(str(r) for r in inputs.CORPUS_RATES)} Hz); codec {args.codec_size}; device {device}; "
          f"{args.threads} torch thread(s) per encoder; codec calls of at most {args.encoder_batch_seconds:g} padded "
          f"seconds (--max-batch-seconds {args.max_batch_seconds:g})", flush=True)
    results: dict[str, dict] = {}
    if "a" in flows:
        results["a"] = bench.reference(args.reference_batch)
        if results["a"]["status"] != "ok" and args.reference_fallback_batch:
            results["a_first"] = results.pop("a")
            results["a"] = bench.reference(args.reference_fallback_batch)
    if "b" in flows:
        results["b"] = bench.job("b-job-1", "(b) encode job, 1 encoder", 1)
    if "c" in flows:
        results["c"] = bench.ceiling()
    skipped = {}
    if "d" in flows:
        n = parallel_encoders(args, device)
        if n < 2:
            skipped["d"] = f"{device['kind']} host with {device['count']} accelerator(s): nothing to scale to"
        else:
            results["d"] = bench.job(f"d-job-{n}", f"(d) encode job, {n} encoders", n)
    rate = lambda k: results[k]["audio_s_per_s"] if k in results and results[k]["status"] == "ok" else None
    n_d = results.get("d", {}).get("encoders", 0) or parallel_encoders(args, device)
    checks = [("b/a", ratio(rate("b"), rate("a")), 1.5), ("b/c", ratio(rate("b"), rate("c")), 0.9),
              (f"d/b ({n_d} encoders)", ratio(rate("d"), rate("b")), 0.9 * n_d if n_d else None)]
    report = {"benchmark": "encode", "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
              "corpus_audio_seconds": bench.total_audio, "memory_limit_gib": gib(bench.memory_limit),
              "padding": padding_factors(bench.manifest, args.shard_size, args.encoder_batch_seconds,
                                         args.max_batch_items),
              "results": results, "ratios": {name: value for name, value, _ in checks}, "skipped": skipped}
    print_report(report, checks)
    return report


def print_report(report: dict, checks) -> None:
    columns = ["flow", "status", "rows", "audio s", "encode s", "audio-s/s", "rows/s", "wall s", "peak RSS GiB",
               "CPU s", "CPU s / audio s"]
    rows = [[r["flow"], r["status"], r["rows"], r["audio_seconds"], r["encode_seconds"], r["audio_s_per_s"],
             r["rows_per_s"], r["wall_seconds"], r["peak_rss_gib"], r["cpu_seconds"], r["cpu_s_per_audio_s"]]
            for r in report["results"].values()]
    print()
    print(markdown_table(columns, rows))
    for key, r in report["results"].items():
        if "encoder_busy_fraction" in r:
            print(f"{key}: {r['shards']} shards; shard time summed = {100 * (r['encoder_busy_fraction'] or 0):.0f}% "
                  f"of encode phase x encoders (under 100%: encoders idle; over: shards overlapped on an encoder); "
                  f"end-to-end wall {r['wall_seconds']:.1f} s (Ray start, plan, summary included)")
    pad = report["padding"]
    print(f"padding (padded / audio seconds): {pad['per_shard']:.3f} in (b, d)'s per-shard batches of "
          f"{report['args']['shard_size']} rows, {pad['whole_corpus']:.3f} in (c)'s one sort over the corpus")
    for line in ratio_lines(checks):
        print(line)
    for key, reason in report["skipped"].items():
        print(f"({key}) skipped: {reason}")
    print(f"load average at start {report['machine']['loadavg_at_start']} on {report['machine']['nproc']} cores "
          f"(other jobs on this machine depress every rate; the ratios come from one run)")


def main(argv=None) -> None:
    args = parse_args(argv)
    write_json(args.json, run(args))


if __name__ == "__main__":
    main()
