"""The encode job end to end through its CLI: codes, resume, plan identity, lock, JSONL export."""
import json
import os

import librosa
import numpy as np
import pyarrow.parquet as pq
import pytest

from services.encode.lock import OutputLock
from shared.audio import SAMPLES_PER_FRAME, pad_to_frame
from shared.schema import CODEBOOK_SIZE, INDEX_FILE, codes_of, published_shard_files, published_shards
from shared.shard_index import ShardIndex
from tests.conftest import run_encode, synth_corpus, write_manifest

# Lengths chosen so some clips end on a frame boundary and most do not; rates mix up- and down-sampling.
SPECS = [(1.2, 24_000), (0.8, 16_000), (2.0, 44_100), (1.6, 24_000), (0.96, 24_000), (1.33, 22_050),
         (0.5, 8_000), (1.9, 48_000), (0.7, 24_000)]


def read_rows(output):
    rows = []
    for _, path in published_shards(output).items():
        table = pq.read_table(path)
        for i in range(table.num_rows):
            row = {name: table.column(name)[i].as_py() for name in table.column_names if name != "audio_codes"}
            row["audio_codes"] = codes_of(table.column("audio_codes"), i)
            rows.append(row)
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    entries = synth_corpus(root / "wav", SPECS)
    return write_manifest(root / "raw.jsonl", entries), entries


def test_codes_equal_upstream_tokenizer(corpus, tiny_codec_dir, tmp_path):
    """Default mode: codes equal Qwen3TTSTokenizer.encode of the frame-padded clip; every whole frame equals
    the one-at-a-time upstream encode of the file; --exact-tail reproduces that encode bit for bit."""
    from shared.qwen import load_codec, reference_encode

    manifest, entries = corpus
    padded_out, exact_out = tmp_path / "padded", tmp_path / "exact"
    for out, extra in ((padded_out, []), (exact_out, ["--exact-tail"])):
        result = run_encode("--manifest", str(manifest), "--codec", str(tiny_codec_dir), "--output", str(out),
                            "--shard-size", "4", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    codec = load_codec(tiny_codec_dir)
    padded_rows, exact_rows = read_rows(padded_out), read_rows(exact_out)
    assert [r["id"] for r in padded_rows] == [e["id"] for e in entries]
    partial_tails = 0
    for row, exact, entry, (seconds, rate) in zip(padded_rows, exact_rows, entries, SPECS):
        assert row["error"] is None and row["sample_rate"] == rate
        upstream = reference_encode(codec, [entry["audio"]])[0]  # path in: upstream loads + resamples itself
        wav, _ = librosa.load(entry["audio"], sr=24_000, mono=True)
        upstream_padded = reference_encode(codec, [pad_to_frame(wav)], sr=24_000)[0]
        codes = row["audio_codes"]
        assert codes.shape == upstream.shape == (row["num_frames"], 16)
        assert np.array_equal(codes, upstream_padded)
        whole = len(wav) // SAMPLES_PER_FRAME
        assert np.array_equal(codes[:whole], upstream[:whole])
        partial_tails += len(wav) % SAMPLES_PER_FRAME != 0
        assert np.array_equal(exact["audio_codes"], upstream)
        assert codes.min() >= 0 and codes.max() < CODEBOOK_SIZE
        assert len(np.unique(codes)) > 1, "a codec that emits one code proves nothing"
    assert partial_tails >= 5
    # Upstream's batched prepare_data.py (every file in one `encode` call): the default's codes on every frame
    # but the last frame of the batch's longest clip.
    batched = reference_encode(codec, [entry["audio"] for entry in entries])
    longest = max(range(len(entries)), key=lambda i: len(batched[i]))
    for i, (row, upstream) in enumerate(zip(padded_rows, batched)):
        codes = row["audio_codes"]
        assert codes.shape == upstream.shape
        last = len(codes) - 1 if i == longest else len(codes)
        assert np.array_equal(codes[:last], upstream[:last]), row["id"]


def index_from_shards(out) -> ShardIndex:
    index = ShardIndex()
    index.reconcile(published_shard_files(out))
    return index


def test_resume_redoes_only_missing_shard(corpus, tiny_codec_dir, tmp_path):
    """Also: the job leaves a shard index equal to one read from the shards, entry by entry as shards publish
    (its final check against the listing finds nothing to read), and a re-published shard's entry is renewed."""
    manifest, entries = corpus
    out = tmp_path / "out"
    args = ("--manifest", str(manifest), "--codec", str(tiny_codec_dir), "--output", str(out), "--shard-size", "3")
    first = run_encode(*args)
    assert first.returncode == 0
    assert ShardIndex.load(out / INDEX_FILE) == index_from_shards(out) != ShardIndex()
    assert "shard index: read" not in first.stdout
    shards = published_shards(out)
    assert len(shards) == 3 and (out / "_COMPLETE").exists()
    before = {sid: os.stat(p).st_mtime_ns for sid, p in shards.items()}
    codes_before = {r["id"]: r["audio_codes"] for r in read_rows(out)}
    shards[1].unlink()
    again = run_encode(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 to encode" in again.stdout
    # Both runs recorded the hardware they encoded on; the same kind twice is not worth a warning.
    runs = json.loads((out / "plan.json").read_text())["encode_runs"]
    assert [r["device_kind"] for r in runs] == ["cpu", "cpu"] and "warning" not in again.stdout
    after = {sid: os.stat(p).st_mtime_ns for sid, p in published_shards(out).items()}
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]
    rows = read_rows(out)
    assert sorted(r["index"] for r in rows) == list(range(len(entries)))
    assert all(np.array_equal(codes_before[r["id"]], r["audio_codes"]) for r in rows)
    index = ShardIndex.load(out / INDEX_FILE)
    assert index == index_from_shards(out) and index.entry(1).mtime_ns == after[1]
    assert "0 to encode" in run_encode(*args).stdout


def test_changed_inputs_are_refused_unless_replan(corpus, tiny_codec_dir, tmp_path):
    manifest, entries = corpus
    out = tmp_path / "out"
    args = ["--codec", str(tiny_codec_dir), "--output", str(out), "--shard-size", "4", "--status-port", "-1"]
    assert run_encode("--manifest", str(manifest), *args).returncode == 0
    smaller = write_manifest(tmp_path / "smaller.jsonl", entries[:5])
    refused = run_encode("--manifest", str(smaller), *args)
    assert refused.returncode == 2 and "--replan" in refused.stderr and "manifest_sha256" in refused.stderr
    assert len(published_shards(out)) == 3  # nothing touched
    replanned = run_encode("--manifest", str(smaller), *args, "--replan")
    assert replanned.returncode == 0, replanned.stderr[-3000:]
    assert len(read_rows(out)) == 5
    aside = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and len(list((aside[0] / "shards").glob("shard-*.parquet"))) == 3


def test_second_job_on_same_output_is_refused(corpus, tiny_codec_dir, tmp_path):
    manifest, _ = corpus
    out = tmp_path / "out"
    with OutputLock(out):
        result = run_encode("--manifest", str(manifest), "--codec", str(tiny_codec_dir), "--output", str(out))
    assert result.returncode == 3 and "in use by another encode job" in result.stderr
    assert not (out / "plan.json").exists()


def test_export_jsonl_in_upstream_format(corpus, tiny_codec_dir, tmp_path):
    """Every key of each manifest line comes back with the codes; a reference not at 24 kHz is replaced by a
    24 kHz copy in refs_24k/ next to the export (upstream's dataset.py asserts 24 kHz), and the log says so."""
    import soundfile as sf

    from shared.audio import AudioLimits, load_audio

    _, entries = corpus
    assert sf.info(entries[1]["audio"]).samplerate == 16_000
    # Speakers, languages and keys the pipeline does not know, on top of the upstream ones; two references.
    entries = [{**e, "ref_audio": entries[i % 2]["audio"], "speaker": f"spk{i % 2}", "emotion": {"calm": i},
                **({"language": "English"} if i % 3 else {})} for i, e in enumerate(entries)]
    manifest = write_manifest(tmp_path / "raw.jsonl", entries)
    out, exported = tmp_path / "out", tmp_path / "export" / "train_with_codes.jsonl"
    exported.parent.mkdir()
    result = run_encode("--manifest", str(manifest), "--codec", str(tiny_codec_dir), "--output", str(out),
                        "--export-jsonl", str(exported))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 reference(s) not at 24 kHz" in result.stdout and str(exported.parent / "refs_24k") in result.stdout
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [line["audio"] for line in lines] == [e["audio"] for e in entries]
    by_id = {r["audio"]: r["audio_codes"] for r in read_rows(out)}
    copies = sorted((exported.parent / "refs_24k").iterdir())
    assert len(copies) == 1
    for line, entry in zip(lines, entries):
        assert np.array_equal(np.array(line.pop("audio_codes")), by_id[line["audio"]])
        if entry["ref_audio"] == entries[1]["audio"]:  # 16 kHz: the copy, resampled as the encoder resamples
            assert line.pop("ref_audio") == str(copies[0])
            entry = {k: v for k, v in entry.items() if k != "ref_audio"}
        assert line == entry
    copy, rate = sf.read(copies[0], dtype="float32")
    assert rate == 24_000
    np.testing.assert_array_equal(copy, load_audio(entries[1]["audio"], AudioLimits()).samples)
