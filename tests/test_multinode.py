"""The encode across Ray nodes: real `ray start` nodes on loopback, each with its own fake NPU and temp dir, and
one `ray job submit`. Every NPU of every node gets an encoder, a node that joins mid-run gets one too and
does part of the work, a node that dies mid-run gives its shards back, and every manifest line is written
exactly once with the codes a clean encode gives."""
import numpy as np
import pyarrow.fs as pafs
import pytest

from services.encode.finalize import iter_rows
from shared.shard_writer import ShardWriter
from shared.schema import SHARDS_DIR, ShardRow, ShardStats, published_shards, read_stats
from tests.conftest import (assert_lost_shards_redone_elsewhere, assert_rows_match, busy_encoder, encode_args,
                            heartbeats, repeated_corpus, write_manifest)
from tests.raycluster import LocalRayCluster, wait_for

NODE = {"num_cpus": 2, "resources": {"NPU": 1}}
# One clip per codec call: about 30 s for one encoder here (idle machine), while a node joining and its
# encoder starting take about 10 s. The joined encoder is only fed once it has started, so the job must outlast that.
ROWS_FOR_JOIN = 1600


@pytest.fixture(scope="module")
def cluster():
    """Starts as one node with one NPU; tests add nodes (the join test needs to start from one)."""
    ray_cluster = LocalRayCluster().start_head(**NODE)
    yield ray_cluster
    ray_cluster.stop()


def encode_job(manifest, codec, out, *extra) -> list[str]:
    return ["python", "-m", "services.encode", *encode_args(manifest, codec, out, *extra)]


def workers_of_shards(out) -> dict[str, int]:
    """Encoder name -> how many of the published shards it wrote."""
    counts: dict[str, int] = {}
    for path in published_shards(out).values():
        worker = read_stats(path).worker
        counts[worker] = counts.get(worker, 0) + 1
    return counts


def test_node_that_joins_mid_run_gets_an_encoder_and_shards(cluster, cycled_clips, tiny_codec_dir, tmp_path):
    assert cluster.nodes_alive == [0], "this test starts from a one-node cluster"
    entries = repeated_corpus(cycled_clips[0], ROWS_FOR_JOIN)
    manifest = write_manifest(tmp_path / "raw.jsonl", entries)
    out = tmp_path / "out"
    job = encode_job(manifest, tiny_codec_dir, out, "--shard-size", "8", "--max-batch-items", "1")
    with cluster.submit_background(*job, log=tmp_path / "job.log") as submitted:
        wait_for(lambda: published_shards(out), 240, "the first shard from the head node's encoder")
        cluster.add_node(**NODE)
        assert submitted.wait(timeout=300) == 0, submitted.output[-4000:]
    beats = heartbeats(out)
    head_node = beats["encoder-0"]["node_id"]
    joined = [name for name, beat in beats.items() if beat["node_id"] != head_node]
    assert joined, f"no encoder started on the node that joined: {beats}"
    written = workers_of_shards(out)
    assert any(written.get(name) for name in joined), f"the joined node wrote no shard: {written}"
    assert sum(written.values()) == ROWS_FOR_JOIN // 8
    assert_rows_match(out, entries, cycled_clips[1])


def test_one_encoder_per_npu_on_every_node(cluster, cycled_clips, tiny_codec_dir, tmp_path):
    while len(cluster.nodes_alive) < 2:
        cluster.add_node(**NODE)
    entries = repeated_corpus(cycled_clips[0], 40)
    manifest = write_manifest(tmp_path / "raw.jsonl", entries)
    out = tmp_path / "out"
    # Given as a file:// URI: the form a shared filesystem's path takes in a URI-minded deployment.
    result = cluster.submit(*encode_job(manifest, tiny_codec_dir, out.as_uri(), "--shard-size", "2"), timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    beats = heartbeats(out)
    assert sorted(beats) == ["encoder-0", "encoder-1"]
    assert len({beat["node_id"] for beat in beats.values()}) == 2, "both encoders on one node"
    assert all(beat["visible_devices"] == {"ASCEND_RT_VISIBLE_DEVICES": "0"} for beat in beats.values())
    assert set(workers_of_shards(out)) == {"encoder-0", "encoder-1"}
    assert_rows_match(out, entries, cycled_clips[1])



def test_node_that_dies_mid_run_gives_its_shards_back(cluster, cycled_clips, tiny_codec_dir, tmp_path):
    while len(cluster.nodes_alive) < 2:
        cluster.add_node(**NODE)
    leaving = cluster.nodes_alive[-1]
    entries = repeated_corpus(cycled_clips[0], 800)
    manifest = write_manifest(tmp_path / "raw.jsonl", entries)
    out = tmp_path / "out"
    job = encode_job(manifest, tiny_codec_dir, out, "--shard-size", "8", "--max-batch-items", "1")
    with cluster.submit_background(*job, log=tmp_path / "job.log") as submitted:
        victim = busy_encoder(out, 240, where=lambda beat: cluster.node_of_pid(beat["pid"]) == leaving)
        cluster.remove_node(leaving)
        assert submitted.wait(timeout=300) == 0, submitted.output[-4000:]
    assert_lost_shards_redone_elsewhere(submitted.output, victim, out, entries, cycled_clips[1])


def test_shard_files_through_a_pyarrow_filesystem_uri(cycled_clips, tmp_path):
    """ShardWriter and the readers take a URI (here file://; s3://, gs://, hdfs:// alike) or an explicit pyarrow
    filesystem, for storage that is not a mounted path. The driver itself needs a path (see docs/design.md)."""
    entries, expected = cycled_clips
    rows = [ShardRow.from_entry(i, e, codes=expected[e["audio"]], duration=1.0, sample_rate=24_000)
            for i, e in enumerate(entries)]
    stats = ShardStats(rows=3, rows_ok=3, rows_error=0, audio_seconds=3.0, frames=0, encode_seconds=0.1, worker="w")
    uri = (tmp_path / "out").as_uri() + "/"
    assert str(ShardWriter(uri).publish(0, rows[:2], stats)).startswith("/")  # the path inside the filesystem
    subtree = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    ShardWriter("out", filesystem=subtree).publish(1, rows[2:], stats)
    (tmp_path / "out" / SHARDS_DIR / ".shard-00002.parquet.tmp-0000").write_bytes(b"killed mid-write")

    shards = published_shards(uri)
    assert shards == {0: f"{uri}{SHARDS_DIR}/shard-00000.parquet", 1: f"{uri}{SHARDS_DIR}/shard-00001.parquet"}
    assert read_stats(shards[1]).worker == "w"
    read = list(iter_rows(uri, ["index", "id", "codes"]))
    assert [r.id for r in read] == [e["id"] for e in entries]
    assert all(np.array_equal(r.codes, expected[e["audio"]]) for r, e in zip(read, entries))
    assert ShardWriter(uri).remove_temporaries() == [".shard-00002.parquet.tmp-0000"]
    assert published_shards(tmp_path / "out").keys() == shards.keys()  # the same files through the plain path
