"""A Qwen3-TTS-12Hz-1.7B-Base-shaped model with random weights (no weights can be downloaded here), and the
parameter counts training FLOPs are estimated from.

Sizes from the released config (notes §3): talker hidden 2048, 28 layers, 16 heads / 8 KV heads, head_dim 128,
MLP 6144 (28 x 50.3 M = 1.41 B in the talker layers), rope_theta 1e6, interleaved MRoPE [24, 20, 20]; code
predictor 5 layers of hidden 1024 (qwen_tts's defaults are the 1.7B values); speaker encoder with enc_dim 2048.
About 1.93 B parameters in all. The ids are shared.tiny_model's, which are the released ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.qwen import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration, save_model_dir
from shared.tiny_model import GENERATION, TALKER, TEXT_VOCAB_SIZE, copy_codec, write_text_tokenizer

HIDDEN = 2048
TALKER_1P7B = dict(
    TALKER, hidden_size=HIDDEN, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, text_hidden_size=HIDDEN,
    text_vocab_size=TEXT_VOCAB_SIZE,
    rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "interleaved": True},
)
CODE_PREDICTOR_1P7B = dict(vocab_size=2048, hidden_size=1024, intermediate_size=3072, num_hidden_layers=5,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000,
                           num_code_groups=16)
SPEAKER_ENCODER_1P7B = dict(enc_dim=HIDDEN, sample_rate=24000)  # other ECAPA sizes: qwen_tts defaults


def config_1p7b(layers: int = 28) -> Qwen3TTSConfig:
    """`layers` below 28 keeps every width (and the 151936 x 2048 text embedding) but fewer talker layers:
    only for trying the full-size path on a small machine."""
    talker = dict(TALKER_1P7B, num_hidden_layers=layers, code_predictor_config=dict(CODE_PREDICTOR_1P7B))
    return Qwen3TTSConfig(talker_config=talker, speaker_encoder_config=dict(SPEAKER_ENCODER_1P7B),
                          tokenizer_type="qwen3_tts_tokenizer_12hz", tts_model_size="1b7", tts_model_type="base")


def write_model_1p7b(output: Path, codec_dir: Path, layers: int = 28, seed: int = 0) -> Path:
    """A loadable model directory (bf16 weights: half the bytes to write and read; training loads fp32)."""
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 1.9 B parameters: build them in half the memory
    try:
        model = Qwen3TTSForConditionalGeneration(config_1p7b(layers)).eval()
    finally:
        torch.set_default_dtype(previous)
    save_model_dir(model, output)
    (output / "generation_config.json").write_text(json.dumps(GENERATION, indent=2))
    write_text_tokenizer(output)
    copy_codec(codec_dir, output)
    return output


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flop_parameters(config: Qwen3TTSConfig) -> dict:
    """Parameter counts of the trained module (the talker), built on the meta device (no memory).

    talker_per_position: what every talker position multiplies through (layers, final norm, codec head, text
    projection); cp_per_position: what each of the code predictor's 16 positions per frame multiplies through;
    cp_heads: its 15 heads, each applied once per frame. Embedding tables are lookups, not matmuls.
    """
    with torch.device("meta"):
        talker = Qwen3TTSForConditionalGeneration(config).talker
    cp = talker.code_predictor
    embeddings = (_count(talker.model.get_input_embeddings()) + _count(talker.model.get_text_embeddings())
                  + _count(cp.model.get_input_embeddings()))
    talker_per_position = (_count(talker.model.layers) + _count(talker.model.norm) + _count(talker.codec_head)
                           + _count(talker.text_projection))
    cp_per_position = _count(cp.model.layers) + _count(cp.model.norm) + _count(cp.small_to_mtp_projection)
    cp_heads = _count(cp.lm_head)
    return {"total": _count(talker), "embeddings": embeddings, "non_embedding": _count(talker) - embeddings,
            "talker_per_position": talker_per_position, "cp_per_position": cp_per_position, "cp_heads": cp_heads}


def training_flops_per_frame(params: dict) -> dict:
    """Two estimates of training FLOPs per audio frame (forward + backward = 6 x multiply-adds per parameter):

    "6N": 6 x non-embedding parameters per frame, the usual LLM rule with one token per frame;
    "per_position": one talker position per frame plus the code predictor's 16 positions and 15 heads per
    frame. Text positions and padding are not counted in either, so both understate the work done.
    """
    return {"6N": 6 * params["non_embedding"],
            "per_position": 6 * (params["talker_per_position"] + 16 * params["cp_per_position"] + params["cp_heads"])}
