"""Overfit one utterance, export it as a custom voice, and generate it back with generate_custom_voice."""
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import torch

from shared import schema
from shared.qwen import load_codec, load_inference_model
from training.data.synthetic import write_encoded

from tests.test_training_distributed import ENV, train_command


def test_overfit_one_utterance_exports_a_custom_voice_that_reproduces_it(tiny_dir, tmp_path):
    data = write_encoded(tmp_path / "one", tiny_dir / "codec", num_shards=1, rows_per_shard=2)  # 1 good, 1 error
    table = pq.read_table(schema.published_shards(data)[0])
    good = [i for i, e in enumerate(table.column("error").to_pylist()) if e is None]
    assert len(good) == 1
    codes = torch.from_numpy(schema.codes_of(table.column("audio_codes"), good[0]))
    text = table.column("text")[good[0]].as_py()

    run = tmp_path / "run"
    subprocess.run([sys.executable, *train_command(tiny_dir, data, run), "train.steps=80", "train.lr=5e-3",
                    "train.lr_schedule=constant", "train.warmup_steps=0", "train.weight_decay=0",
                    "checkpoint.interval=1000"], check=True, env=ENV, timeout=240, capture_output=True)
    voice = tmp_path / "voice"
    subprocess.run([sys.executable, "-m", "training.export", "--checkpoint", str(run / "step-000080"),
                    "--output", str(voice), "--speaker-name", "Overfit_Voice"], check=True, env=ENV, timeout=120,
                   capture_output=True)

    tts = load_inference_model(voice)
    assert tts.model.tts_model_type == "custom_voice" and tts.model.speaker_encoder is None
    assert tts.get_supported_speakers() == ["overfit_voice"]
    greedy = dict(do_sample=False, subtalker_dosample=False, repetition_penalty=1.0, max_new_tokens=len(codes) + 8)
    # The codes generate_custom_voice decodes: the same call it makes, through the loaded model.
    input_ids = tts._tokenize_texts([tts._build_assistant_text(text)])
    generated, _ = tts.model.generate(input_ids=input_ids, languages=["auto"], speakers=["overfit_voice"],
                                      non_streaming_mode=True, **greedy)
    assert torch.equal(generated[0].cpu(), codes)  # every codebook of every frame, and eos right after the last

    wavs, rate = tts.generate_custom_voice(text=text, speaker="Overfit_Voice", **greedy)
    expected, _ = load_codec(voice / "speech_tokenizer").decode([{"audio_codes": codes}])
    assert rate == 24000
    np.testing.assert_allclose(wavs[0], expected[0], atol=1e-5)
