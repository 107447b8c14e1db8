"""Generated benchmark inputs, cached in the work directory under names that encode their parameters:
a speech-like corpus with its raw manifest, and random codecs of either size."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CORPUS_RATES = (16_000, 22_050, 24_000, 44_100, 48_000)
_DONE = ".complete"


def corpus(work_dir: Path, clips: int, min_seconds: float, max_seconds: float,
           rates: tuple[int, ...] = CORPUS_RATES, seed: int = 0) -> tuple[Path, float]:
    """`clips` wavs of uniform random length in [min, max] seconds, cycling through `rates`.

    Returns the raw manifest (audio, text, ref_audio; one reference for every line, as upstream recommends)
    and the total seconds of audio.
    """
    import soundfile as sf

    from shared.synth import synth_text, synth_utterance

    root = work_dir / f"corpus-{clips}x{min_seconds:g}-{max_seconds:g}s-{'_'.join(map(str, rates))}-seed{seed}"
    manifest = root / "raw.jsonl"
    if (root / _DONE).is_file():
        return manifest, float((root / _DONE).read_text())
    (root / "wav").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, total = [], 0.0
    for i in range(clips):
        seconds, rate = float(rng.uniform(min_seconds, max_seconds)), rates[i % len(rates)]
        path = root / "wav" / f"utt{i:05d}.wav"
        sf.write(path, synth_utterance(seconds, rate, seed * 1_000_003 + i), rate)
        entries.append({"id": f"utt{i:05d}", "audio": str(path), "text": synth_text(i)})
        total += int(seconds * rate) / rate
    with open(manifest, "w", encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps({**entry, "ref_audio": entries[0]["audio"]}, ensure_ascii=False) + "\n")
    (root / _DONE).write_text(repr(total))
    return manifest, total


def codec(work_dir: Path, size: str, seed: int = 0) -> Path:
    """A random Qwen3-TTS-Tokenizer-12Hz: "tiny" (tests) or "full" (released architecture and cost)."""
    from shared.tiny_codec import write_codec

    root = work_dir / f"codec-{size}-seed{seed}"
    done = root.with_name(root.name + _DONE)  # beside, not inside: the codec directory's hash is the plan's
    if not done.is_file():
        write_codec(root, size, seed)
        done.write_text("")
    return root
