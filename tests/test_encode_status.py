"""GET /status from the real uvicorn server the encode driver runs, during the run, and from the
standalone server afterwards (the truth is on disk, so a restarted server reports the same)."""
import os
import subprocess
import sys
import time

import httpx

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
    finally:
        server.terminate()
        server.wait(timeout=30)
