"""`python -m shared.tiny_asr --output DIR`: a tiny random English-only Whisper that transformers' ASR pipeline
loads offline (model, feature extractor, tokenizer), for the CER/WER path of tests and the demo.

Its transcripts are random text: it proves the path runs (load, resample, transcribe, score), not that
speech is intelligible. The tokenizer is a byte-level BPE trained here with `tokenizers`, plus the special
tokens Whisper's generation looks for (<|startoftranscript|>, <|notimestamps|>, ...); the generation config
marks the model English-only, so no language detection runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

_CORPUS = ["the quick brown fox jumps over the lazy dog", "please call me back when you get this message",
           "hello world one two three four five"]
_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>",
             "<|nospeech|>", "<|notimestamps|>"]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    end = _SPECIALS[0]
    fast = WhisperTokenizerFast(tokenizer_object=tok, unk_token=end, bos_token=end, eos_token=end, pad_token=end)
    fast.add_special_tokens({"additional_special_tokens": _SPECIALS[1:]})
    return fast


def write_tiny_asr(output: str | Path, seed: int = 0) -> Path:
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor)

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _SPECIALS}
    end, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_target_positions=64, pad_token_id=end, bos_token_id=end,
                           eos_token_id=end, decoder_start_token_id=start, suppress_tokens=None,
                           begin_suppress_tokens=None)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start, eos_token_id=end, pad_token_id=end, bos_token_id=end,
        no_timestamps_token_id=ids["<|notimestamps|>"], is_multilingual=False, max_length=24)
    model.save_pretrained(out)
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer)
    processor.save_pretrained(out)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shared.tiny_asr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    print(f"wrote a tiny random Whisper to {write_tiny_asr(args.output, args.seed)}")


if __name__ == "__main__":
    main()
