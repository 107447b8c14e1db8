"""The encode job with its whole output on an S3-compatible store (a real moto server on loopback, see
tests/s3server.py): faults injected into one run, the bucket listed all along, and bad store settings refused
before Ray starts. The commit protocol is in docs/design.md ("Storage")."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from shared.schema import COMPLETE_MARKER, LEASE_FILE, SHARDS_DIR, WORKERS_DIR, published_shards, shard_id_of
from shared.store import open_store
from tests.conftest import REPO, assert_rows_match, encode_args, repeated_corpus, write_manifest
from tests.raycluster import Background, LocalRayCluster, wait_for
from tests.s3server import free_port

ROWS, SHARD_SIZE = 240, 8
SHARDS = ROWS // SHARD_SIZE
LEASE_SECONDS = 12
BUCKET = "encode-out"


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A `ray start --head` cluster whose workers read the test store's endpoint and credentials from the
    standard variables, as nodes of a real cluster do from their own environment or role."""
    ray_cluster = LocalRayCluster()
    ray_cluster.env.update(s3_server.env())
    yield ray_cluster.start_head(num_cpus=2, resources={"NPU": 2})
    ray_cluster.stop()


class BucketWatcher:
    """Lists the job's shards/ all through the run; every object under a final name must be a whole shard
    (its Parquet footer readable, all its rows there)."""

    def __init__(self, uri: str):
        self.store = open_store(uri)
        self.seen: set[str] = set()
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for name in self.store.listing(SHARDS_DIR):
                if name in self.seen:
                    continue
                if shard_id_of(name) is None:
                    self.bad.append(f"{name}: a non-shard object under shards/")
                    continue
                try:
                    rows = pq.read_metadata(self.store.location(f"{SHARDS_DIR}/{name}")).num_rows
                except Exception as exc:
                    rows, exc_text = -1, str(exc)
                    self.bad.append(f"{name}: unreadable ({exc_text})")
                if rows != SHARD_SIZE:
                    self.bad.append(f"{name}: {rows} rows")
                self.seen.add(name)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def busy_encoder(store, timeout: float) -> dict:
    def find():
        for name in store.listing(WORKERS_DIR):
            beat = store.read_json(f"{WORKERS_DIR}/{name}")
            if beat and beat.get("shard") is not None:
                return beat
    return wait_for(find, timeout, "an encoder busy with a shard", interval=0.3)


def test_s3_output_survives_a_killed_encoder_and_driver_and_refuses_a_second_driver(
        cluster, s3_server, s3_env, cycled_clips, tiny_codec_dir, tmp_path):
    entries = repeated_corpus(cycled_clips[0], ROWS)
    manifest = write_manifest(tmp_path / "raw.jsonl", entries)
    uri = f"s3://{BUCKET}/faults"
    store = open_store(uri)
    args = encode_args(manifest, tiny_codec_dir, uri, "--shard-size", str(SHARD_SIZE), "--max-batch-items", "1",
                       "--lease-seconds", str(LEASE_SECONDS))
    watcher = BucketWatcher(uri)
    try:
        with cluster.driver(*args, log=tmp_path / "first.log") as first:
            victim = busy_encoder(store, 240)
            os.kill(victim["pid"], signal.SIGKILL)  # mid-shard: its multipart upload is never completed
            with cluster.driver(*args, log=tmp_path / "second.log") as second:
                assert second.wait(timeout=120) == 3, second.output[-3000:]
            assert "leased by another encode job" in second.output
            wait_for(lambda: len(store.listing(SHARDS_DIR)) >= 8, 240, "eight published shards")
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        assert f"{victim['name']} lost" in first.output, first.output[-3000:]
        before = {n: i.tag for n, i in store.listing(SHARDS_DIR).items()}
        assert 8 <= len(before) < SHARDS, "the driver must be killed part-way through"
        with cluster.driver(*args, log=tmp_path / "early.log") as early:  # the dead driver's lease is still live
            assert early.wait(timeout=120) == 3, early.output[-3000:]
        assert "leased by another encode job" in early.output
        time.sleep(LEASE_SECONDS)
        with cluster.driver(*args, log=tmp_path / "resumed.log") as resumed:
            assert resumed.wait(timeout=300) == 0, resumed.output[-4000:]
    finally:
        watcher.stop()
    assert "took over the expired lease" in resumed.output
    # The killed driver's encoders are Ray actors of the cluster: one still in flight may publish after `before`
    # was listed (the lease fences drivers, not their actors), never rewriting a published shard (checked below).
    published, to_encode = map(int, re.search(r"(\d+) already published, (\d+) to encode", resumed.output).groups())
    assert published >= len(before) and published + to_encode == SHARDS, resumed.output[-3000:]
    assert not watcher.bad, watcher.bad
    after = store.listing(SHARDS_DIR)
    assert len(after) == SHARDS and {n: after[n].tag for n in before} == before, "a published shard was rewritten"
    assert_rows_match(uri, entries, cycled_clips[1])  # every row once, codes equal to a clean local encode
    uploads = s3_server.client().list_multipart_uploads(Bucket=BUCKET, Prefix="faults/").get("Uploads", [])
    assert uploads == [], "an unfinished upload was left behind"
    assert not store.exists(LEASE_FILE)  # released by the driver that finished
    complete = store.read_json(COMPLETE_MARKER)
    assert [s["name"] for s in complete["shards"]] == [f"{SHARDS_DIR}/{n}" for n in sorted(after)]
    assert all(s["rows"] == SHARD_SIZE and s["size"] == after[s["name"].split("/")[1]].size
               for s in complete["shards"])
    import hashlib
    first_shard = complete["shards"][0]
    assert hashlib.sha256(store.read_bytes(first_shard["name"])).hexdigest() == first_shard["sha256"]
    plan = store.read_bytes("plan.json").decode()
    assert s3_server.keys["writer"][1] not in plan and "SECRET" not in plan.upper()


def encode_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "", **env}
    return subprocess.run([sys.executable, "-m", "services.encode", "--device", "cpu", *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=120)


def test_bad_object_store_settings_are_one_line_each_before_ray_and_nothing_is_written(
        s3_server, cycled_clips, tiny_codec_dir, tmp_path):
    manifest = write_manifest(tmp_path / "raw.jsonl", cycled_clips[0])
    good = s3_server.env()
    cases = [
        ("s3://encode-out/bad", {**good, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
         "cannot reach the object store"),
        ("s3://encode-out/bad", s3_server.env(secret="not-the-secret"), "refused the credentials"),
        ("s3://no-such-bucket/bad", good, "bucket 'no-such-bucket' does not exist"),
        ("s3://encode-out/bad", s3_server.env("reader"), "may not write to s3://encode-out/bad/"),
    ]
    for uri, env, reason in cases:
        done = encode_cli(["--manifest", str(manifest), "--codec", str(tiny_codec_dir), "--output", uri], env)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
        assert lines[0].startswith(f"error: --output {uri}: ") and reason in lines[0], lines[0]
        assert env["AWS_SECRET_ACCESS_KEY"] not in done.stderr + done.stdout
        assert "Ray" not in done.stdout
    assert s3_server.keys_under("encode-out", "bad") == []
    client = s3_server.client()
    assert client.list_multipart_uploads(Bucket="encode-out", Prefix="bad").get("Uploads", []) == []
