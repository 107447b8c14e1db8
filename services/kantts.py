"""Convert a KAN-TTS OpenDataset tree into the upstream raw manifest (JSONL: audio, text, ref_audio).

    python -m services.kantts --root opentts_data --output train_raw.jsonl [--ref-audio ref.wav] [--seed N]

Layout read: <root>/wav/NNNNNN.wav and <root>/prosody/prosody.txt, where each utterance is a line
`NNNNNN<TAB>text with #1..#4 break marks` followed by a pinyin line that starts with whitespace.
Lines that cannot be used (no wav, no id, empty text) are reported, not fatal: a large corpus with a
few broken entries should still convert, and the report says exactly what was dropped.
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
BREAK_MARK_RE = re.compile(r"#\d")
MAX_EXAMPLES = 5


@dataclass
class ConversionReport:
    rows: list[dict] = field(default_factory=list)
    missing_wavs: list[str] = field(default_factory=list)  # utterance ids
    unparsable: list[tuple[int, str]] = field(default_factory=list)  # (1-based line number, line)
    duplicates: list[str] = field(default_factory=list)  # utterance ids seen before


def clean_text(text: str) -> str:
    """Drop prosodic break marks (#1..#4) and `%`; collapse the whitespace they leave behind."""
    text = BREAK_MARK_RE.sub("", text).replace("%", "")
    return " ".join(text.split())


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


def pick_reference(wavs: list[Path], seed: int) -> Path:
    """Deterministic for a given set of wavs and seed, whatever order the filesystem lists them in."""
    return random.Random(seed).choice(sorted(wavs))


def convert(root: Path, ref_audio: Path | None = None, seed: int = 0) -> ConversionReport:
    root = root.resolve()
    prosody = root / PROSODY_FILE
    if not prosody.is_file():
        raise FileNotFoundError(f"{prosody} not found: is {root} a KAN-TTS OpenDataset root?")
    utterances, unparsable = parse_prosody(prosody)
    report = ConversionReport(unparsable=unparsable)
    seen, found = set(), []
    for utt_id, text, _ in utterances:
        if utt_id in seen:
            report.duplicates.append(utt_id)
            continue
        seen.add(utt_id)
        wav = root / WAV_DIR / f"{utt_id}.wav"
        if wav.is_file():
            found.append((wav, text))
        else:
            report.missing_wavs.append(utt_id)
    if not found:
        return report
    if ref_audio is None:
        ref = pick_reference([wav for wav, _ in found], seed)
    else:
        ref = ref_audio.resolve()
        if not ref.is_file():
            raise FileNotFoundError(f"reference audio {ref} not found")
    report.rows = [{"audio": str(wav), "text": text, "ref_audio": str(ref)} for wav, text in found]
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
        ("unparsable prosody line(s)", [f"line {n}: {line[:80]!r}" for n, line in report.unparsable]),
        ("duplicate utterance id(s), first kept", report.duplicates),
    ]
    for what, items in problems:
        if items:
            examples = ", ".join(items[:MAX_EXAMPLES]) + (", ..." if len(items) > MAX_EXAMPLES else "")
            print(f"kantts: skipped {len(items)} {what}: {examples}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path, help="KAN-TTS dataset root (holds wav/ and prosody/)")
    parser.add_argument("--output", required=True, type=Path, help="raw manifest to write (JSONL)")
    parser.add_argument("--ref-audio", type=Path, help="reference wav for every line (default: one dataset wav)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reference pick when --ref-audio is not given")
    args = parser.parse_args(argv)
    try:
        report = convert(args.root, args.ref_audio, args.seed)
    except (FileNotFoundError, OSError) as e:
        print(f"kantts: error: {e}", file=sys.stderr)
        return 2
    print_problems(report)
    if not report.rows:
        print(f"kantts: error: no usable utterance under {args.root} (nothing written)", file=sys.stderr)
        return 1
    write_jsonl(report.rows, args.output)
    print(f"kantts: wrote {len(report.rows)} rows to {args.output} (ref_audio {report.rows[0]['ref_audio']})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
