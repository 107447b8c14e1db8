"""Several speakers and languages in one fine-tune: two speakers say the same sentences with different audio
(one with a manifest language, one without; one with two references), training gives each speaker the mean of
its references' x-vectors, `--all-speakers` exports both, and greedy generation for every (speaker, sentence)
reproduces that speaker's trained codes, so a swapped or averaged x-vector would fail."""
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from shared import schema
from shared.qwen import load_codec, load_inference_model, load_tts_model, speaker_mel
from shared.synth import synth_utterance
from training.model.talker import speaker_embedding
from training.data.synthetic import tone, write_utterances

from tests.test_training_distributed import ENV, REPO

SENTENCES = ["hello world", "the quick brown fox"]
# name as in the manifest -> (manifest language, reference voices (seed, rate), audio seeds per sentence)
SPEAKERS = {
    "Alice": ("English", [(0, 24000)], (11, 12)),
    "bob": (None, [(1, 16000), (2, 24000)], (21, 22)),  # two references: its vector is their mean
}
STEPS = 120
GREEDY = dict(do_sample=False, subtalker_dosample=False, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def tiny_speakers_dir(tmp_path_factory):
    """A tiny model whose speaker encoder tells voices apart (a random one maps every clip to nearly the same
    x-vector, and then no training could separate two speakers)."""
    from shared.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny_speakers"), seed=0, distinct_speakers=True)


@pytest.fixture(scope="module")
def two_speakers(tiny_speakers_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("two_speakers")
    entries, clips = [], []
    for name, (language, refs, seeds) in SPEAKERS.items():
        ref_paths = []
        for seed, rate in refs:
            path = root / f"ref-{name}-{seed}.wav"
            sf.write(path, synth_utterance(1.5, rate, seed), rate)
            ref_paths.append(str(path))
        for k, (text, seed) in enumerate(zip(SENTENCES, seeds)):
            clip = tone(0.5, seed)
            audio = root / f"{name}-{k}.wav"
            sf.write(audio, clip, 24000)
            entry = {"id": f"{name}-{k}", "audio": str(audio), "text": text, "ref_audio": ref_paths[k % len(refs)],
                     "speaker": name, "take": k}  # "take": an extra key, kept in the shard
            if language:
                entry["language"] = language
            entries.append(entry)
            clips.append(clip)
    data = write_utterances(root / "encoded", tiny_speakers_dir / "codec", entries, clips)

    run = root / "run"
    result = subprocess.run(
        [sys.executable, "-m", "training.train", "--config", str(REPO / "training/configs/tiny.yaml"),
         f"model.path={tiny_speakers_dir / 'model'}", f"data.shards={data}", f"checkpoint.dir={run}",
         f"train.steps={STEPS}", "train.lr=5e-3", "train.lr_schedule=constant", "train.warmup_steps=0",
         "train.weight_decay=0", "checkpoint.interval=1000"],
        env=ENV, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "alice: 1 reference(s), bob: 2 reference(s)" in result.stderr
    voices = root / "voices"
    result = subprocess.run([sys.executable, "-m", "training.export", "--checkpoint", str(run / f"step-{STEPS:06d}"),
                             "--output", str(voices), "--all-speakers"], env=ENV, timeout=120, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = schema.read_rows(schema.published_shards(data)[0])
    return data, voices, rows


def test_references_give_distinct_x_vectors(tiny_speakers_dir, two_speakers):
    """The precondition of the test below: the two speakers' vectors differ by far more than rounding."""
    _, _, rows = two_speakers
    encoder = load_tts_model(tiny_speakers_dir / "model").speaker_encoder
    from training.speakers.reference import ReferenceCache, SpeakerTable

    table = SpeakerTable()
    for row in rows:
        table.add(row.speaker, row.ref_audio)
    cache = ReferenceCache(encoder, table)
    alice, bob = cache.speaker_vector("ALICE"), cache.speaker_vector("Bob")
    assert torch.nn.functional.cosine_similarity(alice, bob, dim=0) < 0.9
    bob_refs = sorted({r.ref_audio for r in rows if r.speaker == "bob"})
    assert len(bob_refs) == 2
    torch.testing.assert_close(bob, (cache.xvector(bob_refs[0]) + cache.xvector(bob_refs[1])) / 2)


def test_all_speakers_export_writes_each_speaker_row(tiny_speakers_dir, two_speakers):
    _, voices, rows = two_speakers
    config = json.loads((voices / "config.json").read_text())
    talker = config["talker_config"]
    assert config["tts_model_type"] == "custom_voice"
    assert talker["spk_id"] == {"alice": 3000, "bob": 3001}
    assert talker["spk_is_dialect"] == {"alice": False, "bob": False}
    assert "/" not in json.dumps(config)  # no local path (_name_or_path is left empty)
    assert config["_name_or_path"] == ""
    # Each row holds the mean of that speaker's references' x-vectors, computed as training computed it.
    encoder = load_tts_model(tiny_speakers_dir / "model").speaker_encoder
    embedding = load_tts_model(voices).talker.get_input_embeddings().weight
    for name, row in talker["spk_id"].items():
        refs = sorted({r.ref_audio for r in rows if r.speaker.lower() == name})
        xvectors = [speaker_embedding(encoder, speaker_mel(_load_24k(r))) for r in refs]
        torch.testing.assert_close(embedding[row], torch.stack(xvectors).mean(0), rtol=0, atol=1e-5)


def _load_24k(path):
    from shared.audio import AudioLimits, load_audio

    return load_audio(path, AudioLimits(max_seconds=600.0)).samples


def test_each_speaker_generates_its_own_trained_codes(two_speakers):
    data, voices, rows = two_speakers
    assert {r.speaker: r.language for r in rows} == {"Alice": "English", "bob": None}
    assert all(r.extra == {"take": int(r.id[-1])} for r in rows)
    tts = load_inference_model(voices)
    assert sorted(tts.get_supported_speakers()) == ["alice", "bob"]
    by_speaker = {}
    for row in rows:
        by_speaker.setdefault(row.text, {})[row.speaker] = torch.from_numpy(row.codes)
    for text, codes in by_speaker.items():
        assert not torch.equal(codes["Alice"], codes["bob"])  # same sentence, different audio
        for speaker, expected in codes.items():
            language = SPEAKERS[speaker][0] or "auto"
            input_ids = tts._tokenize_texts([tts._build_assistant_text(text)])
            generated, _ = tts.model.generate(input_ids=input_ids, languages=[language], speakers=[speaker],
                                              non_streaming_mode=True, max_new_tokens=len(expected) + 8, **GREEDY)
            assert torch.equal(generated[0].cpu(), expected), (speaker, text)
    # The user-facing call decodes exactly those codes.
    expected = by_speaker[SENTENCES[0]]["Alice"]
    wavs, rate = tts.generate_custom_voice(text=SENTENCES[0], speaker="Alice", language="English",
                                           max_new_tokens=len(expected) + 8, **GREEDY)
    decoded, _ = load_codec(voices / "speech_tokenizer").decode([{"audio_codes": expected}])
    np.testing.assert_allclose(wavs[0], decoded[0], atol=1e-5)


def test_export_speaker_choice_and_its_errors():
    from training.export.model_dir import ExportError, choose_speakers
    from training.speakers.reference import SpeakerTable

    named = SpeakerTable()
    for speaker, ref in (("Alice", "a.wav"), ("BOB", "b1.wav"), ("bob", "b2.wav")):
        named.add(speaker, ref)
    assert named.references == {"alice": ["a.wav"], "bob": ["b1.wav", "b2.wav"]}  # one speaker, any case
    assert choose_speakers(named, None, all_speakers=True) == {"alice": "alice", "bob": "bob"}
    assert choose_speakers(named, "Bob", all_speakers=False) == {"bob": "bob"}
    with pytest.raises(ExportError, match="pass --all-speakers, or --speaker-name with one of them"):
        choose_speakers(named, "carol", all_speakers=False)

    mixed = SpeakerTable()
    mixed.add(None, "u.wav")
    mixed.add("alice", "a.wav")
    assert choose_speakers(mixed, "Narrator", all_speakers=True) == {"alice": "alice", "narrator": None}
    with pytest.raises(ExportError, match="name it with --speaker-name"):
        choose_speakers(mixed, None, all_speakers=True)
    with pytest.raises(ExportError, match="also a manifest speaker"):
        choose_speakers(mixed, "ALICE", all_speakers=True)
    # Alone, a name that is a speaker of the run exports that speaker, not the rows without `speaker`.
    assert choose_speakers(mixed, "ALICE", all_speakers=False) == {"alice": "alice"}
    # Any other name could mean the rows without `speaker` or a misspelt speaker: refused, with both ways out.
    with pytest.raises(ExportError, match=r"--speaker-name 'Alcie' is none of the run's speakers \(alice\) and the "
                                          r"run also has rows without `speaker`: pass --speaker-name with one of them, "
                                          r"or --all-speakers --speaker-name Alcie to export the rows without "
                                          r"`speaker` as 'alcie' beside them"):
        choose_speakers(mixed, "Alcie", all_speakers=False)
    unnamed = SpeakerTable()
    unnamed.add(None, "u.wav")
    assert choose_speakers(unnamed, "Narrator", all_speakers=False) == {"narrator": None}  # a single-speaker run


def test_export_leaves_out_speakers_that_never_trained(caplog):
    """`trained`: the speakers with a row that was not held out for eval (tests/test_training_eval.py exports a
    trained run whose speaker's shard is held out whole)."""
    from training.export.model_dir import ExportError, choose_speakers
    from training.speakers.reference import SpeakerTable

    table = SpeakerTable()
    for speaker, ref in (("alice", "a.wav"), ("bob", "b.wav"), (None, "u.wav")):
        table.add(speaker, ref)
    with caplog.at_level("WARNING", logger="training.export"):
        assert choose_speakers(table, "Narrator", True, {"alice", None}) == {"alice": "alice", "narrator": None}
    assert "leaving out 'bob': every row held out for eval" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="training.export"):  # no name needed for rows that never trained
        assert choose_speakers(table, None, True, {"alice"}) == {"alice": "alice"}
    assert "leaving out 'bob', the rows without `speaker`: every row held out" in caplog.text
    with pytest.raises(ExportError, match=r"'bob' never trained: every row of it is held out for eval \(eval"):
        choose_speakers(table, "Bob", False, {"alice", None})
    with pytest.raises(ExportError, match="no speaker of the run trained: every row of 'alice', 'bob', the rows "
                                          "without `speaker` is held out"):
        choose_speakers(table, "Narrator", True, set())
    only = SpeakerTable()
    only.add("carol", "c.wav")
    with pytest.raises(ExportError, match="'carol' never trained"):
        choose_speakers(only, "my_voice", False, set())  # the only speaker, renamed: still refused


def test_an_unknown_language_is_refused_with_the_model_languages(tiny_dir):
    from shared.qwen import Qwen3TTSConfig
    from training.model.layout import SpecialIds

    ids = SpecialIds.from_config(Qwen3TTSConfig.from_pretrained(tiny_dir / "model"))
    assert ids.codec_prefix("ENGLISH") == (ids.codec_think, ids.codec_think_bos, 2050, ids.codec_think_eos)
    assert ids.codec_prefix("Auto") == ids.codec_prefix(None) == (ids.codec_nothink, ids.codec_think_bos,
                                                                  ids.codec_think_eos)
    with pytest.raises(ValueError, match=r"language 'Klingon' is not one of this model's languages \(chinese, "
                                         r"english\); fix the manifest's `language`"):
        ids.codec_prefix("Klingon")
