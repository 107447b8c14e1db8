"""The 0.6B-Base shape (text hidden larger than talker hidden, where upstream's training crashes because it skips
text_projection): train on one utterance, export a custom voice, generate the trained codes back."""
import json
import subprocess
import sys

import pytest
import soundfile as sf
import torch

from shared import schema
from shared.qwen import load_inference_model, load_tts_model
from training.data.synthetic import tone, write_utterances

from tests.test_training_distributed import ENV, REPO

STEPS = 80


@pytest.fixture(scope="module")
def tiny_0p6b_dir(tmp_path_factory):
    from shared.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny_0p6b"), seed=0, shape="0.6b")


def test_0p6b_shape_trains_exports_and_generates_its_codes(tiny_0p6b_dir, tmp_path):
    model = load_tts_model(tiny_0p6b_dir / "model")
    talker = model.config.talker_config
    assert talker.text_hidden_size > talker.hidden_size  # the 0.6B form: text_projection narrows the text channel
    del model

    clip = tone(0.6, 7)
    sf.write(tmp_path / "utt.wav", clip, 24000)
    sf.write(tmp_path / "ref.wav", tone(1.5, 8, 16000), 16000)
    entry = {"id": "utt", "audio": str(tmp_path / "utt.wav"), "text": "hello world", "ref_audio": str(tmp_path / "ref.wav")}
    data = write_utterances(tmp_path / "encoded", tiny_0p6b_dir / "codec", [entry], [clip])
    codes = torch.from_numpy(schema.read_rows(schema.published_shards(data)[0])[0].codes)

    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "training.train", "--config", str(REPO / "training/configs/tiny.yaml"),
                    f"model.path={tiny_0p6b_dir / 'model'}", f"data.shards={data}", f"checkpoint.dir={run}",
                    f"train.steps={STEPS}", "train.lr=5e-3", "train.lr_schedule=constant", "train.warmup_steps=0",
                    "train.weight_decay=0", "checkpoint.interval=1000"], check=True, env=ENV, timeout=300,
                   capture_output=True)
    voice = tmp_path / "voice"
    subprocess.run([sys.executable, "-m", "training.export", "--checkpoint", str(run / f"step-{STEPS:06d}"),
                    "--output", str(voice), "--speaker-name", "small"], check=True, env=ENV, timeout=120,
                   capture_output=True)

    config = json.loads((voice / "config.json").read_text())
    assert config["tts_model_size"] == "0b6" and config["talker_config"]["spk_id"] == {"small": 3000}
    tts = load_inference_model(voice)
    input_ids = tts._tokenize_texts([tts._build_assistant_text("hello world")])
    generated, _ = tts.model.generate(input_ids=input_ids, languages=["auto"], speakers=["small"],
                                      non_streaming_mode=True, do_sample=False, subtalker_dosample=False,
                                      repetition_penalty=1.0, max_new_tokens=len(codes) + 8)
    assert torch.equal(generated[0].cpu(), codes)
    wavs, rate = tts.generate_custom_voice(text="hello world", speaker="small", max_new_tokens=len(codes) + 8)
    assert rate == 24000 and len(wavs[0]) > 0
