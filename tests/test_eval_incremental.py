"""Follow mode's eval refresh reads the held-out rows of new shards only, and adds them to the rows chosen
before (at most eval.max_rows per speaker): what one read of every shard in id order chooses."""
import numpy as np

from shared import schema
from shared.qwen import load_tts_model
from training.eval import evaluator as evaluate
from training.model.layout import SpecialIds, load_text_tokenizer
from training.data.samples import SampleBuilder
from training.data.split import HeldOut
from training.data.synthetic import write_shard


def write_speaker_shard(output, shard_id: int, rows: int = 6) -> None:
    made = []
    for k in range(rows):
        entry = {"id": f"u{shard_id}-{k}", "audio": "/unused.wav", "ref_audio": f"/ref-{k % 2}.wav",
                 "speaker": ["ann", "ben"][k % 2], "text": "a few words here"}
        codes = np.full((8 + k, 16), shard_id, dtype=np.int64)
        made.append(schema.ShardRow.from_entry(shard_id * 100 + k, entry, codes=codes, duration=1.0))
    write_shard(output, shard_id, made)


def test_only_new_shards_are_read_and_their_rows_join_the_chosen(tiny_dir, tmp_path, monkeypatch):
    model = load_tts_model(tiny_dir / "model")
    builder = SampleBuilder(load_text_tokenizer(tiny_dir / "model"), SpecialIds.from_config(model.config))
    output, held_out = tmp_path / "out", HeldOut(shards=frozenset({0, 1, 2, 3}))
    for sid in range(4):
        write_speaker_shard(output, sid)
    read = []
    real = evaluate.read_planned
    monkeypatch.setattr(evaluate, "read_planned", lambda path, sid, *a: read.append(sid) or real(path, sid, *a))

    def collect(ids, before=None):
        return evaluate.collect_eval_rows(str(output), held_out, builder, 8, ids, before)

    first = collect([0, 1])
    assert read == [0, 1] and {n: len(s.rows) for n, s in first.items()} == {"ann": 6, "ben": 6}
    read.clear()
    grown = collect([2, 3], first)
    assert read == [2, 3]
    assert {n: len(s.rows) for n, s in first.items()} == {"ann": 6, "ben": 6}  # what it was given is unchanged
    once = collect([0, 1, 2, 3])
    assert {n: [r.id for r in s.rows] for n, s in grown.items()} == {n: [r.id for r in s.rows] for n, s in once.items()}
    assert all(r.codes is not None and r.codes[0, 0] == int(r.id[1]) for s in grown.values() for r in s.rows)
