"""Status, /metrics and the JSONL export read an encode output on an S3-compatible store (a real moto server,
tests/s3server.py) exactly as they read the same files on a path."""
import json
import urllib.request
import uuid

from services.encode.finalize import export_jsonl
from services.status.progress import collect_progress
from services.status.server import start_status_server
from shared.store import open_store
from tests.s3server import upload_tree as upload


def running_job(encode_output):
    encode_output.plan(4)
    encode_output.shard(0, errors=1)
    encode_output.shard(1)
    encode_output.heartbeat("encoder-0", shard=2)
    encode_output.driver()


def test_progress_status_and_metrics_of_an_s3_output_equal_the_local_ones(encode_output, s3_env):
    running_job(encode_output)
    uri = f"s3://encode-out/status-{uuid.uuid4().hex[:8]}"
    upload(encode_output.root, uri)
    local, remote = collect_progress(encode_output.root, now=1e10), collect_progress(uri, now=1e10)
    assert remote == local and remote["shards"]["done"] == 2 and remote["rows"]["error"] == 1
    now_local = collect_progress(encode_output.root)
    assert now_local["state"] == "running" and now_local["shards"]["running"] == 1
    with start_status_server(uri, "127.0.0.1", 0) as server:
        status = json.loads(urllib.request.urlopen(f"{server.url}/status", timeout=30).read())
        metrics = urllib.request.urlopen(f"{server.url}/metrics", timeout=30).read().decode()
        page = urllib.request.urlopen(f"{server.url}/", timeout=30).read().decode()
    assert status["state"] == "running" and status["shards"] == now_local["shards"]
    assert status["rows"] == now_local["rows"]
    with start_status_server(encode_output.root, "127.0.0.1", 0) as server:
        local_metrics = urllib.request.urlopen(f"{server.url}/metrics", timeout=30).read().decode()
    def samples(text):  # time-based gauges aside, the same series and values
        return sorted(line for line in text.splitlines() if line and not line.startswith("#")
                      and "seconds" not in line.split("{")[0] and "updated" not in line and "age" not in line)
    assert len(samples(metrics)) > 5 and samples(metrics) == samples(local_metrics)
    assert "encoder-0" in page


def test_export_jsonl_to_an_s3_uri_equals_the_local_export(encode_output, s3_env, tmp_path):
    running_job(encode_output)
    uri = f"s3://encode-out/export-{uuid.uuid4().hex[:8]}"
    upload(encode_output.root, uri)
    local = export_jsonl(encode_output.root, tmp_path / "train_with_codes.jsonl")
    remote = export_jsonl(uri, f"{uri}/export/train_with_codes.jsonl")
    assert remote.rows == local.rows == 7
    exported = open_store(f"{uri}/export").read_bytes("train_with_codes.jsonl")
    assert exported == (tmp_path / "train_with_codes.jsonl").read_bytes()
