"""Generated speech-like audio for the demo, tests and benchmarks (no data set can be downloaded here).

A pitch-varying glottal pulse train through three formant resonators, gated into syllables: it has
speech's spectrum and rhythm, which is all the codec needs to produce varied codes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import lfilter

VOWEL_FORMANTS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410)]
SYLLABLES = ["ni", "hao", "shi", "jie", "wo", "men", "yi", "qi", "zou", "ba", "da", "jia", "xue", "xi", "kuai", "le"]
WORDS = ["今天", "天气", "很好", "我们", "一起", "去", "公园", "散步", "学习", "语音", "合成", "模型", "数据"]


def _resonator(signal: np.ndarray, freq: float, bandwidth: float, sr: int) -> np.ndarray:
    r = np.exp(-np.pi * bandwidth / sr)
    theta = 2 * np.pi * freq / sr
    return lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], signal)


def synth_utterance(seconds: float, sr: int = 24_000, seed: int = 0,
                    pitch: tuple[float, float] = (100, 220)) -> np.ndarray:
    """`pitch`: the range the mean fundamental frequency (Hz) is drawn from: a voice, in effect."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = rng.uniform(*pitch) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * t))
    phase = np.cumsum(f0 / sr)
    pulses = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
    source = pulses + 0.02 * rng.standard_normal(n)
    out = np.zeros(n)
    syllable = int(sr * rng.uniform(0.15, 0.3))
    for start in range(0, n, syllable):
        seg = slice(start, min(n, start + syllable))
        f1, f2, f3 = VOWEL_FORMANTS[rng.integers(len(VOWEL_FORMANTS))]
        part = sum(_resonator(source[seg], f, 80 + f / 20, sr) for f in (f1, f2, f3))
        envelope = np.sin(np.linspace(0, np.pi, seg.stop - seg.start)) ** 0.5
        out[seg] = part * envelope * (rng.uniform(0.3, 1.0) if rng.random() > 0.15 else 0.0)
    peak = np.abs(out).max() or 1.0
    return (0.5 * out / peak).astype(np.float32)


def synth_text(seed: int, words: int = 6) -> str:
    rng = np.random.default_rng(seed)
    return "".join(WORDS[i] for i in rng.integers(len(WORDS), size=words))


# Voices of a multi-speaker corpus: a low and a high pitch range, then alternating.
SPEAKER_PITCH = [(85, 125), (190, 270)]


def write_kantts_tree(root: str | Path, count: int, seconds: tuple[float, float] = (1.0, 4.0),
                      rates: tuple[int, ...] = (24_000, 16_000, 44_100, 22_050), seed: int = 0,
                      pitch: tuple[float, float] = (100, 220)) -> Path:
    """A KAN-TTS OpenDataset layout: wav/NNNNNN.wav + prosody/prosody.txt with break marks and pinyin lines."""
    root = Path(root)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    (root / "prosody").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        utt = f"{i + 1:06d}"
        rate = rates[i % len(rates)]
        sf.write(root / "wav" / f"{utt}.wav", synth_utterance(rng.uniform(*seconds), rate, seed * 100_003 + i, pitch),
                 rate)
        words = [WORDS[j] for j in rng.integers(len(WORDS), size=rng.integers(3, 8))]
        marked = "".join(w + (f"#{rng.integers(1, 5)}" if k < len(words) - 1 else "#4") for k, w in enumerate(words))
        lines.append(f"{utt}\t{marked}")
        lines.append("\t" + " ".join(SYLLABLES[j] + str(rng.integers(1, 5)) for j in rng.integers(len(SYLLABLES), size=len(words) * 2)))
    (root / "prosody" / "prosody.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_kantts_speakers(root: str | Path, speakers: int, count: int, seconds: tuple[float, float] = (1.0, 4.0),
                          seed: int = 0) -> list[Path]:
    """A multi-speaker KAN-TTS root: <root>/speakerN/{wav,prosody} per speaker, each voice in its own pitch range,
    `count` utterances split between them."""
    return [write_kantts_tree(Path(root) / f"speaker{k + 1}", count // speakers + (k < count % speakers), seconds,
                              seed=seed + k, pitch=SPEAKER_PITCH[k % len(SPEAKER_PITCH)]) for k in range(speakers)]


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m shared.synth", description="write a generated KAN-TTS-layout "
                                     "speech corpus")
    parser.add_argument("--kantts", required=True, help="root directory to write wav/ and prosody/ into")
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speakers", type=int, default=1,
                        help="more than 1: one tree per speaker (speaker1/, speaker2/, ...) under --kantts")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    seconds = (args.min_seconds, args.max_seconds)
    if args.speakers > 1:
        write_kantts_speakers(args.kantts, args.speakers, args.count, seconds, args.seed)
        print(f"wrote {args.count} generated utterances of {args.speakers} speakers to {args.kantts}")
        return
    root = write_kantts_tree(args.kantts, args.count, seconds, seed=args.seed)
    print(f"wrote {args.count} generated utterances to {root}")


if __name__ == "__main__":
    main()
