"""The tiny random Base model: released special ids, a tokenizer that splits prompts like the released one, and
it loads and generates through the same adapters as real weights."""
import json

import numpy as np

from shared.qwen import load_inference_model, load_tts_model
from shared.tiny_model import TEXT_SPECIALS
from training.data.synthetic import tone


def test_config_keeps_the_released_special_ids(tiny_dir):
    config = json.loads((tiny_dir / "model" / "config.json").read_text())
    talker = config["talker_config"]
    assert talker["vocab_size"] == 3072 and talker["text_vocab_size"] == 151936
    assert (talker["codec_pad_id"], talker["codec_bos_id"], talker["codec_eos_token_id"]) == (2148, 2149, 2150)
    assert (talker["codec_nothink_id"], talker["codec_think_bos_id"], talker["codec_think_eos_id"]) == (2155, 2156, 2157)
    assert (config["tts_pad_token_id"], config["tts_bos_token_id"], config["tts_eos_token_id"]) == (151671, 151672, 151673)
    assert config["tts_model_type"] == "base"
    assert (tiny_dir / "model" / "speech_tokenizer" / "config.json").exists()


def test_loads_and_clones_a_voice(tiny_dir):
    model = load_tts_model(tiny_dir / "model")
    assert model.speaker_encoder is not None
    assert sum(p.numel() for p in model.parameters()) < 20_000_000  # tiny: fast tests on 2 cores
    tts = load_inference_model(tiny_dir / "model")
    tokenizer = tts.processor.tokenizer
    ids = tokenizer("<|im_start|>assistant\nhello world<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    assert ids[0] == TEXT_SPECIALS["<|im_start|>"] and ids[-3] == TEXT_SPECIALS["<|im_start|>"]
    assert ids[-5] == TEXT_SPECIALS["<|im_end|>"] and len(ids) == 3 + len(tokenizer("hello world")["input_ids"]) + 5
    wavs, rate = tts.generate_voice_clone(text="hello world", ref_audio=(tone(1.0, 3), 24000),
                                          x_vector_only_mode=True, max_new_tokens=8)
    assert rate == 24000 and len(wavs[0]) > 0 and np.isfinite(wavs[0]).all()


def test_custom_voice_model_speaks_with_its_built_in_speakers(tiny_custom_voice_dir):
    """Upstream generate_custom_voice reaches both built-in speakers (the dialect one through chinese and auto),
    each from its own row, and takes an instruct text."""
    from shared.tiny_model import CUSTOM_VOICE_SPEAKERS

    tts = load_inference_model(tiny_custom_voice_dir)
    assert tts.model.tts_model_type == "custom_voice" and tts.model.speaker_encoder is None
    assert sorted(tts.get_supported_speakers()) == sorted(CUSTOM_VOICE_SPEAKERS)
    assert not [lang for lang in tts.get_supported_languages() if "dialect" in lang]  # dialects: speakers only
    talker = tts.model.config.talker_config
    assert talker.spk_is_dialect == {"ryan": False, "eric": "sichuan_dialect"}
    rows = tts.model.talker.get_input_embeddings().weight
    assert not np.allclose(rows[talker.spk_id["ryan"]].detach(), rows[talker.spk_id["eric"]].detach())
    greedy = dict(do_sample=False, subtalker_dosample=False, max_new_tokens=6)
    for speaker, language in (("Ryan", "english"), ("eric", "chinese"), ("eric", "auto")):
        wavs, rate = tts.generate_custom_voice("hello world", speaker=speaker, language=language, **greedy)
        assert rate == 24000 and len(wavs[0]) > 0 and np.isfinite(wavs[0]).all()
    wavs, _ = tts.generate_custom_voice("hello world", speaker="ryan", instruct="speak slowly", **greedy)
    assert len(wavs[0]) > 0
