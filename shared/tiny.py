"""`python -m shared.tiny --output DIR`: a complete tiny random codec (DIR/codec) and Base model (DIR/model,
with speech_tokenizer/ and a text tokenizer) that load through the same from_pretrained path as real weights, and
a tiny CustomVoice model (DIR/custom_voice: built-in speakers, one of them a dialect speaker, no speaker encoder)."""
from __future__ import annotations

import argparse
from pathlib import Path

from shared.tiny_codec import write_codec


def write_tiny(output: str | Path, seed: int = 0, shape: str = "1.7b", distinct_speakers: bool = False,
               custom_voice: bool = False) -> Path:
    from shared.tiny_model import write_model

    out = Path(output)
    codec_dir = write_codec(out / "codec", "tiny", seed)
    write_model(out / "model", codec_dir, seed, shape, distinct_speakers)
    if custom_voice:
        write_custom_voice(out, seed, shape)
    return out


def write_custom_voice(tiny: str | Path, seed: int = 0, shape: str = "1.7b") -> Path:
    """TINY/custom_voice: a CustomVoice model of the same size as TINY/model, sharing its codec."""
    from shared.tiny_model import write_model

    tiny = Path(tiny)
    return write_model(tiny / "custom_voice", tiny / "codec", seed, shape, model_type="custom_voice")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shared.tiny", description=__doc__)
    parser.add_argument("--output", required=True, help="directory to write codec/ and model/ into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", default="1.7b", choices=["1.7b", "0.6b"],
                        help="0.6b: text width larger than the talker's, as in Qwen3-TTS-12Hz-0.6B-Base")
    parser.add_argument("--distinct-speakers", action="store_true",
                        help="a speaker encoder whose x-vectors tell voices apart (several speakers)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = write_tiny(args.output, args.seed, args.shape, args.distinct_speakers, custom_voice=True)
    print(f"wrote tiny codec to {out / 'codec'}, tiny Base model to {out / 'model'} and tiny CustomVoice model "
          f"to {out / 'custom_voice'}")


if __name__ == "__main__":
    main()
