"""A tiny random Qwen3-TTS-Tokenizer-12Hz with the real frame geometry (24 kHz, 1920 samples/frame,
16 of 32 codebooks of 2048), for tests and the demo. Also builds the released-size architecture with
random weights for benchmarks (`size="full"`): same compute cost as the real codec."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.qwen import Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model

FEATURE_EXTRACTOR = {
    "chunk_length_s": None, "feature_extractor_type": "EncodecFeatureExtractor", "feature_size": 1,
    "overlap": None, "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True,
    "sampling_rate": 24000,
}

# Geometry both sizes share: what makes 24 kHz -> 12.5 frames/s and 16 x 2048 codes.
_GEOMETRY = dict(sampling_rate=24000, upsampling_ratios=[8, 6, 5, 4], frame_rate=12.5, codebook_size=2048,
                 num_quantizers=32, num_semantic_quantizers=1, compress=2)

TINY_ENCODER = dict(hidden_size=32, num_filters=4, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=16, intermediate_size=64, codebook_dim=16,
                    vector_quantization_hidden_dimension=16, upsample_groups=32, **_GEOMETRY)
TINY_DECODER = dict(codebook_size=2048, hidden_size=32, latent_dim=32, num_attention_heads=2, num_key_value_heads=2,
                    intermediate_size=64, num_hidden_layers=1, num_quantizers=16, decoder_dim=32,
                    upsample_rates=[8, 5, 4, 3], upsampling_ratios=[2, 2], codebook_dim=16)
# Released Qwen3-TTS-Tokenizer-12Hz sizes (Mimi-sized encoder, 8-layer decoder).
FULL_ENCODER = dict(hidden_size=512, num_filters=64, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8, head_dim=64, intermediate_size=2048, codebook_dim=256,
                    vector_quantization_hidden_dimension=256, upsample_groups=512, **_GEOMETRY)
FULL_DECODER = dict(codebook_size=2048, hidden_size=512, latent_dim=1024, num_attention_heads=16,
                    num_key_value_heads=16, intermediate_size=1024, num_hidden_layers=8, num_quantizers=16,
                    decoder_dim=1536, upsample_rates=[8, 5, 4, 3], upsampling_ratios=[2, 2], codebook_dim=512)


def build_codec(size: str = "tiny", seed: int = 0) -> Qwen3TTSTokenizerV2Model:
    encoder, decoder = (TINY_ENCODER, TINY_DECODER) if size == "tiny" else (FULL_ENCODER, FULL_DECODER)
    config = Qwen3TTSTokenizerV2Config(encoder_config=dict(encoder), decoder_config=dict(decoder),
                                       encoder_valid_num_quantizers=16)
    torch.manual_seed(seed)
    model = Qwen3TTSTokenizerV2Model(config).eval()
    # Random init leaves every codebook at zero: the encoder would emit only code 0 and the decoder
    # only silence. Give the encoder's codebooks (buffers) and the decoder's (parameters) random centroids.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith(("embed_sum", "embedding_sum")):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
            elif name.endswith("cluster_usage"):
                tensor.fill_(1.0)
    return model


def write_codec(output: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    build_codec(size, seed).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(FEATURE_EXTRACTOR, indent=2))
    return out
