"""What the status page and /metrics cost next to /status, over a large output directory.

    python -m benchmarks.status_page_bench [--shards 2000] [--rows-per-shard 8] [--encoders 16] [--requests 200]

Writes an output directory of `--shards` real Parquet shards (one error row in four, durations spread over the
histogram), a plan and `--encoders` heartbeats, then starts `python -m services.status` on it (its own process,
loopback, a bearer token) and, from this process, times over HTTP:

- the first request of each route: /status reads every shard footer, / and /metrics then read the `index`,
  `id`, `duration` and `error` columns of every shard once (services.status.shard_details);
- cached: `--requests` rounds of /status, /, /metrics back to back (interleaved, so that noise from other
  tenants falls on all three alike) over an unchanged directory: the server recomputes at most once a second;
- changed: the same with a heartbeat rewritten before every round, as a busy job does: every round recomputes
  the snapshot (a stat per shard), and for / and /metrics the dashboard (throughput series, histogram) and
  the page.

Prints a table and the ratios page/status and metrics/status of the medians; --json writes it all.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq

from benchmarks.common import REPO, machine_info, markdown_table, ratio, ratio_lines, write_json
from shared import schema

ROUTES = ("/status", "/", "/metrics")
DURATIONS = (0.7, 1.5, 2.5, 3.5, 4.5, 7.0, 11.0, 18.0)


def write_output(root: Path, shards: int, rows_per_shard: int, encoders: int) -> None:
    """A job mid-run: `shards` published (publication times a second apart), `encoders` live heartbeats."""
    rng = np.random.default_rng(0)
    (root / schema.SHARDS_DIR).mkdir(parents=True)
    plan_shards = [{"id": i, "start": i * rows_per_shard, "end": (i + 1) * rows_per_shard, "byte_start": 0,
                    "byte_end": 0} for i in range(shards * 2)]
    (root / schema.PLAN_FILE).write_text(json.dumps({"version": 1, "config_hash": "0" * 64, "created": 0.0,
                                                     "inputs": {}, "num_rows": len(plan_shards) * rows_per_shard,
                                                     "num_shards": len(plan_shards), "shards": plan_shards}))
    start = time.time() - shards
    for shard in range(shards):
        rows = []
        for k in range(rows_per_shard):
            index = shard * rows_per_shard + k
            entry = {"id": f"utt{index:08d}", "audio": f"/data/{index}.wav", "text": "t", "ref_audio": "/data/r.wav"}
            if index % 4 == 0:
                rows.append(schema.ShardRow.from_entry(index, entry, error="missing_file: x: check the path"))
            else:
                seconds = DURATIONS[index % len(DURATIONS)]
                codes = rng.integers(0, 2048, size=(int(seconds * 12.5), 16), dtype=np.int16)
                rows.append(schema.ShardRow.from_entry(index, entry, codes=codes, duration=seconds,
                                                       sample_rate=24000))
        good = [r for r in rows if r.ok]
        stats = schema.ShardStats(rows=len(rows), rows_ok=len(good), rows_error=len(rows) - len(good),
                                  audio_seconds=sum(r.duration for r in good), frames=sum(r.num_frames for r in good),
                                  encode_seconds=2.0, worker=f"encoder-{shard % encoders}")
        path = root / schema.SHARDS_DIR / schema.shard_name(shard)
        pq.write_table(schema.build_table(rows, stats), path)
        os.utime(path, (start + shard, start + shard))
    (root / schema.WORKERS_DIR).mkdir()
    for e in range(encoders):
        (root / schema.WORKERS_DIR / f"encoder-{e}.json").write_text(json.dumps({
            "name": f"encoder-{e}", "node": f"10.0.0.{e // 8}", "hostname": f"node-{e // 8}", "device": f"npu:{e % 8}",
            "shard": shards + e, "rows": 100, "rows_error": 1, "rows_per_s": 3.0, "audio_seconds_per_s": 12.0,
            "updated": time.time() + 3600}))  # alive for the whole run


def start_server(output: Path, token_file: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "services.status", "--output", str(output), "--port", str(port),
                             "--token-file", str(token_file)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def timed_get(client: httpx.Client, route: str) -> float:
    started = time.perf_counter()
    response = client.get(route)
    elapsed = time.perf_counter() - started
    if response.status_code != 200 or not response.content:
        raise RuntimeError(f"GET {route}: HTTP {response.status_code}")
    return elapsed * 1000


def measure(output: Path, requests: int, work: Path) -> dict:
    from tests.raycluster import free_port

    token = secrets.token_hex(16)
    token_file = work / "token"
    token_file.write_text(token)
    port = free_port()
    server = start_server(output, token_file, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                          timeout=300) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.get("/healthz")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("the status server did not start")
                    time.sleep(0.1)
            first = {route: timed_get(client, route) for route in ROUTES}
            cached = rounds(client, requests, None)
            changed = rounds(client, requests, output / schema.WORKERS_DIR / "encoder-0.json")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"first_ms": first, "cached": cached, "changed": changed}


def rounds(client: httpx.Client, requests: int, heartbeat: Path | None) -> dict:
    """`requests` rounds of every route; with `heartbeat`, rewritten before each round (a new heartbeat changes
    the workers directory, so the server recomputes its snapshot and the page for that round)."""
    times: dict[str, list[float]] = {route: [] for route in ROUTES}
    started = time.perf_counter()
    for i in range(requests):
        if heartbeat is not None:
            beat = json.loads(heartbeat.read_text())
            beat["rows"] = i
            tmp = heartbeat.with_suffix(f".tmp{i}")
            tmp.write_text(json.dumps(beat))
            tmp.replace(heartbeat)
        for route in ROUTES:
            times[route].append(timed_get(client, route))
    return {"span_s": time.perf_counter() - started,
            **{route: {"median_ms": statistics.median(v), "p95_ms": float(np.percentile(v, 95)), "max_ms": max(v)}
               for route, v in times.items()}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="300 shards, 60 rounds")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--shards", type=int, default=2000)
    p.add_argument("--rows-per-shard", type=int, default=8)
    p.add_argument("--encoders", type=int, default=16)
    p.add_argument("--requests", type=int, default=200, help="rounds of the three routes, per mode")
    args = p.parse_args(argv)
    if args.quick:
        args.shards, args.requests = 300, 60
    with tempfile.TemporaryDirectory(prefix="status-page-bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        write_output(work / "out", args.shards, args.rows_per_shard, args.encoders)
        written = time.perf_counter() - started
        result = measure(work / "out", args.requests, work)
    result.update(machine=machine_info(), shards=args.shards, rows_per_shard=args.rows_per_shard,
                  encoders=args.encoders, requests=args.requests, write_s=written)
    print(f"{args.shards} shards x {args.rows_per_shard} rows, {args.encoders} encoders; written in {written:.1f} s; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(markdown_table(
        ["route", "first request ms", "cached median ms", "cached p95 ms", "changed median ms", "changed p95 ms"],
        [[route, result["first_ms"][route], result["cached"][route]["median_ms"], result["cached"][route]["p95_ms"],
          result["changed"][route]["median_ms"], result["changed"][route]["p95_ms"]] for route in ROUTES]))
    checks = []
    for mode in ("cached", "changed"):
        status = result[mode]["/status"]["median_ms"]
        checks += [(f"page / status ({mode}, median)", ratio(result[mode]["/"]["median_ms"], status), None),
                   (f"metrics / status ({mode}, median)", ratio(result[mode]["/metrics"]["median_ms"], status), None)]
    for line in ratio_lines(checks):
        print(line)
    result["ratios"] = {name: value for name, value, _ in checks}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
