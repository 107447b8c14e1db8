"""The storage layer (shared.store, shared.s3_store) and the driver's lease (services.encode.lease) against a real
S3-protocol server on loopback (tests/s3server.py), and the same contract on a local path."""
import json
import time
import uuid

import pytest

from services.encode.lease import OutputLease
from services.encode.lock import OutputLocked
from shared.schema import LEASE_FILE
from shared.store import LocalStore, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "out")
    request.getfixturevalue("s3_env")
    return open_store(f"s3://encode-out/unit-{uuid.uuid4().hex[:8]}")


def test_create_new_is_create_if_absent_and_whole_replacement(store):
    assert store.create_new("plan.json", b'{"a": 1}')
    assert not store.create_new("plan.json", b'{"a": 2}')  # the first one stays
    assert store.read_json("plan.json") == {"a": 1}
    store.write_json("plan.json", {"a": 3})
    assert store.read_json("plan.json") == {"a": 3}
    assert store.read_json("missing.json") is None
    store.write_bytes("manifest.jsonl", b"line0\nline1\nline2\n")
    assert store.read_range("manifest.jsonl", 6, 12) == b"line1\n"


def test_a_failed_publish_leaves_nothing_and_a_good_one_is_whole(store):
    def broken(f):
        f.write(b"x" * 1000)
        raise OSError(28, "disk full half-way")

    store.publish("shards/shard-00000.parquet", lambda f: f.write(b"old"))
    with pytest.raises(OSError):
        store.publish("shards/shard-00000.parquet", broken)
    with pytest.raises(OSError):
        store.publish("shards/shard-00001.parquet", broken)
    assert set(store.listing("shards")) == {"shard-00000.parquet"}  # nothing partial under a final name
    assert store.read_bytes("shards/shard-00000.parquet") == b"old"  # the previous one untouched
    assert store.discard_unfinished("shards") == []  # aborted, not left as an unfinished upload
    import hashlib
    assert store.sha256("shards/shard-00000.parquet") == hashlib.sha256(b"old").hexdigest()


def test_move_a_directory_aside(store):
    for i in range(3):
        store.write_bytes(f"shards/shard-0000{i}.parquet", bytes([i]))
    store.move("shards", "replaced-1/shards")
    assert store.listing("shards") == {}
    assert sorted(store.listing("replaced-1/shards")) == [f"shard-0000{i}.parquet" for i in range(3)]


def test_unfinished_upload_of_a_killed_writer_is_invisible_then_aborted(s3_env, s3_server):
    store = open_store(f"s3://encode-out/unit-{uuid.uuid4().hex[:8]}")
    client = s3_server.client()
    client.create_multipart_upload(Bucket=store.bucket, Key=store.key("shards/shard-00003.parquet"))
    assert store.listing("shards") == {}
    assert store.discard_unfinished("shards") == ["shard-00003.parquet"]
    assert client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.key("")).get("Uploads", []) == []


def test_a_live_lease_refuses_a_second_driver_and_an_expired_one_is_taken_over(s3_env):
    store = open_store(f"s3://encode-out/unit-{uuid.uuid4().hex[:8]}")
    first = OutputLease(store, seconds=3, log=lambda *_: None).acquire()
    record = json.loads(store.read_bytes(LEASE_FILE))
    assert set(record) == {"owner", "host", "pid", "acquired", "renewed", "seconds"}  # no credentials in it
    with pytest.raises(OutputLocked, match="leased by another encode job"):
        OutputLease(store, seconds=3).acquire()
    time.sleep(2.5)  # beyond the lease's length: still refused, the holder renews it
    with pytest.raises(OutputLocked):
        OutputLease(store, seconds=3).acquire()
    first._stop.set()  # the holder dies: no renewal and no release
    first._thread.join()
    time.sleep(4.5)
    taken = []
    second = OutputLease(store, seconds=3, log=taken.append).acquire()
    assert taken and "took over the expired lease" in taken[0]
    assert store.replace_if(LEASE_FILE, b"{}", first.tag) is None  # the dead driver's renewal would now fail
    second.release()
    assert not store.exists(LEASE_FILE)  # released: the next driver starts at once
