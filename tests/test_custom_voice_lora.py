"""LoRA on a CustomVoice model (training.model.lora with peft trainable tokens): the tiny CustomVoice model (built-in ryan,
row 3000, and the sichuan-dialect eric, row 3003) learns a new speaker on the learned-row path from rows without
ref_audio, under real torchrun with 2 ranks, killed-free resume included. The checkpoint holds the adapters and the
new rows only; the merged export keeps every built-in row bit-identical with its spk_id/spk_is_dialect and
upstream generation gives back the new speaker's trained codes; the built-in speakers' forgetting is measured on
the merged weights at eval. Units cover the x-vector path, the refused --adapter export and the configs."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.distributed.checkpoint as dcp

from shared import schema
from shared.qwen import load_inference_model, load_tts_model
from training.model.lora import META_FILE, ROWS_DELTA, SPEAKER_EMBEDDING, is_adapter
from training.train.metrics import read_metrics
from training.data.synthetic import tone, write_shard, write_utterances
from training.train.validate import validate

from tests.test_custom_voice import GREEDY, run, torchrun
from tests.test_training_distributed import REPO

# LoRA only (rank 16 on every projection and the heads, as the LoRA overfit test needs to fit a random frozen model)
# plus the speaker rows as trainable tokens.
LORA = ["lora.rank=16", "lora.alpha=32", 'lora.targets=["*_proj","codec_head","code_predictor.lm_head.*"]',
        "train.lr=1e-2", "train.lr_schedule=constant", "train.warmup_steps=0", "train.weight_decay=0",
        "checkpoint.interval=1000", "eval.shards=[1]", "eval.interval=1000", "eval.max_new_tokens=6",
        "eval.sentences=[hello world]"]
HALF, STEPS = 40, 80
TEXTS = {"nova-0": "hello world", "nova-1": "the quick brown fox"}


def write_data(root, codec):
    """Shard 0: two rows of the new speaker nova, without ref_audio; shard 1 (held out for eval): one row of
    another new speaker."""
    entries, clips = [], []
    for k, (row_id, text) in enumerate(TEXTS.items()):
        clip = tone(0.5, 51 + k)
        sf.write(root / f"{row_id}.wav", clip, 24000)
        entries.append({"id": row_id, "audio": str(root / f"{row_id}.wav"), "text": text, "speaker": "Nova",
                        "language": "English"})
        clips.append(clip)
    data = write_utterances(root / "encoded", codec, entries, clips)
    held = write_utterances(root / "held", codec, [{"id": "held-0", "audio": "held.wav", "text": "one two",
                                                     "speaker": "held"}], [tone(0.4, 60)])
    write_shard(data, 1, schema.read_rows(schema.published_shards(held)[0]))
    return data


@pytest.fixture(scope="module")
def lora_voice(tiny_dir, tiny_custom_voice_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("custom_voice_lora")
    data = write_data(root, tiny_dir / "codec")
    out = root / "run"
    for steps in (HALF, STEPS):  # the second start resumes the first one's checkpoint
        result = torchrun(tiny_dir, tiny_custom_voice_dir, data, out, *LORA, f"train.steps={steps}")
        assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {out / f'step-{HALF:06d}'}" in result.stderr
    voice = root / "voice"
    result = run("-m", "training.export", "--checkpoint", str(out / f"step-{STEPS:06d}"), "--output", str(voice))
    assert result.returncode == 0, result.stderr[-3000:]
    return data, out, voice, result.stdout


def test_lora_on_custom_voice_trains_new_rows_only_and_exports_every_speaker(lora_voice, tiny_custom_voice_dir):
    data, out, voice, printed = lora_voice
    assert "'nova' (row 3002)" in printed
    # The checkpoint: adapters and the run's speaker rows (held 3001, nova 3002: name order), nothing else.
    final = out / f"step-{STEPS:06d}"
    stored = dcp.FileSystemReader(str(final)).read_metadata().state_dict_metadata
    model_keys = [k for k in stored if k.startswith("model.")]
    rows_key = f"model.talker.{SPEAKER_EMBEDDING}{ROWS_DELTA}"
    assert rows_key in model_keys and all(is_adapter(k) for k in model_keys), model_keys
    assert tuple(stored[rows_key].size) == (2, load_tts_model(tiny_custom_voice_dir).config.talker_config.hidden_size)
    assert json.loads((final / META_FILE).read_text())["speaker_rows"] == [3001, 3002]

    talker = json.loads((voice / "config.json").read_text())["talker_config"]
    assert talker["spk_id"] == {"ryan": 3000, "eric": 3003, "nova": 3002}
    assert talker["spk_is_dialect"] == {"ryan": False, "eric": "sichuan_dialect", "nova": False}
    base = load_tts_model(tiny_custom_voice_dir).talker.get_input_embeddings().weight
    exported = load_tts_model(voice).talker.get_input_embeddings().weight
    others = [r for r in range(base.shape[0]) if r not in (3001, 3002)]  # the run's rows (held's never trained)
    assert torch.equal(exported[others], base[others]), "a row other than the run's speakers' changed"
    assert not torch.allclose(exported[3002], base[[3000, 3003]].mean(0), atol=1e-3), "nova's row did not train"

    tts = load_inference_model(voice)  # upstream's wrapper: every speaker speaks, nova says its trained codes
    for speaker in ("ryan", "eric", "nova"):
        wavs, _ = tts.generate_custom_voice("hello world", speaker=speaker, max_new_tokens=6, **GREEDY)
        assert len(wavs[0]) > 0 and np.isfinite(wavs[0]).all()
    for row in schema.read_rows(schema.published_shards(data)[0]):
        codes = torch.from_numpy(row.codes.astype(np.int64))
        input_ids = tts._tokenize_texts([tts._build_assistant_text(row.text)])
        generated, _ = tts.model.generate(input_ids=input_ids, languages=["english"], speakers=["nova"],
                                          non_streaming_mode=True, max_new_tokens=len(codes) + 8, **GREEDY)
        assert torch.equal(generated[0].cpu(), codes), row.id

    # Forgetting measured on rank 0's merged inference copy, and the held-out speaker sampled.
    (evaluation, *_), last = read_metrics(out, "eval"), read_metrics(out, "eval")[-1]
    assert sorted(last["keep"]) == ["eric", "ryan"] and all(0 <= s["codebook0"] <= 1 for s in last["keep"].values())
    assert {s["speaker"] for s in last["samples"]} == {"held"} and evaluation["step"] == HALF


def test_adapter_export_of_a_custom_voice_run_is_refused_in_one_line(lora_voice, tmp_path):
    _, out, _, _ = lora_voice
    result = run("-m", "training.export", "--checkpoint", str(out / f"step-{STEPS:06d}"), "--output",
                 str(tmp_path / "adapter"), "--adapter")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "drop --adapter" in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "adapter").exists()


def test_lora_on_a_custom_voice_model_path_validates(tiny_dir, tiny_custom_voice_dir, tmp_path):
    """Refused before this change ("is not supported"); now both speaker paths validate."""
    data = write_data(tmp_path, tiny_dir / "codec")
    common = [f"model.path={tiny_custom_voice_dir}", f"data.shards={data}", f"checkpoint.dir={tmp_path / 'run'}",
              "lora.rank=8"]
    tiny = str(REPO / "training/configs/tiny.yaml")
    assert validate(tiny, common).lora.enabled
    assert validate(tiny, [*common, f"model.speaker_encoder={tiny_dir / 'model'}"]).lora.enabled


@torch.no_grad()
def test_speaker_rows_train_on_the_learned_path_only_and_merge_as_peft_applies_them(tiny_custom_voice_dir):
    """The x-vector path (model.speaker_encoder) trains adapters only; on the learned path the rows are peft
    trainable tokens, and merge_adapters (rank 0's inference copy: eval samples, keep/<speaker>) writes them as
    peft's forward does."""
    from training.model import lora
    from training.config import load_config
    from training.speakers.custom_voice import Voices
    from training.model.talker import TalkerForTraining

    config = load_config(REPO / "training/configs/tiny.yaml", [f"model.path={tiny_custom_voice_dir}",
                                                              "data.shards=unused", "lora.rank=4"])
    voices = Voices({"ryan": 3000}, {"ryan": False}, {"nova": 3001, "ryan": 3000}, {"nova": False, "ryan": False},
                    learned=True)
    assert lora.speaker_rows(config, voices) == [3000, 3001]  # a retrained built-in row trains too
    voices.learned = False  # model.speaker_encoder: x-vectors fill the rows at export
    assert lora.speaker_rows(config, voices) == []
    config.lora.train_heads = True  # the whole embedding trains: no trainable tokens
    assert lora.speaker_rows(config, Voices({}, {}, {"nova": 3001}, {"nova": False}, learned=True)) == []
    config.lora.train_heads = False

    module = TalkerForTraining(load_tts_model(tiny_custom_voice_dir).talker)
    assert "+ 1 speaker rows" in lora.apply(module, config, [3001])
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert f"talker.{SPEAKER_EMBEDDING}{ROWS_DELTA}" in trainable and all(lora.is_adapter(n) for n in trainable)
    parameters = dict(module.named_parameters())
    parameters[f"talker.{SPEAKER_EMBEDDING}{ROWS_DELTA}"].normal_()
    for name, param in parameters.items():
        if ".lora_B." in name:
            param.normal_()
    plain = load_tts_model(tiny_custom_voice_dir)
    targets = dict(plain.named_parameters())
    adapters = {n: p for n, p in parameters.items() if lora.is_adapter(n)}
    for name, param in parameters.items():
        if not lora.is_adapter(name):
            assert torch.equal(targets[lora.inference_name(name)], param)
    lora.merge_adapters(targets, adapters, module)
    ids = torch.tensor([[3000, 3001, 3002, 5]])
    assert torch.equal(plain.talker.get_input_embeddings()(ids), module.talker.get_input_embeddings()(ids))
    hidden = torch.randn(3, plain.talker.config.hidden_size)
    torch.testing.assert_close(plain.talker.codec_head(hidden), module.talker.codec_head(hidden), rtol=0, atol=1e-5)
