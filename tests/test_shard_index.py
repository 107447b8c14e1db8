"""The shard index (shared.shard_index, training.data.corpus_index): built from the shards, updated as shards
publish, checked against the listing (missing, stale and vanished entries), cached for an old output in the
output or, when that is read-only, under the run directory."""
import json
import os

import numpy as np
import pytest

from shared import schema
from shared.shard_index import INDEX_VERSION, ShardIndex, current_index, index_location, read_entry
from training.data.corpus_index import load_corpus_index, shard_figures
from training.speakers.reference import SpeakerTable, scan_speakers
from training.data.synthetic import write_shard


def shard_rows(shard_id: int, speakers: list[str | None], frames: int = 10) -> list[schema.ShardRow]:
    """Good rows (one per speaker given, reference per speaker, languages alternating) and one error row."""
    rows = []
    for k, speaker in enumerate(speakers):
        entry = {"id": f"s{shard_id}-{k}", "audio": f"/a/{shard_id}-{k}.wav", "text": "hello there",
                 "ref_audio": f"/refs/{speaker or 'anon'}.wav", "speaker": speaker,
                 "language": ["english", "chinese"][k % 2]}
        codes = np.zeros((frames + k, 16), dtype=np.int64)
        rows.append(schema.ShardRow.from_entry(shard_id * 100 + k, entry, codes=codes, duration=1.0))
    rows.append(schema.ShardRow.from_entry(shard_id * 100 + 99, {"id": f"bad{shard_id}", "audio": "/x.wav"},
                                           error="decode_failed: unreadable"))
    return rows


@pytest.fixture
def output(tmp_path):
    out = tmp_path / "out"
    write_shard(out, 0, shard_rows(0, ["Alice", "alice", None]))
    write_shard(out, 1, shard_rows(1, ["bob", None]))
    (out / schema.COMPLETE_MARKER).write_text("")
    return out


def built(out) -> ShardIndex:
    index = ShardIndex()
    index.reconcile(schema.published_shard_files(out))
    return index


def republish(out, shard_id: int, rows) -> None:
    """Rewrite a shard as the writer does (new file renamed over the old), with a visibly later mtime."""
    path = write_shard(out, shard_id, rows)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))


def test_entries_hold_what_training_needs_and_round_trip(output, tmp_path):
    index = built(output)
    entry = index.entry(0)
    assert (entry.rows, entry.rows_trainable, entry.frames_trainable) == (4, 3, 10 + 11 + 12)
    assert [(s.speaker, s.references, s.rows) for s in entry.speakers] == [
        (None, ["/refs/anon.wav"], 1), ("Alice", ["/refs/Alice.wav"], 1), ("alice", ["/refs/alice.wav"], 1)]
    assert entry.languages == ["chinese", "english"]
    # each speaker's languages, for the dialect checks; the error row (no language) is not one of them
    assert [(s.speaker, s.languages) for s in entry.speakers] == [
        (None, ["english"]), ("Alice", ["english"]), ("alice", ["chinese"])]
    index.save(tmp_path / "index.json")
    assert ShardIndex.load(tmp_path / "index.json") == index
    assert shard_figures(index) == {0: (3, 33), 1: (2, 21)}
    # The speaker table from the index is what reading every shard's rows gives (speakers compared lower-cased).
    table = SpeakerTable.from_index(index)
    assert table.references == {None: ["/refs/anon.wav"], "alice": ["/refs/Alice.wav", "/refs/alice.wav"],
                                 "bob": ["/refs/bob.wav"]}
    assert table.languages == {"english", "chinese"}
    assert scan_speakers(output) == table


def test_missing_stale_and_vanished_entries_are_reconciled(output):
    index = built(output)
    write_shard(output, 2, shard_rows(2, ["carol"]))  # published after the index was written: missing
    republish(output, 1, shard_rows(1, ["dave", "dave", "dave"]))  # re-published: its entry is stale
    assert not index.entry(1).describes(schema.published_shard_file(output, 1))
    (output / schema.SHARDS_DIR / schema.shard_name(0)).unlink()  # no longer published
    read = index.reconcile(schema.published_shard_files(output))
    assert sorted(read) == [schema.shard_name(1), schema.shard_name(2)]
    assert index == built(output)
    assert [s.speaker for s in index.entry(1).speakers] == ["dave"] and index.entry(0) is None
    assert index.reconcile(schema.published_shard_files(output)) == []  # all current now: nothing read


def test_an_old_output_gets_its_index_once(output, tmp_path):
    assert not (output / schema.INDEX_FILE).exists()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    index = load_corpus_index(output, run_dir)
    assert index == built(output)
    assert ShardIndex.load(output / schema.INDEX_FILE) == index  # complete output: cached there
    document = json.loads((output / schema.INDEX_FILE).read_text())
    assert document["version"] == INDEX_VERSION and [e["name"] for e in document["shards"]] == ["shard-00000.parquet",
                                                                                    "shard-00001.parquet"]
    # The next start reads no shard: a damaged entry in the cached file would show if it were read again.
    cached = ShardIndex.load(output / schema.INDEX_FILE)
    cached.entries[schema.shard_name(0)].rows = 1234
    cached.save(output / schema.INDEX_FILE)
    assert load_corpus_index(output, run_dir).entry(0).rows == 1234


def test_an_output_that_cannot_take_the_index_is_cached_under_the_run_dir(output, tmp_path):
    """As on a read-only output; a directory where the file would go fails the write for root too."""
    (output / schema.INDEX_FILE).mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    index = load_corpus_index(output, run_dir)
    assert (output / schema.INDEX_FILE).is_dir()
    assert ShardIndex.load(run_dir / schema.INDEX_FILE) == index == built(output)


def test_an_incomplete_output_is_left_to_its_driver(output, tmp_path):
    """While the encode job may still run, its driver is the output's index writer: training caches its own."""
    (output / schema.COMPLETE_MARKER).unlink()
    stale = built(output)
    stale.entries.pop(schema.shard_name(1))
    stale.save(index_location(output))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    index = load_corpus_index(output, run_dir)
    assert index == built(output)
    assert ShardIndex.load(index_location(output)) == stale  # untouched
    assert ShardIndex.load(run_dir / schema.INDEX_FILE) == index
    # Next start: the shard the output's index lacks comes from the run dir's cache, not from a read.
    cached = ShardIndex.load(run_dir / schema.INDEX_FILE)
    cached.entries[schema.shard_name(1)].rows = 777
    cached.save(run_dir / schema.INDEX_FILE)
    assert load_corpus_index(output, run_dir).entry(1).rows == 777


def test_an_unusable_index_file_is_rebuilt(output):
    (output / schema.INDEX_FILE).write_text("{not json")
    assert ShardIndex.load(output / schema.INDEX_FILE) == ShardIndex()
    assert current_index(output) == built(output)
    assert read_entry(schema.published_shard_file(output, 1)) == built(output).entry(1)


def test_an_index_of_an_older_version_is_rebuilt_once(output, tmp_path):
    """A version-2 file (no per-speaker languages) counts as no index: read once, then saved as the current version."""
    document = {"version": 2, "shards": [e.to_json() for e in built(output).entries.values()]}
    for entry in document["shards"]:
        for speaker in entry["speakers"]:
            del speaker["languages"]
    (output / schema.INDEX_FILE).write_text(json.dumps(document))
    assert ShardIndex.load(output / schema.INDEX_FILE) == ShardIndex()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert load_corpus_index(output, run_dir) == built(output)
    assert json.loads((output / schema.INDEX_FILE).read_text())["version"] == INDEX_VERSION == 3
    assert ShardIndex.load(output / schema.INDEX_FILE) == built(output)


def test_trained_speakers_read_only_the_shards_the_index_cannot_answer(tmp_path, monkeypatch):
    """The export's speakers that trained: eval.shards alone is answered from the index; with eval.fraction a
    shard is read only while one of its speakers has no row known to have trained, and the answer is what
    reading every row gives."""
    from training.data.split import HeldOut
    from training.export.model_dir import trained_speakers

    out = tmp_path / "out"
    for shard_id in range(3):
        write_shard(out, shard_id, shard_rows(shard_id, ["bob"] * 6))
    write_shard(out, 3, shard_rows(3, ["carol"]))
    write_shard(out, 4, shard_rows(4, ["dave"]))
    current_index(out).save(index_location(out))

    def every_row(held_out: HeldOut) -> set:
        return {row.speaker for shard, path in schema.published_shards(out).items()
                for row in schema.read_rows(path) if row.trainable and not held_out.contains(shard, row.id, row.speaker)}

    rules = [HeldOut(0.0, frozenset({4})), HeldOut(0.5, frozenset({4}), seed=3), HeldOut(0.99, frozenset(), seed=1)]
    expected = [every_row(rule) for rule in rules]
    reads, read_rows = [], schema.read_rows
    monkeypatch.setattr(schema, "read_rows", lambda path, *a, **k: reads.append(path) or read_rows(path, *a, **k))
    assert trained_speakers(out, rules[0]) == expected[0] == {"bob", "carol"} and reads == []
    assert trained_speakers(out, rules[1]) == expected[1]
    assert 0 < len(reads) < 4  # bob trained in his first shard: his other two are not read
    reads.clear()
    assert trained_speakers(out, rules[2]) == expected[2]
