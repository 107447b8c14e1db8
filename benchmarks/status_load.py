"""Bounded local load on GET /status while a real encode job runs.

    python -m benchmarks.status_load [--clients 200] [--seconds 10] [--utterances 600] [--json out.json]

Writes the tiny random codec and a generated KAN-TTS corpus (converted to the raw manifest) into a work
directory, starts `python -m services.encode` on it (private local Ray, CPU encoders, status server on
127.0.0.1 with a bearer token), waits until its encoders run, then keeps `--clients` concurrent HTTP clients
requesting /status for `--seconds`, and interrupts the encode. Everything is bounded: set-up and start-up
have deadlines, each request has a timeout, and the encode is stopped (SIGINT, then its process group killed)
whatever happens. The load only ever targets 127.0.0.1.

Reports requests, errors (any non-200, transport failure, or body that is not a JSON status object),
throughput and latency percentiles; --json writes the same report as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
REQUEST_TIMEOUT_S = 10.0
STARTUP_TIMEOUT_S = 180.0  # plan + private Ray start + encoder actors loading the codec
STOP_GRACE_S = 30.0
STATUS_URL = re.compile(r"status: (http://127\.0\.0\.1:\d+)/status")


def prepare_inputs(workdir: Path, utterances: int, codec: Path | None) -> tuple[Path, Path]:
    """The raw manifest of a generated corpus, and a codec directory (the tiny random one unless given)."""
    from services import kantts
    from shared.synth import write_kantts_tree
    from shared.tiny_codec import write_codec

    if codec is None:
        codec = write_codec(workdir / "codec")
    tree = write_kantts_tree(workdir / "corpus", utterances, seconds=(1.0, 3.0))
    manifest = workdir / "train_raw.jsonl"
    kantts.write_jsonl(kantts.convert(tree).rows, manifest)
    return manifest, codec


class EncodeJob:
    """`python -m services.encode` in its own process group, so that stopping it reaches its private Ray too."""

    def __init__(self, manifest: Path, codec: Path, workdir: Path):
        self.token = secrets.token_hex(16)
        token_file = workdir / "status-token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        self.log_path = workdir / "encode.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.encode", "--manifest", str(manifest), "--codec", str(codec),
             "--output", str(workdir / "encoded"), "--device", "cpu", "--shard-size", "8",
             "--status-host", LOOPBACK, "--status-port", "0", "--status-token-file", str(token_file)],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url: str | None = None

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_until_encoding(self, timeout: float = STARTUP_TIMEOUT_S) -> dict:
        """Block until /status answers and at least one encoder heartbeat is alive; return that status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"encode exited with {self.proc.returncode} before encoding:\n{self.log_tail()}")
            if self.url is None:
                found = STATUS_URL.search(self.log_path.read_text(errors="replace"))
                self.url = found.group(1) if found else None
            if self.url is not None:
                try:
                    status = httpx.get(f"{self.url}/status", headers=self.headers, timeout=5).json()
                    if status["state"] == "running" and any(e["alive"] for e in status["encoders"]):
                        return status
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
            time.sleep(0.5)
        raise TimeoutError(f"encode did not start encoding within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the driver shuts its Ray down on KeyboardInterrupt
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything of ours still left in its group
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    errors: Counter = field(default_factory=Counter)
    error_examples: dict = field(default_factory=dict)  # kind -> the first message of that kind
    states: Counter = field(default_factory=Counter)  # job state reported by each valid response
    with_live_encoder: int = 0  # valid responses that showed at least one live encoder
    elapsed: float = 0.0
    client_cpu: float = 0.0  # CPU seconds the clients themselves used: they share the machine with the server

    @property
    def requests(self) -> int:
        return len(self.latencies) + sum(self.errors.values())

    def report(self) -> dict:
        ms = np.array(self.latencies) * 1000.0
        pct = {f"p{q}": round(float(np.percentile(ms, q)), 2) if len(ms) else None for q in (50, 95, 99)}
        return {"requests": self.requests, "ok": len(self.latencies), "errors": sum(self.errors.values()),
                "errors_by_kind": dict(self.errors), "error_examples": self.error_examples,
                "requests_per_s": round(self.requests / self.elapsed, 1),
                "latency_ms": {**pct, "max": round(float(ms.max()), 2) if len(ms) else None,
                               "mean": round(float(ms.mean()), 2) if len(ms) else None},
                "states_seen": dict(self.states), "responses_with_live_encoder": self.with_live_encoder,
                "elapsed_s": round(self.elapsed, 2), "client_cpu_s": round(self.client_cpu, 2)}


def check_status_body(response: httpx.Response) -> dict:
    """The body must be the status object; anything else counts as an error, whatever the HTTP code."""
    if response.status_code != 200:
        raise ValueError(f"http_{response.status_code}")
    try:
        body = response.json()
    except ValueError:
        raise ValueError("invalid_json") from None
    if not isinstance(body, dict) or not {"state", "shards", "rows", "encoders"} <= body.keys():
        raise ValueError("not_a_status_object")
    return body


async def run_load(url: str, headers: dict, clients: int, seconds: float) -> LoadResult:
    """`clients` coroutines, each with its own keep-alive connection, requesting /status back to back."""
    if httpx.URL(url).host != LOOPBACK:
        raise ValueError(f"load is only ever sent to {LOOPBACK}, not {url}")
    result = LoadResult()
    # Drop pooled connections after 2 s idle, below uvicorn's 5 s keep-alive timeout: at exactly equal timeouts
    # a request can be sent on a connection the server is closing (a reset, counted as an error, that is a
    # property of HTTP keep-alive rather than of the status server). Requests themselves are not retried.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        start, cpu_start = time.perf_counter(), time.process_time()
        deadline = start + seconds

        async def one_client() -> None:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                try:
                    body = check_status_body(await client.get("/status"))
                except ValueError as exc:
                    result.errors[str(exc)] += 1
                    continue
                except httpx.HTTPError as exc:
                    kind = type(exc).__name__
                    result.errors[kind] += 1
                    result.error_examples.setdefault(kind, f"{exc!r} after {time.perf_counter() - sent:.2f} s")
                    continue
                result.latencies.append(time.perf_counter() - sent)
                result.states[body["state"]] += 1
                result.with_live_encoder += any(e.get("alive") for e in body["encoders"])

        await asyncio.wait_for(asyncio.gather(*(one_client() for _ in range(clients))),
                               timeout=seconds + REQUEST_TIMEOUT_S + 5)
        result.elapsed = time.perf_counter() - start
        result.client_cpu = time.process_time() - cpu_start
    return result


def benchmark(args: argparse.Namespace, workdir: Path) -> dict:
    started, load_at_start = time.monotonic(), os.getloadavg()
    manifest, codec = prepare_inputs(workdir, args.utterances, args.codec)
    job = EncodeJob(manifest, codec, workdir)
    try:
        before = job.wait_until_encoding()
        load = asyncio.run(run_load(job.url, job.headers, args.clients, args.seconds))
        after = httpx.get(f"{job.url}/status", headers=job.headers, timeout=REQUEST_TIMEOUT_S).json()
    finally:
        job.stop()
    return {
        "benchmark": "status_load",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.status_load " + " ".join(args.argv),
        # The load average says how much else shared the machine (clients, server and encoders all compete).
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_at_start": [round(x, 2) for x in load_at_start]},
        "params": {"clients": args.clients, "seconds": args.seconds, "utterances": args.utterances,
                   "target": f"{LOOPBACK} GET /status with bearer token"},
        "load": load.report(),
        "encode_during_load": {"shards_done_before": before["shards"]["done"],
                               "shards_done_after": after["shards"]["done"], "shards_total": after["shards"]["total"],
                               "state_after": after["state"]},
        "wall_s": round(time.monotonic() - started, 1),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.status_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=200, help="concurrent clients")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of the load")
    p.add_argument("--utterances", type=int, default=600, help="generated clips: enough to outlast the load")
    p.add_argument("--codec", type=Path, default=None, help="codec directory (default: write the tiny random one)")
    p.add_argument("--workdir", type=Path, default=None, help="keep inputs and logs here (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    if args.clients < 1 or not 0 < args.seconds <= 600:
        p.error("--clients must be >= 1 and --seconds in (0, 600]")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = benchmark(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="status-load-") as tmp:
            report = benchmark(args, Path(tmp))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
