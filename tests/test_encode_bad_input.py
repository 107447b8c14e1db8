"""Bad input of many kinds: each becomes an error row with a reason (or a correctly resampled row),
every good row is still written, and the job completes.

An unreadable file, for tests that run as root (who reads whatever the file modes say): a FIFO (opening it
would wait for a writer forever; it must be refused without being opened) and a path through a regular file
(`good.wav/x.wav`, ENOTDIR: the open itself fails)."""
import json
import math
import os

import numpy as np
import soundfile as sf

from shared.synth import synth_utterance
from tests.conftest import REPO, run_encode, write_manifest
from tests.test_encode_job import read_rows


def make_inputs(d):
    good = synth_utterance(1.5, 24_000, seed=1)
    sf.write(d / "good.wav", good, 24_000)
    sf.write(d / "ref.wav", good, 24_000)
    (d / "empty.wav").write_bytes(b"")
    sf.write(d / "full.wav", synth_utterance(2.0, 24_000, seed=2), 24_000)
    (d / "header_only.wav").write_bytes((d / "full.wav").read_bytes()[:30])
    (d / "not_audio.wav").write_bytes(b"this is a text file pretending to be a wav\n" * 50)
    sf.write(d / "silence.wav", np.zeros(24_000, dtype=np.float32), 24_000)
    sf.write(d / "8k.wav", synth_utterance(1.0, 8_000, seed=3), 8_000)
    stereo = np.stack([synth_utterance(1.2, 48_000, seed=4), synth_utterance(1.2, 48_000, seed=5)], axis=1)
    sf.write(d / "48k_stereo.wav", stereo, 48_000)
    sf.write(d / "8bit.wav", synth_utterance(1.0, 16_000, seed=6), 16_000, subtype="PCM_U8")
    sf.write(d / "float.wav", synth_utterance(1.0, 22_050, seed=7), 22_050, subtype="FLOAT")
    nan = synth_utterance(1.0, 24_000, seed=8)
    nan[100:200] = np.nan
    sf.write(d / "nan.wav", nan, 24_000, subtype="FLOAT")
    sf.write(d / "long.wav", synth_utterance(5.0, 16_000, seed=9), 16_000)
    sf.write(d / "short.wav", synth_utterance(0.05, 24_000, seed=10), 24_000)
    sf.write(d / "flac.flac", synth_utterance(1.1, 44_100, seed=11), 44_100)
    sf.write(d / "header_0_frames.wav", np.zeros(0, dtype=np.float32), 24_000)  # a valid header, no samples
    sf.write(d / "flac_named.wav", synth_utterance(1.0, 32_000, seed=12), 32_000, format="FLAC")  # wrong extension
    sf.write(d / "one_sample.wav", np.full(1, 0.5, dtype=np.float32), 24_000)
    sf.write(d / "192k.wav", synth_utterance(1.0, 192_000, seed=13), 192_000)
    six = np.stack([synth_utterance(1.0, 24_000, seed=20 + c) for c in range(6)], axis=1)
    sf.write(d / "6ch.wav", six, 24_000)
    sf.write(d / "int32.wav", synth_utterance(1.0, 24_000, seed=14), 24_000, subtype="PCM_32")
    sf.write(d / "clip.mp3", synth_utterance(1.0, 24_000, seed=15), 24_000, format="MP3", subtype="MPEG_LAYER_III")
    sf.write(d / "clip.ogg", synth_utterance(1.0, 24_000, seed=16), 24_000, format="OGG", subtype="VORBIS")
    sf.write(d / "clip.opus", synth_utterance(1.0, 48_000, seed=17), 48_000, format="OGG", subtype="OPUS")
    (d / "a_directory.wav").mkdir()
    os.mkfifo(d / "fifo.wav")
    (d / "loop_a.wav").symlink_to(d / "loop_b.wav")
    (d / "loop_b.wav").symlink_to(d / "loop_a.wav")

    def row(name, text="一段文字", ref=str(d / "ref.wav"), id=None):
        return {"id": id or name, "audio": str(d / name), "text": text, "ref_audio": ref}

    # (manifest entry, expected error reason or None for a good row, expected source sample rate)
    return [
        (row("good.wav"), None, 24_000),
        (row("missing.wav"), "missing_file", None),
        (row("empty.wav"), "undecodable", None),
        (row("header_only.wav"), "undecodable", None),
        (row("not_audio.wav"), "undecodable", None),
        (row("silence.wav"), "silent", None),
        (row("8k.wav"), None, 8_000),
        (row("48k_stereo.wav"), None, 48_000),
        (row("8bit.wav"), None, 16_000),
        (row("float.wav"), None, 22_050),
        (row("nan.wav"), "non_finite", None),
        (row("long.wav"), "too_long", None),
        (row("short.wav"), "too_short", None),
        (row("good.wav", text="   ", id="blank_text"), "empty_text", None),
        (b'{"audio": "caf\xe9.wav", "text": "latin-1 bytes"}', "bad_line", None),
        (b'{"audio": "broken.wav", "text": ', "bad_line", None),
        (row("good.wav", ref=str(d / "no_such_ref.wav"), id="bad_ref"), "missing_ref_audio", None),
        (row("flac.flac"), None, 44_100),
        (row("header_0_frames.wav"), "empty_audio", None),
        ({"id": "no_audio_key", "text": "一段文字"}, "no_audio", None),
        (row("flac_named.wav"), None, 32_000),  # read by its content, whatever its name says
        (row("one_sample.wav"), "too_short", None),
        (row("192k.wav"), None, 192_000),
        (row("6ch.wav"), None, 24_000),
        (row("int32.wav"), None, 24_000),
        (row("clip.mp3"), None, 24_000),
        (row("clip.ogg"), None, 24_000),
        (row("clip.opus"), None, 48_000),
        (row("a_directory.wav"), "not_a_file", None),
        (row("fifo.wav"), "not_a_file", None),
        (row("good.wav/inside.wav"), "unreadable", None),
        (row("loop_a.wav"), "unreadable", None),
        (row("good.wav", text="line\x00with\x07controls", id="control_text"), "bad_text", None),
        (row("good.wav", text="字" * 10_000, id="long_text"), "text_too_long", None),
        (row("good.wav"), "duplicate_id", None),  # the same id as the first line
    ]


def test_every_kind_of_bad_input_is_reported_and_good_rows_survive(tiny_codec_dir, tmp_path):
    cases = make_inputs(tmp_path)
    manifest = write_manifest(tmp_path / "raw.jsonl", [entry for entry, _, _ in cases])
    out = tmp_path / "out"
    result = run_encode("--manifest", str(manifest), "--codec", str(tiny_codec_dir), "--output", str(out),
                        "--shard-size", "5", "--max-seconds", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = sorted(read_rows(out), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(len(cases)))
    for row, (entry, reason, rate) in zip(rows, cases):
        if reason is None:
            assert row["error"] is None, row
            assert row["sample_rate"] == rate
            samples_24k = math.ceil(len(sf.read(entry["audio"])[0]) * 24_000 / rate)
            assert row["num_frames"] == math.ceil(samples_24k / 1920) == len(row["audio_codes"])
        else:
            assert row["error"] is not None and row["error"].startswith(reason + ":"), (entry, row["error"])
            assert row["audio_codes"] is None
            if isinstance(entry, dict) and reason not in ("empty_text", "no_audio", "duplicate_id"):
                assert (entry["audio"] in row["error"]) or ("ref" in reason), row["error"]
    expected_errors = sum(reason is not None for _, reason, _ in cases)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["rows_error"] == expected_errors
    assert summary["rows_ok"] == len(cases) - expected_errors
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == expected_errors
    assert f"{expected_errors} errors" in result.stdout


def test_every_reason_is_listed_in_the_data_guide(tmp_path):
    """Each reason code the cases above produce (and `decode_failed`, a decoder's own bug) is in the data guide."""
    reasons = {reason for _, reason, _ in make_inputs(tmp_path) if reason} | {"decode_failed"}
    guide = (REPO / "docs" / "preparing-data.md").read_text()
    listed = guide[guide.index("Error reasons:"):].split("\n\n")[0]
    assert not sorted(r for r in reasons if f"`{r}`" not in listed), listed
