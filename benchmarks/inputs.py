"""Generated benchmark inputs, cached in the work directory under names that encode their parameters:
a speech-like corpus with its raw manifest, random codecs of either size, and training shards of random codes."""
from __future__ import annotations

import json
from dataclasses import dataclass
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


def tiny_model(work_dir: Path, seed: int = 0) -> Path:
    """shared.tiny's random Base model (with its speech_tokenizer/), as the tests and the demo use it."""
    from shared.tiny import write_tiny

    root = work_dir / f"tiny-seed{seed}"
    done = root.with_name(root.name + _DONE)
    if not done.is_file():
        write_tiny(root, seed)
        done.write_text("")
    return root / "model"


def model_1p7b(work_dir: Path, layers: int = 28, seed: int = 0) -> Path:
    from benchmarks.model_1p7b import write_model_1p7b

    root = work_dir / f"model-1p7b-{layers}layers-seed{seed}"
    done = root.with_name(root.name + _DONE)
    if not done.is_file():
        write_model_1p7b(root, codec(work_dir, "tiny", seed), layers, seed)
        done.write_text("")
    return root


_WORDS = "the quick brown fox jumps over a lazy dog while speech synthesis models learn from data".split()


@dataclass(frozen=True)
class LengthMix:
    """Utterance durations and text lengths of generated training shards: seconds uniform in [low, high], or,
    with `median`, lognormal around it (sigma 0.6, the spread of a read-speech corpus) clipped to [low, high];
    words per text uniform in [min_words, max_words]."""
    low: float
    high: float
    min_words: int
    max_words: int
    median: float | None = None

    @property
    def tag(self) -> str:
        """The part of the cache directory's name that tells mixes apart."""
        shape = f"lognormal{self.median:g}" if self.median is not None else "uniform"
        return f"{shape}-{self.low:g}-{self.high:g}s-{self.min_words}-{self.max_words}w"

    def seconds(self, rng: np.random.Generator) -> float:
        if self.median is None:
            return float(rng.uniform(self.low, self.high))
        return float(np.clip(rng.lognormal(np.log(self.median), 0.6), self.low, self.high))

    def text(self, rng: np.random.Generator) -> str:
        return " ".join(rng.choice(_WORDS, size=int(rng.integers(self.min_words, self.max_words + 1))))


def uniform_lengths(min_seconds: float, max_seconds: float) -> LengthMix:
    """Uniform durations in [min, max] seconds and 4-12 words of text."""
    return LengthMix(min_seconds, max_seconds, 4, 12)


# A speech-corpus mix: median 5 s, clipped to 1-20 s, 3-40 words.
REALISTIC_LENGTHS = LengthMix(1.0, 20.0, 3, 40, median=5.0)


def train_shards(work_dir: Path, shards: int, rows_per_shard: int, lengths: LengthMix, seed: int = 0) -> Path:
    """A complete encode output directory of random codes (training cost does not depend on code values):
    utterances of `lengths`' durations and texts, one shared 24 kHz reference."""
    from shared import schema
    from training.data.synthetic import write_shard, write_wav

    root = work_dir / f"train-shards-{shards}x{rows_per_shard}-{lengths.tag}-seed{seed}"
    if (root / schema.COMPLETE_MARKER).is_file():
        return root
    rng = np.random.default_rng(seed)
    ref = str(write_wav(root / "audio" / "ref.wav", 3.0, seed))
    for shard_id in range(shards):
        rows = []
        for k in range(rows_per_shard):
            index = shard_id * rows_per_shard + k
            seconds = lengths.seconds(rng)
            entry = {"id": f"utt{index:06d}", "audio": f"/unused/{index}.wav", "text": lengths.text(rng),
                     "ref_audio": ref}
            frames = -(-int(seconds * 24_000) // 1920)  # 12.5 codec frames per second
            codes = rng.integers(0, schema.CODEBOOK_SIZE, size=(frames, schema.NUM_CODEBOOKS), dtype=np.int16)
            rows.append(schema.ShardRow.from_entry(index, entry, codes=codes, duration=seconds, sample_rate=24_000))
        write_shard(root, shard_id, rows)
    (root / schema.COMPLETE_MARKER).write_text("")
    return root
