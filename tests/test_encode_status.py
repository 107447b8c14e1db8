"""GET /status from the real uvicorn server the encode driver runs, during the run, and from the
standalone server afterwards (the truth is on disk, so a restarted server reports the same)."""
import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from services.status.page import clock
from services.status.progress import format_duration
from shared.schema import SHARDS_DIR, SUMMARY_FILE, WORKERS_DIR

from tests.conftest import REPO, synth_corpus, write_manifest
from tests.raycluster import free_port


def test_status_during_and_after_a_run(tiny_codec_dir, tmp_path):
    entries = synth_corpus(tmp_path / "wav", [(1.0 + 0.05 * i, 24_000) for i in range(40)])
    manifest = write_manifest(tmp_path / "raw.jsonl", entries)
    out, port = tmp_path / "out", free_port()
    cmd = [sys.executable, "-m", "services.encode", "--manifest", str(manifest), "--codec", str(tiny_codec_dir),
           "--output", str(out), "--shard-size", "1", "--max-batch-items", "1", "--device", "cpu",
           "--status-port", str(port)]
    job = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    during = []
    try:
        deadline = time.time() + 240
        while job.poll() is None and time.time() < deadline:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/status", timeout=5)
                if response.status_code == 200:
                    during.append(response.json())
            except httpx.TransportError:
                pass  # not up yet, or already stopped
            time.sleep(0.1)
        output, _ = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode == 0, output[-3000:]
    running = [s for s in during if s["state"] == "running"]
    assert running, f"no /status answer while the job ran: {during[-1:]}"
    assert all(s["shards"]["total"] == 40 for s in running)
    assert any(e["alive"] for s in running for e in s["encoders"])
    done_counts = [s["shards"]["done"] for s in during]
    assert done_counts == sorted(done_counts)  # progress never goes backwards

    port2 = free_port()
    server = subprocess.Popen([sys.executable, "-m", "services.status", "--output", str(out), "--port", str(port2)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                after = httpx.get(f"http://127.0.0.1:{port2}/status", timeout=5).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert after["state"] == "complete"
        assert after["shards"]["done"] == after["shards"]["total"] == 40
        assert after["rows"]["ok"] == 40 and after["rows"]["error"] == 0
        assert abs(after["audio_hours"] * 3600 - sum(1.0 + 0.05 * i for i in range(40))) < 0.01
        age_heartbeats(out, 35 * 60)
        assert_reads_as_finished(out, f"http://127.0.0.1:{port2}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def age_heartbeats(out, seconds: float) -> None:
    """What the encoders' heartbeats look like `seconds` after the job ended."""
    for beat in (out / WORKERS_DIR).glob("*.json"):
        record = json.loads(beat.read_text())
        record["updated"] -= seconds
        beat.write_text(json.dumps(record))


def assert_reads_as_finished(out, url: str) -> None:
    """Long after the job: encoders finished (not red "stale" with a 35-minute heartbeat age), nodes not "0 / 1"
    alive, the job's own rate and duration named as such, and a chart that ends with its last shard."""
    summary = json.loads((out / SUMMARY_FILE).read_text())
    status = httpx.get(f"{url}/status", timeout=30).json()
    body = httpx.get(f"{url}/", timeout=30).text.split("<body>", 1)[1]
    assert status["state"] == "complete" and status["encoders"]
    assert {(e["state"], e["alive"]) for e in status["encoders"]} == {("finished", False)}
    assert status["rate_basis"] == "wall_time" and status["duration_seconds"] == summary["elapsed_seconds"]
    rows = summary["rows_ok"] + summary["rows_error"]
    assert status["rate"]["rows_per_s"] == pytest.approx(rows / summary["elapsed_seconds"])
    assert "stale" not in body and "0:35:" not in body and " / " not in body.split("<h2>Nodes</h2>", 1)[1]
    assert body.count('<span class="badge finished">finished</span>') == len(status["encoders"])
    assert f"finished in {format_duration(summary['elapsed_seconds'])}: {status['rate']['rows_per_s']:.1f} rows/s" \
        in body and "over the job&#x27;s wall time (start-up included)" in body
    last_published = max(p.stat().st_mtime for p in (out / SHARDS_DIR).glob("shard-*.parquet"))
    axis = re.findall(r"<span>(\d\d:\d\d:\d\d)</span>", body.split('class="axis"', 1)[1].split("</div>", 1)[0])
    assert axis[-1] == clock(last_published), (axis, clock(last_published))
