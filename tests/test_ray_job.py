"""`ray job submit --working-dir` of the encode onto a real `ray start --head` cluster with fake NPUs and
token authentication on: one encoder per NPU, each with its own ASCEND_RT_VISIBLE_DEVICES."""
import json

import pytest

from shared.schema import published_shards, read_stats
from tests.conftest import synth_corpus, write_manifest
from tests.raycluster import LocalRayCluster


@pytest.fixture(scope="module")
def npu_cluster():
    cluster = LocalRayCluster().start_head(num_cpus=2, resources={"NPU": 2})
    yield cluster
    cluster.stop()


def test_job_submit_places_one_encoder_per_npu(npu_cluster, tiny_codec_dir, tmp_path):
    entries = synth_corpus(tmp_path / "wav", [(0.6 + 0.1 * (i % 5), 24_000) for i in range(16)])
    manifest = write_manifest(tmp_path / "raw.jsonl", entries)
    out = tmp_path / "out"
    result = npu_cluster.submit("python", "-m", "services.encode", "--manifest", str(manifest), "--codec",
                                str(tiny_codec_dir), "--output", str(out), "--shard-size", "2", "--status-port", "0")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "succeeded" in result.stdout + result.stderr
    heartbeats = [json.loads(p.read_text()) for p in sorted((out / "workers").glob("*.json"))]
    assert [h["name"] for h in heartbeats] == ["encoder-0", "encoder-1"]
    visible = sorted(h["visible_devices"]["ASCEND_RT_VISIBLE_DEVICES"] for h in heartbeats)
    assert visible == ["0", "1"]
    shards = published_shards(out)
    assert len(shards) == 8
    assert {read_stats(p).worker for p in shards.values()} == {"encoder-0", "encoder-1"}
    assert sum(read_stats(p).rows_ok for p in shards.values()) == 16


def test_job_submit_without_the_cluster_token_is_refused(npu_cluster, tmp_path):
    wrong = tmp_path / "wrong-token"
    wrong.write_text("0" * 64)
    result = npu_cluster.submit("python", "-c", "print('should not run')", timeout=120,
                                env={"RAY_AUTH_TOKEN_PATH": str(wrong)})
    assert result.returncode != 0
    assert "should not run" not in result.stdout
