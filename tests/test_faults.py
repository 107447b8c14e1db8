"""Faults injected into a real encode: a `ray start --head` cluster with two fake NPUs, drivers started as
plain processes (so the test holds their pids), and SIGKILL, a second job, a read-only mount and a full tmpfs.
After each, the Parquet rows are checked against the manifest: every line once, its id, its codes."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from shared.schema import SHARDS_DIR, published_shards
from tests.conftest import (assert_lost_shards_redone_elsewhere, assert_rows_match, busy_encoder, encode_args,
                            heartbeats, repeated_corpus, write_manifest)
from tests.raycluster import LocalRayCluster, wait_for

# One clip per codec call, 8 rows a shard: 30 shards, a few seconds of work for two encoders.
ROWS, SHARD_SIZE = 240, 8
SHARDS = ROWS // SHARD_SIZE


@pytest.fixture(scope="module")
def cluster():
    ray_cluster = LocalRayCluster().start_head(num_cpus=2, resources={"NPU": 2})
    yield ray_cluster
    ray_cluster.stop()


@pytest.fixture
def job(cycled_clips, tiny_codec_dir, tmp_path):
    """(manifest entries, encode arguments, output directory) of a fresh job."""
    entries = repeated_corpus(cycled_clips[0], ROWS)
    manifest = write_manifest(tmp_path / "raw.jsonl", entries)
    out = tmp_path / "out"
    args = encode_args(manifest, tiny_codec_dir, out, "--shard-size", str(SHARD_SIZE), "--max-batch-items", "1")
    return entries, args, out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def mtimes(out: Path) -> dict[int, int]:
    return {sid: os.stat(path).st_mtime_ns for sid, path in published_shards(out).items()}


def test_encoder_killed_mid_shard_is_redone_elsewhere(cluster, job, cycled_clips, tmp_path):
    entries, args, out = job
    with cluster.driver(*args, log=tmp_path / "driver.log") as driver:
        victim = busy_encoder(out, 180)
        os.kill(victim["pid"], signal.SIGKILL)
        assert driver.wait(timeout=240) == 0, driver.output[-4000:]
    assert_lost_shards_redone_elsewhere(driver.output, victim, out, entries, cycled_clips[1])


def test_driver_killed_mid_run_then_resubmitted_finishes_only_missing_shards(cluster, job, cycled_clips, tmp_path):
    entries, args, out = job
    with cluster.driver(*args, log=tmp_path / "first.log") as first:
        wait_for(lambda: len(published_shards(out)) >= 3, 180, "three published shards")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    # Its encoders are owned by it and die with it (the lock, an fcntl lock, went with its process).
    wait_for(lambda: not any(alive(b["pid"]) for b in heartbeats(out).values()), 60,
             "the killed driver's encoders to exit")
    before = mtimes(out)
    assert 3 <= len(before) < SHARDS, "the driver must be killed part-way through"
    with cluster.driver(*args, log=tmp_path / "second.log") as second:
        assert second.wait(timeout=240) == 0, second.output[-4000:]
    assert f"{len(before)} already published, {SHARDS - len(before)} to encode" in second.output
    after = mtimes(out)
    assert {sid: after[sid] for sid in before} == before, "a published shard was rewritten"
    assert_rows_match(out, entries, cycled_clips[1])


def test_two_jobs_on_one_output_at_once_the_second_refuses(cluster, job, cycled_clips, tmp_path):
    entries, args, out = job
    with cluster.driver(*args, log=tmp_path / "a.log") as a, cluster.driver(*args, log=tmp_path / "b.log") as b:
        codes = {a.wait(timeout=240): a, b.wait(timeout=240): b}
    assert sorted(codes) == [0, 3], {code: proc.output[-2000:] for code, proc in codes.items()}
    assert f"{out} is in use by another encode job" in codes[3].output
    assert_rows_match(out, entries, cycled_clips[1])


class ReadOnlyShards:
    """shards/ bind-mounted onto itself, then remounted read-only (root ignores file modes, not mounts)."""
    message = "Read-only file system; make it writable and re-run the same command"

    def __init__(self, shards: Path):
        self.shards = shards
        mount("--bind", shards, shards)

    def inject(self) -> None:
        mount("-o", "remount,bind,ro", self.shards)

    def fix(self) -> None:
        mount("-o", "remount,bind,rw", self.shards)

    def remove(self) -> None:
        subprocess.run(["umount", "-l", str(self.shards)], timeout=30, check=False)


class FullShardsDisk(ReadOnlyShards):
    """shards/ on a 1 MiB tmpfs, filled up by a file that is deleted to fix it."""
    message = "No space left on device; free space there (or use another --output) and re-run the same command"

    def __init__(self, shards: Path):
        self.shards, self.filler = shards, shards / "filler"
        mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", shards)

    def inject(self) -> None:
        with open(self.filler, "ab", buffering=0) as f:  # unbuffered: nothing left to flush on close
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass

    def fix(self) -> None:
        self.filler.unlink()


def mount(*args) -> None:
    """mount(8), retried: a remount has been seen to fail once (exit 32) on a loaded machine."""
    for attempt in range(3):
        result = subprocess.run(["mount", *map(str, args)], timeout=30, capture_output=True, text=True)
        if result.returncode == 0:
            return
        time.sleep(1.0)
    raise RuntimeError(f"mount {' '.join(map(str, args))} failed ({result.returncode}): {result.stderr.strip()}")


@pytest.mark.parametrize("fault", [ReadOnlyShards, FullShardsDisk], ids=["read-only", "disk-full"])
def test_shards_that_cannot_be_written_stop_the_job_with_the_fix_and_a_rerun_completes(cluster, job, cycled_clips,
                                                                                       tmp_path, fault):
    entries, args, out = job
    (out / SHARDS_DIR).mkdir(parents=True)
    storage = fault(out / SHARDS_DIR)
    try:
        with cluster.driver(*args, log=tmp_path / "first.log") as first:
            wait_for(lambda: len(published_shards(out)) >= 2, 180, "two published shards")
            storage.inject()
            assert first.wait(timeout=120) == 4, first.output[-4000:]
        assert f"error: cannot write {out / SHARDS_DIR}: {storage.message}" in first.output
        kept = mtimes(out)
        assert 2 <= len(kept) < SHARDS
        storage.inject()  # again: a shard that failed freed its temporary's space
        with cluster.driver(*args, log=tmp_path / "unfixed.log") as unfixed:  # refused before any encoder starts
            assert unfixed.wait(timeout=120) == 4, unfixed.output[-4000:]
        assert f"error: cannot write {out / SHARDS_DIR}: {storage.message}" in unfixed.output
        storage.fix()
        with cluster.driver(*args, log=tmp_path / "fixed.log") as fixed:
            assert fixed.wait(timeout=240) == 0, fixed.output[-4000:]
        after = mtimes(out)
        assert {sid: after[sid] for sid in kept} == kept, "a shard published before the fault was rewritten"
        assert_rows_match(out, entries, cycled_clips[1])
    finally:
        storage.remove()
