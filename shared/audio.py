"""Audio loading for the codec: decode, downmix, resample to 24 kHz, validate.

Every rejection raises AudioError with a reason that names the file and what to do, so the encode
service can turn it into an error row instead of crashing.
"""
from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

CODEC_SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = 1920  # 24 kHz / 12.5 frames per second
DEFAULT_MIN_SECONDS = 0.1
DEFAULT_MAX_SECONDS = 60.0
REFERENCE_MAX_SECONDS = 600.0  # reference audio may be longer than the clips the encode service accepts


class AudioError(ValueError):
    """A file that cannot become codec input. `reason` is a short machine-friendly tag."""

    def __init__(self, path: str, reason: str, detail: str):
        self.path, self.reason, self.detail = path, reason, detail
        super().__init__(f"{path}: {detail}")


@dataclass(frozen=True)
class AudioLimits:
    min_seconds: float = DEFAULT_MIN_SECONDS
    max_seconds: float = DEFAULT_MAX_SECONDS


@dataclass
class Clip:
    samples: np.ndarray  # float32 mono at 24 kHz
    source_sample_rate: int
    duration: float  # seconds of the source audio

    @property
    def num_frames(self) -> int:
        return -(-len(self.samples) // SAMPLES_PER_FRAME)


def to_mono(data: np.ndarray) -> np.ndarray:
    """(samples,) or (samples, channels) -> (samples,), averaging channels as librosa does."""
    return data if data.ndim == 1 else data.mean(axis=1, dtype=np.float32)


def resample(samples: np.ndarray, source_rate: int, target_rate: int = CODEC_SAMPLE_RATE) -> np.ndarray:
    """soxr HQ resampling to exactly ceil(n * ratio) samples: the filter and length upstream's librosa path
    produces, so codes of resampled files match upstream's."""
    if source_rate == target_rate:
        return np.ascontiguousarray(samples, dtype=np.float32)
    out = soxr.resample(samples, source_rate, target_rate, quality="HQ").astype(np.float32, copy=False)
    length = int(np.ceil(len(samples) * (float(target_rate) / source_rate)))
    if len(out) >= length:
        return out[:length]
    return np.pad(out, (0, length - len(out)))


def check_regular_file(path: str) -> None:
    """Raise AudioError unless `path` is a regular file this process can open. Never opens anything that could
    block (a FIFO waits for a writer) or that is not a file (a directory, a device)."""
    try:
        st = os.stat(path)  # follows symlinks: a loop or a dangling link fails here
    except FileNotFoundError:
        raise AudioError(path, "missing_file", "file does not exist; fix the path in the manifest") from None
    except (OSError, ValueError) as exc:  # ELOOP, ENOTDIR, ENAMETOOLONG, EACCES, a NUL byte in the path
        detail = getattr(exc, "strerror", None) or str(exc)
        raise AudioError(path, "unreadable", f"cannot open the path ({detail}); fix the path or the file") from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioError(path, "not_a_file", "is a directory, not an audio file; point the manifest at a file in it")
    if not stat.S_ISREG(st.st_mode):
        raise AudioError(path, "not_a_file", "is not a regular file (a pipe, socket or device); copy the audio "
                                             "into a file and point the manifest at it")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise AudioError(path, "unreadable", f"cannot open the file ({exc.strerror}); fix its permissions or "
                                             "storage") from None


def load_audio(path: str, limits: AudioLimits = AudioLimits(), data: bytes | None = None) -> Clip:
    """Decode `path` (or the given bytes, named `path` in errors) into a validated 24 kHz mono clip."""
    if data is None:
        check_regular_file(path)
    source = io.BytesIO(data) if data is not None else path
    try:
        info = sf.info(source)
    except Exception as exc:  # libsndfile's errors are plain RuntimeErrors with a message
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AudioError(path, "undecodable", f"not a readable audio file ({detail}); re-export it as WAV/FLAC "
                                              "(soundfile also reads OGG/Vorbis, Opus and MP3)") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(path, "empty_audio", "file holds no samples; re-record or drop it from the manifest")
    duration = info.frames / info.samplerate
    if duration > limits.max_seconds:
        raise AudioError(path, "too_long", f"{duration:.1f}s exceeds the {limits.max_seconds:.0f}s limit; "
                                           "split it or raise --max-seconds")
    if data is not None:
        source.seek(0)
    try:
        samples, rate = sf.read(source, dtype="float32", always_2d=False)
    except Exception as exc:
        raise AudioError(path, "undecodable",
                         f"decoding failed ({exc}); the file is truncated or corrupt, re-export it") from None
    samples = to_mono(samples)
    if samples.size == 0:
        raise AudioError(path, "empty_audio", "file holds no samples; re-record or drop it from the manifest")
    duration = samples.size / rate
    if duration < limits.min_seconds:
        raise AudioError(path, "too_short", f"{duration:.3f}s is below the {limits.min_seconds}s minimum")
    if not np.isfinite(samples).all():
        raise AudioError(path, "non_finite", "samples contain NaN or Inf; the file is corrupt, re-export it")
    if not np.any(samples):
        raise AudioError(path, "silent", "audio is digital silence (every sample is 0); drop it from the manifest")
    return Clip(resample(samples, rate), int(rate), float(duration))


def pad_to_frame(samples: np.ndarray) -> np.ndarray:
    """Zero-pad to a whole number of codec frames (see docs/preparing-data.md: batch-invariant codes)."""
    remainder = len(samples) % SAMPLES_PER_FRAME
    if remainder == 0:
        return samples
    return np.pad(samples, (0, SAMPLES_PER_FRAME - remainder))
