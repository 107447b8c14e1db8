"""The pieces of the encode service that need no Ray: planning, manifest normalisation, batching."""
import json

import numpy as np
import pytest
import soundfile as sf

from services.encode.batching import form_batches
from services.encode.manifest import LINE_ERROR, read_range, write_normalised
from services.encode.plan import PlanMismatch, load_plan, plan_shards, prepare_plan
from shared.audio import AudioError, AudioLimits, load_audio
from tests.conftest import write_manifest


def test_plan_byte_ranges_cover_every_line_once(tmp_path):
    lines = [{"audio": f"a{i}.wav", "text": "文字" * (i % 7)} for i in range(103)]
    manifest = write_manifest(tmp_path / "m.jsonl", lines)
    normalised = tmp_path / "manifest.jsonl"
    assert write_normalised(manifest, normalised) == 103
    rows, shards, covered = plan_shards(normalised, 10)
    assert rows == 103 and [s.rows for s in shards] == [10] * 10 + [3]
    assert covered.bytes == normalised.stat().st_size == shards[-1].byte_end
    seen = []
    for spec in shards:
        entries = read_range(normalised, spec.byte_start, spec.byte_end)
        assert len(entries) == spec.rows
        seen += [e["audio"] for e in entries]
    assert seen == [str(tmp_path / f"a{i}.wav") for i in range(103)]  # made absolute, order kept


def test_directory_manifest_pairs_audio_with_transcripts(tmp_path):
    (tmp_path / "spk").mkdir()
    for name in ("b", "a", "c"):
        sf.write(tmp_path / "spk" / f"{name}.wav", np.full(2400, 0.1, dtype=np.float32), 24_000)
    (tmp_path / "spk" / "a.txt").write_text("第一句\n", encoding="utf-8")
    (tmp_path / "spk" / "b.lab").write_text("second", encoding="utf-8")
    out = tmp_path / "manifest.jsonl"
    write_normalised(tmp_path / "spk", out, ref_audio=str(tmp_path / "spk" / "a.wav"))
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["id"] for e in entries] == ["a", "b", "c"]
    assert entries[0]["text"] == "第一句" and entries[1]["text"] == "second"
    assert "no transcript" in entries[2][LINE_ERROR] and entries[0]["ref_audio"].endswith("a.wav")


def test_plan_is_reused_and_changed_inputs_refused(tmp_path, tiny_codec_dir):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"audio": "x.wav", "text": "t"}] * 5)
    out = tmp_path / "out"
    first = prepare_plan(out, manifest, tiny_codec_dir, 2)
    assert prepare_plan(out, manifest, tiny_codec_dir, 2).created == first.created
    with pytest.raises(PlanMismatch, match="shard_size"):
        prepare_plan(out, manifest, tiny_codec_dir, 3)
    assert load_plan(out).inputs.shard_size == 2


@pytest.mark.parametrize("budget,items", [(10.0, 64), (30.0, 3), (1000.0, 64)])
def test_batches_respect_padded_budget_and_cover_everything(budget, items):
    rng = np.random.default_rng(0)
    durations = list(rng.uniform(0.5, 9.5, size=200))
    batches = form_batches(durations, budget, items)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for batch in batches:
        longest = max(durations[i] for i in batch)
        assert len(batch) <= items
        assert len(batch) == 1 or longest * len(batch) <= budget
    firsts = [durations[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True)  # longest first: an out-of-memory shows at once


def test_load_audio_reasons(tmp_path):
    sf.write(tmp_path / "ok.wav", np.sin(np.arange(16_000) / 10).astype(np.float32), 16_000)
    clip = load_audio(str(tmp_path / "ok.wav"))
    assert clip.source_sample_rate == 16_000 and len(clip.samples) == 24_000 and clip.num_frames == 13
    with pytest.raises(AudioError) as err:
        load_audio(str(tmp_path / "ok.wav"), AudioLimits(max_seconds=0.5))
    assert err.value.reason == "too_long" and "ok.wav" in str(err.value)
    with pytest.raises(AudioError) as err:
        load_audio(str(tmp_path / "nope.wav"))
    assert err.value.reason == "missing_file"
