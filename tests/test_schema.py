"""The shard row contract: one row type for good and error rows, one id rule, projection and row selection,
and version 1 shards still readable."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared import schema
from shared.schema import ShardRow, ShardStats, build_table, read_rows, row_id

STATS = ShardStats(rows=3, rows_ok=2, rows_error=1, audio_seconds=2.0, frames=5, encode_seconds=0.1, worker="w")


def _rows() -> list[ShardRow]:
    rng = np.random.default_rng(0)
    return [
        ShardRow.from_entry(0, {"id": "a", "audio": "/d/a.wav", "text": "hi", "ref_audio": "/d/r.wav",
                                "speaker": "anna", "language": "english", "emotion": "calm", "score": [1, 2]},
                            codes=rng.integers(0, 2048, (3, 16)), duration=0.24, sample_rate=16000),
        ShardRow.from_entry(1, {"audio": "/d/sub/b.flac", "text": 7}, error="bad_text: not a string"),
        ShardRow.from_entry(2, {"id": 12, "audio": "/d/c.wav", "text": "yo", "ref_audio": "/d/r.wav"},
                            codes=rng.integers(0, 2048, (2, 16)), duration=0.16, sample_rate=24000),
    ]


def test_round_trip_keeps_every_manifest_key(tmp_path):
    path = tmp_path / "shard-00000.parquet"
    pq.write_table(build_table(_rows(), STATS), path)
    back = read_rows(path)
    assert [r.id for r in back] == ["a", "b", "12"]
    assert back[0].manifest_line() == {"id": "a", "audio": "/d/a.wav", "text": "hi", "ref_audio": "/d/r.wav",
                                       "speaker": "anna", "language": "english", "emotion": "calm", "score": [1, 2]}
    assert back[1].error == "bad_text: not a string" and back[1].reason == "bad_text" and not back[1].ok
    assert back[1].codes is None and back[1].text == "7"  # a non-string value is kept as its JSON text
    assert back[0].codes.dtype == np.int64 and back[0].codes.shape == (3, 16) and back[0].num_frames == 3
    assert np.array_equal(back[2].codes, _rows()[2].codes)
    assert schema.read_stats(path) == STATS


def test_projection_and_row_selection(tmp_path):
    path = tmp_path / "shard-00000.parquet"
    pq.write_table(build_table(_rows(), STATS), path)
    picked = read_rows(path, ["codes", "speaker"], positions=[2, 0])
    assert [r.index for r in picked] == [2, 0] and picked[1].speaker == "anna"
    assert np.array_equal(picked[0].codes, _rows()[2].codes) and np.array_equal(picked[1].codes, _rows()[0].codes)
    assert picked[0].text is None and picked[0].duration is None  # not read
    with pytest.raises(ValueError, match="no shard field"):
        read_rows(path, ["audio_codes"])


def test_version_1_shards_still_read(tmp_path):
    """A shard written before speaker/language/extra existed (the version 1 columns and marker)."""
    v1 = pa.schema([f for f in schema.SHARD_SCHEMA if f.name not in ("speaker", "language", "extra")],
                   metadata={b"qwen3tts_shard_schema": b"1", schema.STATS_KEY: STATS.to_json().encode()})
    table = build_table(_rows(), STATS)
    path = tmp_path / "shard-00000.parquet"
    pq.write_table(pa.Table.from_arrays([table.column(f.name) for f in v1], schema=v1), path)
    back = read_rows(path)
    assert [r.id for r in back] == ["a", "b", "12"] and back[0].speaker is None and back[0].extra == {}
    assert np.array_equal(back[0].codes, _rows()[0].codes)


def test_unknown_version_names_the_file_and_the_fix(tmp_path):
    table = build_table(_rows(), STATS)
    path = tmp_path / "shard-00000.parquet"
    meta = dict(table.schema.metadata)
    meta[b"qwen3tts_shard_schema"] = b"99"
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(ValueError, match=f"{path}.*re-encode"):
        read_rows(path)


def test_one_id_rule():
    assert row_id(4, {"id": "x", "audio": "/a/b.wav"}) == "x"
    assert row_id(4, {"id": 0, "audio": "/a/b.wav"}) == "0"
    assert row_id(4, {"audio": "/a/b.wav"}) == "b"
    assert row_id(4, {"audio": None}) == "line-5"
    with pytest.raises(ValueError):
        ShardRow.from_entry(0, {"audio": "/a.wav"})  # neither codes nor an error
    assert json.loads(build_table(_rows(), STATS).column("extra")[0].as_py()) == {"emotion": "calm", "score": [1, 2]}
