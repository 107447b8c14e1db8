"""New voices on a CustomVoice model (training.speakers.custom_voice): the tiny CustomVoice model (built-in speakers ryan,
row 3000, and the sichuan-dialect speaker eric, row 3003) is fine-tuned on a new speaker and a new beijing-dialect
speaker (and retrains built-in ryan). The export keeps the built-in speakers (ids, dialect flags, rows) next to the
new ones in free rows, upstream generate_custom_voice speaks with every one of them, and greedy generation gives
back each new speaker's trained codes (the dialect speaker through language chinese and auto). Both embedding paths run: a trainable
row per speaker, and x-vectors from a Base model's speaker encoder. Bad inputs stop before anything is written."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from shared import schema
from shared.qwen import load_inference_model, load_tts_model
from shared.synth import synth_utterance
from training.data.synthetic import tone, write_utterances
from training.train.validate import TrainingInputProblem, validate

from tests.test_training_distributed import ENV, REPO, train_command

# name -> (language, text, audio seed)
NEW = {"nova": ("English", "hello world", 31), "lao_li": ("beijing_dialect", "the quick brown fox", 32)}
RETRAINED = {"Ryan": ("English", "one two three", 33)}  # a built-in speaker retrained (model.retrain_speakers)
STEPS = 100
GREEDY = dict(do_sample=False, subtalker_dosample=False, repetition_penalty=1.0)


def write_speakers(root, codec, speakers: dict, takes: int = 1):
    """`takes` utterances per speaker (the same text), each speaker with its own reference; returns the encode
    output directory."""
    entries, clips = [], []
    for name, (language, text, seed) in speakers.items():
        ref = root / f"ref-{name}.wav"
        sf.write(ref, synth_utterance(1.2, 24000, seed), 24000)
        for take in range(takes):
            clip = tone(0.5, seed + 100 * take)
            audio = root / f"{name}-{take}.wav"
            sf.write(audio, clip, 24000)
            entries.append({"id": f"{name}-{take}", "audio": str(audio), "text": text, "ref_audio": str(ref),
                            "speaker": name, **({"language": language} if language else {})})
            clips.append(clip)
    return write_utterances(root / "encoded", codec, entries, clips)


def run(*args, timeout=400):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, timeout=timeout, capture_output=True, text=True)


def torchrun(tiny_dir, model, data, out, *overrides):
    return run(*train_command(tiny_dir, data, out, nproc=2), f"model.path={model}", *overrides)


@pytest.fixture(scope="module")
def learned(tiny_dir, tiny_custom_voice_dir, tmp_path_factory):
    """Trainable speaker rows: overfit the two new speakers and a retrained built-in one, export (no flag: every
    speaker of the run)."""
    root = tmp_path_factory.mktemp("custom_voice_learned")
    data = write_speakers(root, tiny_dir / "codec", {**NEW, **RETRAINED})
    out = root / "run"
    result = torchrun(tiny_dir, tiny_custom_voice_dir, data, out, "model.retrain_speakers=[ryan]",
                      f"train.steps={STEPS}", "train.lr=5e-3",
                      "train.lr_schedule=constant", "train.warmup_steps=0", "train.weight_decay=0",
                      "checkpoint.interval=1000")
    assert result.returncode == 0, result.stderr[-3000:]
    voice = root / "voice"
    result = run("-m", "training.export", "--checkpoint", str(out / f"step-{STEPS:06d}"), "--output", str(voice))
    assert result.returncode == 0, result.stderr[-3000:]
    return data, out, voice


def test_export_keeps_built_in_speakers_next_to_new_ones(learned, tiny_custom_voice_dir):
    _, out, voice = learned
    talker = json.loads((voice / "config.json").read_text())["talker_config"]
    # New speakers take the free rows between the built-in ones (3001, 3002), in name order.
    assert talker["spk_id"] == {"ryan": 3000, "eric": 3003, "lao_li": 3001, "nova": 3002}
    assert talker["spk_is_dialect"] == {"ryan": False, "eric": "sichuan_dialect", "lao_li": "beijing_dialect",
                                        "nova": False}
    assert json.loads((out / "voices.json").read_text())["learned"] is True
    base = load_tts_model(tiny_custom_voice_dir).talker.get_input_embeddings().weight
    exported = load_tts_model(voice).talker.get_input_embeddings().weight
    assert torch.equal(exported[3003], base[3003]), "built-in eric's row changed"
    assert not torch.allclose(exported[3000], base[3000], atol=1e-3), "retrained ryan's row did not train"
    start = base[[3000, 3003]].mean(0)  # where the new rows started
    for row in (3001, 3002):
        assert not torch.allclose(exported[row], start, atol=1e-3), "a new speaker's row did not train"


def test_every_speaker_speaks_and_new_ones_give_back_their_codes(learned):
    data, _, voice = learned
    tts = load_inference_model(voice)
    assert sorted(tts.get_supported_speakers()) == ["eric", "lao_li", "nova", "ryan"]
    for speaker in ("ryan", "eric", "nova", "lao_li"):
        wavs, rate = tts.generate_custom_voice("hello world", speaker=speaker, max_new_tokens=6, **GREEDY)
        assert rate == 24000 and len(wavs[0]) > 0 and np.isfinite(wavs[0]).all()
    wavs, _ = tts.generate_custom_voice("hello world", speaker="nova", instruct="speak slowly", max_new_tokens=6)
    assert len(wavs[0]) > 0  # the instruct path still runs
    rows = {r.speaker: r for r in schema.read_rows(schema.published_shards(data)[0])}
    # The dialect speaker trained with the beijing dialect id; upstream reaches it through chinese and auto.
    for speaker, language in (("nova", "english"), ("lao_li", "chinese"), ("lao_li", "auto"), ("ryan", "english")):
        row = rows[speaker if speaker != "ryan" else "Ryan"]
        codes = torch.from_numpy(row.codes.astype(np.int64))
        input_ids = tts._tokenize_texts([tts._build_assistant_text(row.text)])
        generated, _ = tts.model.generate(input_ids=input_ids, languages=[language], speakers=[speaker],
                                          non_streaming_mode=True, max_new_tokens=len(codes) + 8, **GREEDY)
        assert torch.equal(generated[0].cpu(), codes), f"{speaker} with language {language}"


def test_x_vectors_from_a_base_speaker_encoder_train_eval_and_export(tiny_dir, tiny_custom_voice_dir, tmp_path):
    """model.speaker_encoder: each new row is the speaker's x-vector from the Base model's encoder. With eval on,
    samples come from generate_custom_voice (the dialect speaker's in chinese) and the built-in speakers'
    forgetting is logged as keep/<speaker> to metrics.jsonl and TensorBoard."""
    from shared.audio import load_audio
    from shared.qwen import load_speaker_encoder, speaker_mel
    from training.train.metrics import read_metrics
    from training.model.talker import speaker_embedding

    data = write_speakers(tmp_path, tiny_dir / "codec", NEW, takes=4)
    out = tmp_path / "run"
    result = torchrun(tiny_dir, tiny_custom_voice_dir, data, out, f"model.speaker_encoder={tiny_dir / 'model'}",
                      "train.steps=2", "eval.fraction=0.3", "eval.interval=2", "eval.max_new_tokens=6",
                      "eval.sentences=[hello world]")
    assert result.returncode == 0, result.stderr[-3000:]
    evals = read_metrics(out, kind="eval")
    assert evals and sorted(evals[-1]["keep"]) == ["eric", "ryan"], evals
    for score in evals[-1]["keep"].values():
        assert 0.0 <= score["all_codebooks"] <= score["codebook0"] <= 1.0
    sampled = {s["speaker"] for s in evals[-1]["samples"]}
    assert "lao_li" in sampled and sampled == set(evals[-1]["eval_loss_by_speaker"])  # the held-out speakers
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    assert {"keep/ryan/codebook0", "keep/eric/all_codebooks"} <= set(board.Tags()["scalars"])

    voice = tmp_path / "voice"
    result = run("-m", "training.export", "--checkpoint", str(out / "step-000002"), "--output", str(voice),
                 "--all-speakers")
    assert result.returncode == 0, result.stderr[-3000:]
    tts = load_inference_model(voice)
    talker = tts.model.config.talker_config
    assert talker.spk_id == {"ryan": 3000, "eric": 3003, "lao_li": 3001, "nova": 3002}
    assert talker.spk_is_dialect["lao_li"] == "beijing_dialect"
    encoder = load_speaker_encoder(tiny_dir / "model")
    for name, row in (("lao_li", 3001), ("nova", 3002)):
        ref = next(r.ref_audio for r in schema.read_rows(schema.published_shards(data)[0]) if r.speaker == name)
        expected = speaker_embedding(encoder, speaker_mel(load_audio(ref).samples))
        torch.testing.assert_close(tts.model.talker.get_input_embeddings().weight[row].detach(), expected, rtol=0,
                                   atol=1e-5)
    for speaker in ("nova", "lao_li", "eric"):
        wavs, _ = tts.generate_custom_voice("hello world", speaker=speaker, max_new_tokens=6, **GREEDY)
        assert len(wavs[0]) > 0


@pytest.fixture(scope="module")
def tiny_0p6b(tmp_path_factory, tiny_dir):
    from shared.tiny_model import write_model

    return write_model(tmp_path_factory.mktemp("tiny_0p6b") / "model", tiny_dir / "codec", shape="0.6b")


def bad_inputs(tiny_dir, tiny_custom_voice_dir, tiny_0p6b):
    """(why, model.path, speakers, extra overrides, the words the one line must hold)."""
    english = ("English", "hello world", 41)
    return [
        ("name clash", tiny_custom_voice_dir, {"Ryan": english}, [], "model.retrain_speakers=[ryan]"),
        ("dialect on a Base model", tiny_dir / "model", {"nova": NEW["lao_li"]}, [], "fine-tune a CustomVoice"),
        ("dialect mixed", tiny_custom_voice_dir, {"nova": NEW["lao_li"], "NOVA": english}, [], "mixes dialect"),
        ("encoder of another size", tiny_custom_voice_dir, {"nova": english},
         [f"model.speaker_encoder={tiny_0p6b}"], "another model size"),
    ]


def test_bad_speakers_and_models_are_one_line_before_anything_is_written(tiny_dir, tiny_custom_voice_dir, tiny_0p6b,
                                                                         tmp_path):
    for k, (why, model, speakers, extra, words) in enumerate(bad_inputs(tiny_dir, tiny_custom_voice_dir, tiny_0p6b)):
        root = tmp_path / f"case{k}"
        root.mkdir()
        data = write_speakers(root, tiny_dir / "codec", speakers)
        overrides = [f"model.path={model}", f"data.shards={data}", f"checkpoint.dir={root / 'run'}", *extra]
        with pytest.raises(TrainingInputProblem, match=re.escape(words)):
            validate(str(REPO / "training/configs/tiny.yaml"), overrides)
    # The whole command (the last case; the others fail in the same check): one line, exit 2, no run folder.
    result = run("-m", "training.train", "--config", str(REPO / "training/configs/tiny.yaml"), *overrides)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and words in lines[0], result.stderr[-2000:]
    assert not (root / "run").exists()


def test_forgetting_is_measured_against_the_base_models_own_generation(tiny_custom_voice_dir, tiny_dir):
    """keep/<speaker>: unchanged weights agree on every frame; changed weights do not (so it can fail)."""
    from shared.qwen import load_speaker_encoder
    from training.eval.keep_check import KeepCheck, frame_agreement

    codes = torch.arange(32).view(2, 16)
    assert frame_agreement(codes, codes) == (1.0, 1.0)
    changed = codes.clone()
    changed[1, 5] = -1
    assert frame_agreement(codes, torch.cat([changed, codes[:1]])) == (2 / 3, 1 / 3)  # one extra frame counts
    tts = load_inference_model(tiny_custom_voice_dir)
    check = KeepCheck({"ryan": False, "eric": "sichuan_dialect"}, [], lambda text: 12,
                      load_speaker_encoder(tiny_dir / "model"),
                      kept_rows=[3000, 3003])
    check.remember_base(tts)
    with torch.no_grad():  # a built-in row that moved in training is measured as the export writes it (restored)
        tts.model.talker.get_input_embeddings().weight[3000] *= 0.5
    same = check.measure(tts)
    assert {n: (s.codebook0, s.all_codebooks) for n, s in same.items()} == {"ryan": (1.0, 1.0), "eric": (1.0, 1.0)}
    assert all(s.similarity is None or s.similarity > 0.999 for s in same.values())
    with torch.no_grad():
        tts.model.talker.codec_head.weight.add_(torch.randn_like(tts.model.talker.codec_head.weight))
    moved = check.measure(tts)
    assert all(s.codebook0 < 1.0 for s in moved.values())


def test_new_rows_avoid_built_in_control_and_language_ids_and_retraining_is_explicit():
    from training.speakers.custom_voice import SpeakerLanguages, VoiceProblem, plan_voices

    talker = dict(vocab_size=3072, spk_id={"ryan": 3000, "eric": 3003}, spk_is_dialect={"ryan": False, "eric": "x"},
                  codec_language_id={"english": 2050, "odd": 3004}, codec_pad_id=3005, codec_bos_id=2149)
    base = {"tts_model_type": "custom_voice", "talker_config": talker}
    languages = SpeakerLanguages()
    for speaker in ("d", "c", "b", "a", None, "Ryan"):
        languages.add(speaker, "english")
    with pytest.raises(VoiceProblem, match=re.escape("rename it in the manifest")):
        plan_voices(base, languages, [], learned=True)
    voices = plan_voices(base, languages, ["RYAN"], learned=True)
    # Free rows in order (unnamed first, then names), skipping 3000, 3003 (speakers), 3004 (language), 3005 (pad).
    assert voices.rows == {None: 3001, "a": 3002, "b": 3006, "c": 3007, "d": 3008, "ryan": 3000}
    assert list(voices.rows.values()) == sorted(voices.rows.values()) and voices.retrained == {"ryan"}
    with pytest.raises(VoiceProblem, match="not a built-in speaker"):
        plan_voices(base, languages, ["nobody"], learned=True)
    from training.speakers.custom_voice import Voices

    assert Voices.from_dict(json.loads(json.dumps(voices.to_dict()))) == voices  # RUN/voices.json round trip
