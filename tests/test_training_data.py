"""Training data: published shards only, error rows skipped, deterministic rank split, frame budget, resumable
position, follow mode, and reference handling."""
import threading
import time

import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from shared import schema
from shared.qwen import load_tts_model, speaker_mel
from shared.audio import resample
from training.config import DataConfig
from training.data import DataPosition, ShardStream, read_shard
from training.reference import ReferenceCache
from training.synthetic import tone, write_encoded


def tokenize(text):
    return [7] * len(text.split())


def stream(data, rank=0, world=1, accum=1, **overrides):
    config = DataConfig(shards=str(data), frame_budget=120, max_batch_size=3, shards_per_round=1, bucket_size=4,
                        poll_seconds=0.05, **overrides)
    return ShardStream(config, tokenize, seed=3, rank=rank, world=world, grad_accum=accum)


def ids_of(steps):
    return [row.id for step in steps for batch in step for row in batch]


@pytest.fixture(scope="module")
def encoded(tiny_dir, tmp_path_factory):
    return write_encoded(tmp_path_factory.mktemp("data"), tiny_dir / "codec", num_shards=3, rows_per_shard=5)


def good_ids(encoded):
    ids = set()
    for path in schema.published_shards(encoded).values():
        table = pq.read_table(path)
        ids |= {i for i, e in zip(table.column("id").to_pylist(), table.column("error").to_pylist()) if e is None}
    return ids


def test_error_rows_are_skipped(encoded):
    rows = read_shard(schema.published_shards(encoded)[0], tokenize)
    assert len(rows) == 4 and all(len(r.codes) > 0 and r.codes.shape[1] == 16 for r in rows)
    assert set(ids_of(stream(encoded).epoch_steps())) == good_ids(encoded)


def test_a_shard_still_being_written_is_never_read(tiny_dir, tmp_path):
    data = write_encoded(tmp_path / "partial", tiny_dir / "codec", num_shards=1, rows_per_shard=3, complete=False)
    shards = data / schema.SHARDS_DIR
    # An encoder mid-write: a truncated Parquet file under its temporary name, and a finished one not yet renamed.
    published = schema.published_shards(data)[0]
    (shards / ".shard-00001.parquet.tmp-42").write_bytes(published.read_bytes()[:100])
    (shards / ".shard-00002.parquet.tmp-43").write_bytes(published.read_bytes())
    seen = ids_of(stream(data).epoch_steps())
    assert sorted(set(seen)) == sorted(good_ids(data)) and len(good_ids(data)) == 2


def test_ranks_split_every_step_deterministically(encoded):
    per_rank = [list(stream(encoded, rank=r, world=2, accum=2).epoch_steps()) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0  # same number of steps on every rank
    assert all(len(step) == 2 for steps in per_rank for step in steps)  # grad_accum micro-batches each
    assert set(ids_of(per_rank[0])) | set(ids_of(per_rank[1])) == good_ids(encoded)
    again = list(stream(encoded, rank=1, world=2, accum=2).epoch_steps())
    assert ids_of(again) == ids_of(per_rank[1])


def test_micro_batches_respect_the_frame_budget(encoded):
    for step in stream(encoded).epoch_steps():
        for batch in step:
            assert len(batch) <= 3
            assert len(batch) == 1 or max(r.length for r in batch) * len(batch) <= 120


def test_position_resumes_with_the_next_step(encoded):
    first = stream(encoded)
    steps = first.epoch_steps()
    taken = [next(steps) for _ in range(3)]
    saved = DataPosition.from_dict(first.position.to_dict())
    rest = list(steps)
    resumed = stream(encoded)
    resumed.position = saved
    assert ids_of(resumed.epoch_steps()) == ids_of(rest)
    assert ids_of(taken + rest) == ids_of(stream(encoded).epoch_steps())


def test_follow_trains_on_shards_as_they_are_published_and_stops_at_complete(encoded, tmp_path):
    output = tmp_path / "live"
    (output / schema.SHARDS_DIR).mkdir(parents=True)
    sources = schema.published_shards(encoded)

    def encode_service():
        for sid in (0, 1, 2):
            time.sleep(0.3)
            target = output / schema.SHARDS_DIR / schema.shard_name(sid)
            temporary = target.with_name(f".{target.name}.tmp-1")
            temporary.write_bytes(sources[sid].read_bytes())
            temporary.rename(target)
        time.sleep(0.3)
        (output / schema.COMPLETE_MARKER).write_text("")

    publisher = threading.Thread(target=encode_service)
    publisher.start()
    live = stream(output / schema.SHARDS_DIR, follow=True)
    steps = live.epoch_steps()
    seen = ids_of([next(steps)])
    last_shard = output / schema.SHARDS_DIR / schema.shard_name(2)
    assert not last_shard.exists()  # training started before the encode service finished
    seen += ids_of(steps)  # returns only once _COMPLETE is there and every shard was consumed
    publisher.join()
    assert (output / schema.COMPLETE_MARKER).exists()
    assert sorted(seen) == sorted(good_ids(encoded))
    assert live.position.consumed == [0, 1, 2]


def test_references_of_any_rate_and_length_are_cached_once(tiny_dir, tmp_path):
    model = load_tts_model(tiny_dir / "model")
    cache = ReferenceCache(model.speaker_encoder)
    short, long = tmp_path / "short16k.wav", tmp_path / "long24k.wav"
    sf.write(short, tone(0.8, 1, 16000), 16000, subtype="FLOAT")
    sf.write(long, tone(2.1, 2), 24000, subtype="FLOAT")
    batch = cache.batch([("a", str(short)), ("b", str(long)), ("A", str(short))])  # speaker names: any case
    assert batch.shape == (3, model.config.talker_config.hidden_size)
    assert torch.equal(batch[0], batch[2]) and not torch.equal(batch[0], batch[1])
    assert len(cache.mels) == 2
    expected = speaker_mel(resample(tone(0.8, 1, 16000), 16000))
    torch.testing.assert_close(cache.mels[str(short)], expected)
    assert cache.mels[str(short)].shape[0] < cache.mels[str(long)].shape[0]
