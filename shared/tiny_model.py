"""A tiny random Qwen3-TTS Base model directory for tests and the demo.

It keeps every id of the released checkpoints (talker vocab 3072 with codec pad 2148, bos 2149, eos 2150, ...;
text vocab 151936 with <|im_start|> 151644 and the tts pad/bos/eos 151671..151673) so the same code paths
run on it as on real weights; only widths and depths shrink. The text embedding is the largest tensor
(151936 x TEXT_HIDDEN), hence a very small text width.

Two shapes: "1.7b" (the default; text width at most the talker's, as in 1.7B where both are 2048) and "0.6b"
(text width larger than the talker's, as in 0.6B: text 2048, talker 1024, so `text_projection` changes the
width and a forward that skips it cannot even run).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from shared.qwen import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration, save_model_dir

TEXT_VOCAB_SIZE = 151936
TEXT_HIDDEN = 32
HIDDEN = 64
# shape -> (text hidden, talker hidden, code-predictor hidden)
SHAPES = {"1.7b": (TEXT_HIDDEN, HIDDEN, 32), "0.6b": (64, 32, 32)}

# Special text tokens at the ids the released tokenizer gives them.
TEXT_SPECIALS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|tts_pad|>": 151671,
    "<|tts_text_bos|>": 151672,
    "<|tts_text_eod|>": 151673,
}

TALKER = dict(
    vocab_size=3072, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-6,
    rope_theta=1_000_000, rope_scaling={"rope_type": "default", "mrope_section": [3, 3, 2], "interleaved": True},
    num_code_groups=16, text_hidden_size=TEXT_HIDDEN, text_vocab_size=TEXT_VOCAB_SIZE,
    codec_pad_id=2148, codec_bos_id=2149, codec_eos_token_id=2150, codec_think_id=2154, codec_nothink_id=2155,
    codec_think_bos_id=2156, codec_think_eos_id=2157,
    codec_language_id={"english": 2050, "chinese": 2055}, spk_id={}, spk_is_dialect={},
)
# The code predictor is narrower than the talker (as in 1.7B), so small_to_mtp_projection is exercised.
CODE_PREDICTOR = dict(
    vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, max_position_embeddings=64, rope_theta=1_000_000, num_code_groups=16,
)
SPEAKER_ENCODER = dict(
    mel_dim=128, enc_dim=HIDDEN, enc_channels=[32, 32, 32, 32, 96], enc_kernel_sizes=[5, 3, 3, 3, 1],
    enc_dilations=[1, 2, 3, 4, 1], enc_attention_channels=16, enc_res2net_scale=4, enc_se_channels=16,
    sample_rate=24000,
)
# A random model rarely emits eos, so generation is capped low to keep tests fast.
GENERATION = dict(do_sample=True, top_k=50, top_p=1.0, temperature=0.9, repetition_penalty=1.05,
                  subtalker_dosample=True, subtalker_top_k=50, subtalker_top_p=1.0, subtalker_temperature=0.9,
                  max_new_tokens=48)

_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TOKENIZER_CORPUS = [
    "assistant", "user", "system", "hello world", "the quick brown fox jumps over the lazy dog",
    "speech synthesis with a tiny model", "one two three four five six seven eight nine ten",
]


# The tiny CustomVoice model's built-in speakers: name -> (codec-embedding row, dialect key or False). Their rows
# leave 3001 and 3002 free between them, so new speakers must be placed around the built-in ones; one of them is
# a dialect speaker, reachable with language chinese or auto only (as in the released CustomVoice checkpoints).
CUSTOM_VOICE_SPEAKERS = {"ryan": (3000, False), "eric": (3003, "sichuan_dialect")}
# Dialect ids exist in the CustomVoice vocabulary only; no language list offers them to a user.
CUSTOM_VOICE_DIALECTS = {"sichuan_dialect": 2062, "beijing_dialect": 2074}


def tiny_config(shape: str = "1.7b", model_type: str = "base") -> Qwen3TTSConfig:
    if shape not in SHAPES:
        raise ValueError(f"tiny model shape {shape!r}: choose one of {', '.join(SHAPES)}")
    text_hidden, hidden, predictor_hidden = SHAPES[shape]
    talker = dict(TALKER, hidden_size=hidden, text_hidden_size=text_hidden,
                  code_predictor_config=dict(CODE_PREDICTOR, hidden_size=predictor_hidden))
    if model_type == "custom_voice":
        talker.update(codec_language_id={**TALKER["codec_language_id"], **CUSTOM_VOICE_DIALECTS},
                      spk_id={name: row for name, (row, _) in CUSTOM_VOICE_SPEAKERS.items()},
                      spk_is_dialect={name: dialect for name, (_, dialect) in CUSTOM_VOICE_SPEAKERS.items()})
    return Qwen3TTSConfig(talker_config=talker, speaker_encoder_config=dict(SPEAKER_ENCODER, enc_dim=hidden),
                          tokenizer_type="qwen3_tts_tokenizer_12hz",
                          tts_model_size="0b6" if shape == "0.6b" else "tiny",  # "0b6": the released 0.6B's value
                          tts_model_type=model_type)


def spread_speaker_encoder(encoder, seed: int = 0, clips: int = 8) -> None:
    """Make a random speaker encoder tell voices apart, as a trained one does.

    Random ECAPA weights map any two speech clips to nearly the same x-vector (cosine ~0.99, norm ~0.3): every
    log-mel shares a large common part that dominates the pooled statistics. Here the final layer is redrawn
    to project the statistics' deviation from their mean over generated speech clips, scaled to unit spread per
    dimension: distinct voices then give clearly distinct vectors (cosines well below 0.9). Tests of several
    speakers need this; nothing else about the encoder changes.
    """
    from shared.qwen import speaker_mel
    from shared.synth import synth_utterance

    pooled = []
    hook = encoder.fc.register_forward_hook(lambda module, inputs, output: pooled.append(inputs[0][0, :, 0]))
    with torch.no_grad():
        for i in range(clips):
            encoder(speaker_mel(synth_utterance(1.0, 24_000, seed * 1000 + i)).unsqueeze(0))
    hook.remove()
    stats = torch.stack(pooled)
    center = stats.mean(0)
    spread = (stats - center).norm(dim=1).mean().clamp_min(1e-6)
    weight = torch.randn(encoder.fc.out_channels, encoder.fc.in_channels,
                         generator=torch.Generator().manual_seed(seed)) / spread
    with torch.no_grad():
        encoder.fc.weight.copy_(weight.unsqueeze(-1))
        encoder.fc.bias.copy_(-weight @ center)


def write_text_tokenizer(output: Path) -> None:
    """A byte-level BPE Qwen2TokenizerFast whose specials sit at the released ids.

    The BPE vocabulary is tiny (bytes plus a few merges); the specials are placed into the model vocabulary at
    their fixed ids and then registered as special added tokens (added tokens alone would get the next free ids).
    "assistant" must be one token and "\\n" another, as in the released tokenizer: inference slices the
    prompt by position ([:3] role, [3:-5] text).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    # The released pre-tokenizer layout (a regex Split, then ByteLevel): transformers patches element [0] on load.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_TOKENIZER_CORPUS * 50, trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    # The released vocabulary merges "\n\n" into one token, so a text that starts with a newline changes the
    # prompt's third token (inference's role ids are each prompt's own first three tokens).
    vocab["ĊĊ"] = len(vocab)
    spec["model"]["merges"].append(["Ċ", "Ċ"])
    # Fill every id up to the last special with unreachable placeholders: serialising a vocabulary with
    # holes prints one warning line per missing id.
    taken = set(vocab.values()) | set(TEXT_SPECIALS.values())
    vocab.update({f"<|reserved_{i}|>": i for i in range(max(TEXT_SPECIALS.values())) if i not in taken})
    vocab.update(TEXT_SPECIALS)
    spec["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True} for t, i in TEXT_SPECIALS.items()
    ]
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = Qwen2TokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, additional_special_tokens=[t for t in TEXT_SPECIALS if t not in
                                                                         ("<|im_end|>", "<|endoftext|>")])
    ids = fast("<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    if ids[0] != TEXT_SPECIALS["<|im_start|>"] or len(ids) != 3 + len(fast("hello")["input_ids"]) + 5:
        raise RuntimeError(f"tiny tokenizer does not split the assistant prompt like the released one: {ids}")
    if len(fast("\n\n")["input_ids"]) != 1:
        raise RuntimeError("tiny tokenizer does not merge a double newline like the released one")
    # legacy_format=False: tokenizer.json only (a vocab.json would complain about the id gaps).
    fast.save_pretrained(output, legacy_format=False)


def write_model(output_dir: str | Path, codec_dir: str | Path, seed: int = 0, shape: str = "1.7b",
                distinct_speakers: bool = False, model_type: str = "base") -> Path:
    """Write a loadable tiny random model (weights, configs, tokenizer, speech_tokenizer/) to output_dir.
    `distinct_speakers`: a speaker encoder whose x-vectors differ between voices (spread_speaker_encoder).
    `model_type` "custom_voice": no speaker encoder, the built-in speakers of CUSTOM_VOICE_SPEAKERS (their rows
    drawn like every codec row, so each speaker has its own)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Qwen3TTSForConditionalGeneration(tiny_config(shape, model_type)).eval()
    # Default init uses std 0.02: widen the codec embeddings so random generation is not one repeated code.
    with torch.no_grad():
        model.talker.model.codec_embedding.weight.normal_(0.0, 1.0)
        for emb in model.talker.code_predictor.model.codec_embedding:
            emb.weight.normal_(0.0, 1.0)
    if distinct_speakers and model.speaker_encoder is not None:
        spread_speaker_encoder(model.speaker_encoder, seed)
    save_model_dir(model, out)
    (out / "generation_config.json").write_text(json.dumps(GENERATION, indent=2))
    write_text_tokenizer(out)
    copy_codec(codec_dir, out)
    return out


def copy_codec(codec_dir: str | Path, model_dir: Path) -> None:
    target = model_dir / "speech_tokenizer"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(codec_dir, target)
