"""Proof that encode -> train -> export works end to end, for the demo: overfit one encoded utterance, then
generate it back greedily from the exported custom voice and compare the codes.

    python -m training.reproduce pick --shards demo/shards --output demo/one     # the shortest good row
    (train on demo/one, export it as a custom voice)
    python -m training.reproduce check --voice demo/one_voice --shards demo/one  # prints the share of codes equal

Tiny random weights cannot make speech; what they can do, once trained, is return exactly the codes they were
trained on, which only happens when the codes, the text, the loss alignment and the export all line up.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared import schema


def first_good_row(output: Path) -> schema.ShardRow:
    """The shortest good row (fewest frames; the first of those): the quickest to learn by heart."""
    best = None
    for path in schema.published_shards(output).values():
        for row in schema.read_rows(path):
            if row.ok and (best is None or row.num_frames < best.num_frames):
                best = row
    if best is None:
        raise SystemExit(f"error: {output} holds no good row; run the encode service on it first")
    return best


def pick(shards: Path, output: Path) -> schema.ShardRow:
    """Write the shortest good row of `shards` as a complete one-row encode output in `output`."""
    from dataclasses import replace

    from training.data.synthetic import write_shard

    row = replace(first_good_row(shards), index=0)
    write_shard(output, 0, [row])
    (output / schema.COMPLETE_MARKER).write_text("")
    return row


def check(voice: Path, shards: Path, speaker: str) -> float:
    """Greedy generation of the row's text with the voice; returns the share of (frame, codebook) codes equal to
    the trained ones (frames the generation lacks or adds count as different)."""
    import torch

    from shared.qwen import load_inference_model

    row = first_good_row(shards)
    expected = torch.from_numpy(row.codes)
    tts = load_inference_model(voice)
    speaker = (row.speaker or speaker).lower()  # the exported name of the row's speaker
    input_ids = tts._tokenize_texts([tts._build_assistant_text(row.text)])
    generated, _ = tts.model.generate(input_ids=input_ids, languages=["auto"], speakers=[speaker],
                                      non_streaming_mode=True, do_sample=False, subtalker_dosample=False,
                                      # greedy: the sampling temperatures are neutral, or transformers warns
                                      # that a sampling flag goes unused
                                      temperature=1.0, subtalker_temperature=1.0,
                                      repetition_penalty=1.0, max_new_tokens=len(expected) + 8)
    got = generated[0].cpu()
    frames = min(len(got), len(expected))
    equal = int((got[:frames] == expected[:frames]).sum())
    total = max(len(got), len(expected)) * expected.shape[1]
    print(f"greedy generation of {row.id!r} ({row.text!r}) from {voice}: {equal}/{total} codes equal to the "
          f"trained ones ({100.0 * equal / total:.1f}%), {len(got)} frames generated for {len(expected)} trained")
    return equal / total


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pick", help="write the shortest good row of --shards as its own one-row output")
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    c = sub.add_parser("check", help="generate the row back with the voice and compare codes")
    c.add_argument("--voice", type=Path, required=True)
    c.add_argument("--shards", type=Path, required=True)
    c.add_argument("--speaker", default="demo_voice", help="the voice's name for a row without `speaker`")
    c.add_argument("--min-share", type=float, default=0.0, help="exit 1 below this share of equal codes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "pick":
        row = pick(args.shards, args.output)
        print(f"picked {row.id!r} ({len(row.text)} characters of text, {row.num_frames} frames) into {args.output}")
        return 0
    return 0 if check(args.voice, args.shards, args.speaker) >= args.min_share else 1


if __name__ == "__main__":
    sys.exit(main())
