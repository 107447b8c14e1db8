"""`python -m shared.tiny --output DIR`: a complete tiny random codec (DIR/codec) and Base model (DIR/model,
with speech_tokenizer/ and a text tokenizer) that load through the same from_pretrained path as real weights."""
from __future__ import annotations

import argparse
from pathlib import Path

from shared.tiny_codec import write_codec


def write_tiny(output: str | Path, seed: int = 0) -> Path:
    from shared.tiny_model import write_model

    out = Path(output)
    codec_dir = write_codec(out / "codec", "tiny", seed)
    write_model(out / "model", codec_dir, seed)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True, help="directory to write codec/ and model/ into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_tiny(args.output, args.seed)
    print(f"wrote tiny codec to {out / 'codec'} and tiny model to {out / 'model'}")


if __name__ == "__main__":
    main()
