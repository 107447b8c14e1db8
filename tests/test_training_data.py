"""Training data: published shards only, error rows skipped, deterministic rank split, frame budget, resumable
position, follow mode, planning from metadata with codes read per rank, the step estimate from footers, and
reference handling."""
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from shared import schema
from shared.qwen import load_tts_model, speaker_mel
from shared.audio import resample
from training.config import DataConfig
from training.data.stream import DataPosition, RoundCodes, ShardStream, plan_round, read_planned
from training.model.layout import SpecialIds, load_text_tokenizer
from training.speakers.reference import ReferenceCache
from training.data.samples import SampleBuilder
from training.data.synthetic import tone, write_encoded


@pytest.fixture(scope="module")
def builder(tiny_dir):
    """Tokenizer and ids of the tiny model; no speaker encoder (planning and loading need none)."""
    model = load_tts_model(tiny_dir / "model")
    return SampleBuilder(load_text_tokenizer(tiny_dir / "model"), SpecialIds.from_config(model.config))


def stream(data, builder, rank=0, world=1, accum=1, **overrides):
    overrides = {"frame_budget": 120, "shards_per_round": 1, "poll_seconds": 0.05, **overrides}
    return ShardStream(DataConfig(shards=str(data), **overrides), builder, seed=3, rank=rank, world=world,
                       grad_accum=accum)


def ids_of(steps):
    return [p.row.id for step in steps for batch in step.micro_batches for seq in batch for p in seq]


@pytest.fixture(scope="module")
def encoded(tiny_dir, tmp_path_factory):
    return write_encoded(tmp_path_factory.mktemp("data"), tiny_dir / "codec", num_shards=3, rows_per_shard=5)


def good_ids(encoded):
    ids = set()
    for path in schema.published_shards(encoded).values():
        table = pq.read_table(path)
        ids |= {i for i, e in zip(table.column("id").to_pylist(), table.column("error").to_pylist()) if e is None}
    return ids


def test_error_rows_are_skipped(encoded, builder):
    rows = read_planned(schema.published_shards(encoded)[0], 0, builder)
    assert len(rows) == 4 and all(p.row.codes is None and p.frames > 0 for p in rows)  # metadata only
    assert builder.plan_rows(0, [], []) == []  # a shard of error rows only plans to nothing
    steps = list(stream(encoded, builder).epoch_steps())
    assert set(ids_of(steps)) == good_ids(encoded)
    for step in steps:  # codes are read for every row the rank trains on
        assert all(p.row.codes.shape == (p.frames, 16) for mb in step.micro_batches for seq in mb for p in seq)


def test_a_shard_still_being_written_is_never_read(tiny_dir, tmp_path, builder):
    data = write_encoded(tmp_path / "partial", tiny_dir / "codec", num_shards=1, rows_per_shard=3, complete=False)
    shards = data / schema.SHARDS_DIR
    # An encoder mid-write: a truncated Parquet file under its temporary name, and a finished one not yet renamed.
    published = schema.published_shards(data)[0]
    (shards / ".shard-00001.parquet.tmp-42").write_bytes(published.read_bytes()[:100])
    (shards / ".shard-00002.parquet.tmp-43").write_bytes(published.read_bytes())
    seen = ids_of(stream(data, builder).epoch_steps())
    assert sorted(set(seen)) == sorted(good_ids(data)) and len(good_ids(data)) == 2


@pytest.mark.parametrize("packing", [True, False])
def test_ranks_split_every_step_deterministically(encoded, builder, packing):
    budget = dict(frame_budget=80, pack_length=40) if packing else dict(frame_budget=120, max_batch_size=3,
                                                                         bucket_size=4)
    per_rank = [list(stream(encoded, builder, rank=r, world=2, accum=2, packing=packing, **budget).epoch_steps())
                for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0  # same number of steps on every rank
    assert all(len(step.micro_batches) == 2 for steps in per_rank for step in steps)  # grad_accum micro-batches
    assert set(ids_of(per_rank[0])) | set(ids_of(per_rank[1])) == good_ids(encoded)
    again = list(stream(encoded, builder, rank=1, world=2, accum=2, packing=packing, **budget).epoch_steps())
    assert ids_of(again) == ids_of(per_rank[1])
    for rank, steps in enumerate(per_rank):
        for step in steps:  # every rank knows every rank's shapes: the global token counts need no collective
            assert step.shapes == per_rank[1 - rank][steps.index(step)].shapes
            assert len(step.shapes) == 4


def test_a_rank_reads_the_codes_of_its_own_rows_only(encoded, builder):
    config = DataConfig(shards=str(encoded), frame_budget=40)
    published = schema.published_shards(encoded)
    rows = [p for sid in published for p in read_planned(published[sid], sid, builder)]
    plan = plan_round(rows, config, seed=3, epoch=0, round_shards=list(published))
    mine = [p for step in plan.steps(0, per_step=2) for i, _ in step[:1] for seq in plan.batches[i] for p in seq]
    others = [p for p in rows if all(p is not q for q in mine)]
    assert mine and others
    RoundCodes(published, mine).load(mine)
    assert all(p.row.codes.shape == (p.frames, 16) for p in mine)
    assert all(p.row.codes is None for p in others)
    full = {r.id: r.codes for sid in published for r in schema.read_rows(published[sid], ["codes"])}
    assert all(np.array_equal(p.row.codes, full[p.row.id]) for p in mine)


def test_micro_batches_respect_the_frame_budget(encoded, builder):
    for packing, limit in ((True, 40), (False, 0)):
        for step in stream(encoded, builder, packing=packing, frame_budget=80, pack_length=limit, max_batch_size=3,
                           bucket_size=4).epoch_steps():
            for batch, shape in zip(step.micro_batches, step.shapes):
                lengths = [sum(p.length for p in seq) for seq in batch]
                assert shape.sequence_lengths == tuple(lengths)
                if packing:
                    assert all(n <= 40 or len(seq) == 1 for n, seq in zip(lengths, batch))
                else:
                    assert all(len(seq) == 1 for seq in batch) and len(batch) <= 3
                assert len(batch) == 1 or max(lengths) * len(batch) <= 80


def test_position_resumes_with_the_next_step(encoded, builder):
    first = stream(encoded, builder, frame_budget=40)
    steps = first.epoch_steps()
    taken = [next(steps) for _ in range(3)]
    saved = DataPosition.from_dict(taken[-1].position.to_dict())  # what a checkpoint after step 3 stores
    rest = list(steps)
    resumed = stream(encoded, builder, frame_budget=40)
    resumed.position = saved
    again = list(resumed.epoch_steps())
    assert ids_of(again) == ids_of(rest) and len(rest) > 0
    assert [s.shapes for s in again] == [s.shapes for s in rest]
    assert ids_of(taken + rest) == ids_of(stream(encoded, builder, frame_budget=40).epoch_steps())


def random_code_shards(output, shards, rows, seed=0):
    """Shards of random codes (no codec needed) with a speech-like length mix: 1-20 s, 2-30 words."""
    from training.data.synthetic import write_shard

    rng = np.random.default_rng(seed)
    for sid in range(shards):
        made = []
        for k in range(rows):
            seconds = float(np.clip(rng.lognormal(np.log(5.0), 0.6), 1.0, 20.0))
            entry = {"id": f"u{sid}-{k}", "audio": "/unused.wav", "ref_audio": "/unused-ref.wav",
                     "text": " ".join(["word"] * int(rng.integers(2, 31)))}
            codes = rng.integers(0, 2048, size=(int(seconds * 12.5), 16))
            made.append(schema.ShardRow.from_entry(sid * rows + k, entry, codes=codes, duration=seconds))
        write_shard(output, sid, made)
    (output / schema.COMPLETE_MARKER).write_text("")
    return output


def test_step_estimate_comes_from_footers_and_the_first_round(tmp_path, builder):
    data = random_code_shards(tmp_path / "mix", shards=7, rows=40)
    for budget, pack_length, world in ((1024, 256, 2), (2048, 0, 1), (512, 512, 3)):
        config = dict(frame_budget=budget, pack_length=pack_length, shards_per_round=2)
        actual = sum(1 for _ in stream(data, builder, world=world, **config).epoch_steps())
        estimate = stream(data, builder, world=world, **config).estimate_steps_per_epoch()
        assert abs(estimate - actual) <= max(1, 0.05 * actual), (config, world, estimate, actual)


def test_follow_trains_on_shards_as_they_are_published_and_stops_at_complete(encoded, tmp_path, builder):
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
    live = stream(output / schema.SHARDS_DIR, builder, follow=True)
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


def test_the_schedule_counts_only_rows_that_train(tmp_path, builder):
    """Held-out rows never train, so the lr schedule's step total leaves them out: whole shards (eval.shards)
    exactly, eval.fraction's per-row hash by its expected share; the last step trained runs at the lr floor."""
    from training.config import Config
    from training.data.split import HeldOut, training_rows
    from training.train.schedule import SampleSchedule

    data = random_code_shards(tmp_path / "mix", shards=8, rows=40)
    config = dict(frame_budget=1024, pack_length=256, shards_per_round=2)
    for held_out, tolerance in ((HeldOut(shards=frozenset({1, 3, 5, 7})), 0.05), (HeldOut(fraction=0.3), 0.1)):
        taken, planned = stream(data, builder, **config), stream(data, builder, **config)
        taken.row_filter = planned.row_filter = training_rows(held_out)
        steps = list(taken.epoch_steps())
        actual = len(steps)
        estimate = planned.estimate_steps_per_epoch()
        assert abs(estimate - actual) <= max(1, tolerance * actual), (held_out, estimate, actual)
        assert planned.estimate_micro_batches_per_epoch() == sum(planned.estimate_micro_batches_per_round())
        if held_out.shards:
            schedule = SampleSchedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), Config().train, 1)
            schedule.total = planned.estimate_micro_batches_per_epoch()
            trained = sum(step.trained_micro_batches for step in steps)  # the schedule's axis: micro-batches
            assert schedule.factor(trained) <= Config().train.min_lr_ratio + 0.02, (schedule.total, trained)
