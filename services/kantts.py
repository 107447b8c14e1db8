"""Convert KAN-TTS OpenDataset trees into the upstream raw manifest (JSONL: audio, text, ref_audio[, speaker]).

    python -m services.kantts --root opentts_data --output train_raw.jsonl [--ref-audio ref.wav] [--seed N]
    python -m services.kantts --root speakers_root --output train_raw.jsonl [--ref-audio NAME=ref.wav ...] [--seed N]

One speaker: <root>/wav/NNNNNN.wav and <root>/prosody/prosody.txt; every line gets the same reference.
Several speakers: <root>/<speaker>/wav/ and <root>/<speaker>/prosody/prosody.txt for each speaker directory;
lines carry `speaker` (the directory name) and an `id` of <speaker>-<utterance id>, and each speaker gets its
own reference (--ref-audio NAME=PATH, else a pick among its wavs that depends only on --seed and the files).

prosody.txt holds two lines per utterance: `NNNNNN<TAB>marked text`, then a pinyin line that starts with
whitespace (skipped). Every KAN-TTS prosody mark is removed from the text: breaks #0..#4, part-of-speech marks
|1..|9, phrase tones %L / %H, the `*` that may lead a mark or the text. Lines that cannot be used (no wav, no
id, empty text) are reported, not fatal: a large corpus with a few broken entries should still convert, and
the report says exactly what was dropped.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

WAV_DIR = "wav"
PROSODY_FILE = Path("prosody") / "prosody.txt"

UTTERANCE_RE = re.compile(r"^(\d+)\t(.*)$")
# A break (#0..#4), a part-of-speech mark (|1..|9) or a phrase tone (%L, %H), each optionally led by `*`.
PROSODY_MARK_RE = re.compile(r"\*?(?:#\d|\|\d|%[LH])")
MAX_EXAMPLES = 5


@dataclass
class ConversionReport:
    rows: list[dict] = field(default_factory=list)
    missing_wavs: list[str] = field(default_factory=list)  # utterance ids (<speaker>/<id> with several speakers)
    unparsable: list[tuple[str, int, str]] = field(default_factory=list)  # (prosody file, line number, line)
    duplicates: list[str] = field(default_factory=list)  # utterance ids seen before
    references: dict[str | None, str] = field(default_factory=dict)  # speaker (None: single tree) -> reference


def clean_text(text: str) -> str:
    """Drop every prosody mark and stray `%`/leading `*`; collapse the whitespace they leave behind."""
    text = PROSODY_MARK_RE.sub("", text).replace("%", "")
    return " ".join(text.split()).lstrip("*").strip()


def parse_prosody(path: Path) -> tuple[list[tuple[str, str, int]], list[tuple[int, str]]]:
    """Return ([(utterance id, cleaned text, line number)], [(line number, unparsable line)])."""
    utterances, unparsable = [], []
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip() or line[0].isspace():
                continue  # blank, or the pinyin line of the previous utterance
            match = UTTERANCE_RE.match(line)
            text = clean_text(match.group(2)) if match else ""
            if not text:
                unparsable.append((lineno, line))
                continue
            utterances.append((match.group(1), text, lineno))
    return utterances, unparsable


def pick_reference(wavs: list[Path], seed: int | str) -> Path:
    """Deterministic for a given set of wavs and seed, whatever order the filesystem lists them in."""
    return random.Random(seed).choice(sorted(wavs))


def speaker_dirs(root: Path) -> list[Path]:
    """The speaker trees under a multi-speaker root (directories holding prosody/prosody.txt), by name."""
    return sorted(d for d in root.iterdir() if d.is_dir() and (d / PROSODY_FILE).is_file())


def _read_tree(tree: Path, report: ConversionReport, label: str = "") -> list[tuple[Path, str, str]]:
    """(wav, text, utterance id) of every usable utterance of one tree; problems go to the report."""
    utterances, unparsable = parse_prosody(tree / PROSODY_FILE)
    report.unparsable.extend((str(tree / PROSODY_FILE), n, line) for n, line in unparsable)
    seen, found = set(), []
    for utt_id, text, _ in utterances:
        if utt_id in seen:
            report.duplicates.append(label + utt_id)
            continue
        seen.add(utt_id)
        wav = tree / WAV_DIR / f"{utt_id}.wav"
        if wav.is_file():
            found.append((wav, text, utt_id))
        else:
            report.missing_wavs.append(label + utt_id)
    return found


def _reference(given: Path | None, wavs: list[Path], seed: int | str, what: str) -> str:
    if given is None:
        return str(pick_reference(wavs, seed))
    ref = given.resolve()
    if not ref.is_file():
        raise FileNotFoundError(f"reference audio {ref} ({what}) not found")
    return str(ref)


def convert(root: Path, ref_audio: Path | dict[str, Path] | None = None, seed: int = 0) -> ConversionReport:
    """`ref_audio`: one path (a single-speaker tree) or speaker name -> path (a multi-speaker root)."""
    root = root.resolve()
    report = ConversionReport()
    if (root / PROSODY_FILE).is_file():
        if isinstance(ref_audio, dict):
            raise ValueError(f"{root} is a single-speaker tree: give --ref-audio PATH, not NAME=PATH")
        found = _read_tree(root, report)
        if found:
            ref = _reference(ref_audio, [wav for wav, _, _ in found], seed, "--ref-audio")
            report.references[None] = ref
            report.rows = [{"audio": str(wav), "text": text, "ref_audio": ref} for wav, text, _ in found]
        return report
    trees = speaker_dirs(root) if root.is_dir() else []
    if not trees:
        raise FileNotFoundError(f"{root / PROSODY_FILE} not found, nor any <speaker>/{PROSODY_FILE} under {root}: "
                                "is it a KAN-TTS OpenDataset root?")
    if ref_audio is not None and not isinstance(ref_audio, dict):
        raise ValueError(f"{root} holds {len(trees)} speakers: give each its reference as --ref-audio NAME=PATH "
                         "(or none, to pick one of its wavs)")
    given = dict(ref_audio or {})
    unknown = sorted(set(given) - {t.name for t in trees})
    if unknown:
        raise ValueError(f"--ref-audio names unknown speaker(s) {', '.join(unknown)}; speakers under {root}: "
                         f"{', '.join(t.name for t in trees)}")
    for tree in trees:
        speaker = tree.name
        found = _read_tree(tree, report, f"{speaker}/")
        if not found:
            continue
        ref = _reference(given.get(speaker), [wav for wav, _, _ in found], f"{seed}/{speaker}",
                         f"--ref-audio {speaker}=...")
        report.references[speaker] = ref
        report.rows.extend({"id": f"{speaker}-{utt_id}", "audio": str(wav), "text": text, "ref_audio": ref,
                            "speaker": speaker} for wav, text, utt_id in found)
    return report


def write_jsonl(rows: list[dict], output: Path) -> None:
    """Write under a temporary name then rename, so a crash never leaves a truncated manifest."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, output)


def print_problems(report: ConversionReport, out=sys.stderr) -> None:
    problems = [
        ("utterance(s) without a wav", report.missing_wavs),
        ("unparsable prosody line(s)", [f"{path} line {n}: {line[:80]!r}" for path, n, line in report.unparsable]),
        ("duplicate utterance id(s), first kept", report.duplicates),
    ]
    for what, items in problems:
        if items:
            examples = ", ".join(items[:MAX_EXAMPLES]) + (", ..." if len(items) > MAX_EXAMPLES else "")
            print(f"kantts: skipped {len(items)} {what}: {examples}", file=out)


def parse_ref_audio(values: list[str]) -> Path | dict[str, Path] | None:
    """--ref-audio PATH (one speaker) or --ref-audio NAME=PATH, repeated (several speakers)."""
    if not values:
        return None
    named = [v for v in values if "=" in v]
    if not named and len(values) == 1:
        return Path(values[0])
    if len(named) != len(values):
        raise ValueError("--ref-audio: give one PATH, or NAME=PATH for each speaker, not both")
    return {name: Path(path) for name, path in (v.split("=", 1) for v in values)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.kantts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path,
                        help="KAN-TTS dataset root (wav/ and prosody/, or one such tree per speaker directory)")
    parser.add_argument("--output", required=True, type=Path, help="raw manifest to write (JSONL)")
    parser.add_argument("--ref-audio", action="append", default=[], metavar="[NAME=]PATH",
                        help="reference wav: PATH for a single-speaker tree, NAME=PATH per speaker (repeat); "
                             "default: one of the speaker's own wavs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reference pick when --ref-audio is not given")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = convert(args.root, parse_ref_audio(args.ref_audio), args.seed)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"kantts: error: {e}", file=sys.stderr)
        return 2
    print_problems(report)
    if not report.rows:
        print(f"kantts: error: no usable utterance under {args.root} (nothing written)", file=sys.stderr)
        return 1
    write_jsonl(report.rows, args.output)
    refs = ", ".join(f"{speaker}: {ref}" if speaker else ref for speaker, ref in report.references.items())
    print(f"kantts: wrote {len(report.rows)} rows to {args.output} (ref_audio {refs})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
