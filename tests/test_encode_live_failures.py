"""Failures and retries reach driver.json, and so GET /status, while the job runs (not when it ends).

A shard is made to fail for real: after planning, the test joins two lines of shard 0's range in the job's
manifest.jsonl (same bytes, one line fewer, not JSON any more), so the encoder raises on that shard. The status
polled over HTTP must show it failed while the other shards are still being encoded; a rerun shows the retry while
it runs, and once the line is restored the retry succeeds and the job completes."""
import json
import os
import re
import sys
import urllib.request

from services.encode.plan import load_plan, prepare_plan
from shared.schema import MANIFEST_FILE
from tests.conftest import assert_rows_match, encode_args, repeated_corpus, write_manifest
from tests.raycluster import Background, wait_for

ROWS, SHARD_SIZE = 96, 8  # 12 shards: one encoder needs a few seconds for the 11 good ones


def status_url(driver: Background) -> str:
    found = wait_for(lambda: re.search(r"status: (http://\S+/status)", driver.output) or driver.proc.poll() is not None,
                     240, "the status server's address in the driver log")
    assert found is not True, driver.output[-3000:]
    return found.group(1)


def get_status(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def break_shard_zero(out) -> tuple[int, bytes]:
    """Join shard 0's first two lines; returns (offset, original byte) to restore it."""
    plan = load_plan(out)
    manifest = out / MANIFEST_FILE
    data = manifest.read_bytes()
    newline = data.index(b"\n", plan.shards[0].byte_start)
    assert newline < plan.shards[0].byte_end - 1
    with open(manifest, "r+b") as f:
        f.seek(newline)
        f.write(b" ")
    return newline, b"\n"


def restore(out, offset: int, byte: bytes) -> None:
    with open(out / MANIFEST_FILE, "r+b") as f:
        f.seek(offset)
        f.write(byte)


def test_failed_shards_and_retries_show_on_status_while_the_job_runs(tiny_codec_dir, cycled_clips, tmp_path):
    entries = repeated_corpus(cycled_clips[0], ROWS)
    manifest = write_manifest(tmp_path / "raw.jsonl", entries)
    out = tmp_path / "out"
    out.mkdir()
    prepare_plan(out, manifest, tiny_codec_dir, SHARD_SIZE)  # what the driver does first; it reuses this plan
    offset, byte = break_shard_zero(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    base = [sys.executable, "-m", "services.encode", "--device", "cpu", "--num-encoders", "1",
            *encode_args(manifest, tiny_codec_dir, out, "--shard-size", str(SHARD_SIZE), "--max-batch-items", "1")]
    # Regular progress ticks a minute apart: only the failure itself can have written driver.json in time.
    slow_ticks = ["--progress-seconds", "60"]

    with Background([*base, *slow_ticks, "--max-retries", "0"], env=env, log=tmp_path / "first.log") as first:
        url = status_url(first)
        status = wait_for(lambda: (s := get_status(url))["shards"]["failed"] and s, 240, "a failed shard on /status")
        assert first.proc.poll() is None, "the failure must be seen while the job runs"
        assert status["state"] == "running" and status["shards"]["pending"] > 0, status
        assert status["shards"]["failed"] == 1
        driver = json.loads((out / "driver.json").read_text())
        assert list(driver["failed_shards"]) == ["0"] and "JSONDecodeError" in driver["failed_shards"]["0"], driver
        first.proc.kill()  # mid-run, so that the rerun has shards to encode after shard 0's first attempt
        first.proc.wait(timeout=30)

    with Background([*base, *slow_ticks], env=env, log=tmp_path / "second.log") as second:
        url = status_url(second)
        status = wait_for(lambda: (s := get_status(url))["faults"]["shard_retries"] and s, 240, "a retry on /status")
        assert second.proc.poll() is None and status["state"] == "running", status
        assert status["shards"]["failed"] == 0  # retried, not failed
        restore(out, offset, byte)  # the retry comes after the other pending shards: it now succeeds
        assert second.wait(timeout=240) == 0, second.output[-4000:]
    assert "shard 0 failed on encoder-0 (attempt 1)" in second.output
    final = json.loads((out / "driver.json").read_text())
    assert final["failed_shards"] == {} and final["shard_retries"] == 1 and final["state"] == "finished", final
    assert_rows_match(out, entries, cycled_clips[1])
