"""Synthetic encoded shards for tests and the demo, without the encode service.

Generated tones (sine + noise, wav files written with soundfile) are encoded by a real codec through
shared.qwen.encode_clips and written as published shards with shared.schema, plus an error row per shard
(training must skip it) and, optionally, the `_COMPLETE` marker.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf

from shared import schema
from shared.audio import CODEC_SAMPLE_RATE
from shared.qwen import encode_clips, load_codec

_WORDS = "the quick brown fox jumps over the lazy dog hello world one two three".split()


def tone(seconds: float, seed: int, rate: int = CODEC_SAMPLE_RATE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    freq = 120 + 40 * (seed % 7)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def write_wav(path: Path, seconds: float, seed: int, rate: int = CODEC_SAMPLE_RATE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(seconds, seed, rate), rate)
    return path


def write_shard(output: Path, shard_id: int, rows: list[schema.ShardRow]) -> Path:
    """Publish one shard the way the encode service does: write a temporary name, then rename."""
    good = [r for r in rows if r.ok]
    stats = schema.ShardStats(rows=len(rows), rows_ok=len(good), rows_error=len(rows) - len(good),
                              audio_seconds=sum(r.duration for r in good), frames=sum(r.num_frames for r in good),
                              encode_seconds=0.0, worker="synthetic")
    final = output / schema.SHARDS_DIR / schema.shard_name(shard_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".{final.name}.tmp-synthetic")
    pq.write_table(schema.build_table(rows, stats), temporary)
    temporary.rename(final)
    return final


def write_encoded(output: str | Path, codec_dir: str | Path, num_shards: int = 2, rows_per_shard: int = 6,
                  complete: bool = True, ref_rate: int = 16000, seed: int = 0) -> Path:
    """Shards of short utterances (0.4..1.2 s) sharing two references (one not at 24 kHz, so it is resampled)."""
    out = Path(output)
    codec = load_codec(codec_dir)
    refs = [str(write_wav(out / "audio" / "ref_a.wav", 1.5, seed + 1000, ref_rate)),
            str(write_wav(out / "audio" / "ref_b.wav", 2.3, seed + 1001))]
    rng = np.random.default_rng(seed)
    for shard_id in range(num_shards):
        entries, seconds, clips = [], [], []
        for k in range(rows_per_shard):
            index = shard_id * rows_per_shard + k
            seconds.append(float(rng.uniform(0.4, 1.2)))
            audio = write_wav(out / "audio" / f"{index:05d}.wav", seconds[-1], seed + index)
            words = rng.choice(_WORDS, size=int(rng.integers(2, 6)))
            entries.append({"id": f"utt{index:05d}", "audio": str(audio), "text": " ".join(words),
                            "ref_audio": refs[index % 2]})
            clips.append(tone(seconds[-1], seed + index))
        codes = encode_clips(codec, clips)
        first = shard_id * rows_per_shard
        rows = [schema.ShardRow.from_entry(first + k, e, codes=c, duration=s, sample_rate=CODEC_SAMPLE_RATE)
                for k, (e, c, s) in enumerate(zip(entries[:-1], codes, seconds))]
        # The last row of each shard is an error row: no codes, must never be trained on.
        rows.append(schema.ShardRow.from_entry(first + len(entries) - 1, entries[-1],
                                               error="too_short: synthetic error row"))
        write_shard(out, shard_id, rows)
    if complete:
        (out / schema.COMPLETE_MARKER).write_text("")
    return out


def write_utterances(output: str | Path, codec_dir: str | Path, entries: list[dict], clips: list[np.ndarray],
                     complete: bool = True) -> Path:
    """One published shard of good rows: manifest `entries` (any keys) with the codes of their 24 kHz `clips`."""
    out = Path(output)
    codes = encode_clips(load_codec(codec_dir), clips)
    rows = [schema.ShardRow.from_entry(i, entry, codes=c, duration=len(clip) / CODEC_SAMPLE_RATE,
                                       sample_rate=CODEC_SAMPLE_RATE)
            for i, (entry, c, clip) in enumerate(zip(entries, codes, clips))]
    write_shard(out, 0, rows)
    if complete:
        (out / schema.COMPLETE_MARKER).write_text("")
    return out
