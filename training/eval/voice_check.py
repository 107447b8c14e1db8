"""Does the voice sound right: rank 0 synthesises sentences per speaker with the current weights and scores them.

Each eval copies the talker weights from the FSDP shards into rank 0's inference model (a collective, one
parameter at a time: training.eval.inference_copy; the model lives on the host between evals and on the device
only while it generates) and synthesises `eval.sentences` for each speaker, conditioned on the x-vector that
speaker's rows train with (SampleBuilder.speaker; x-vector only, non-streaming layout, the rows' language id
when they share one; on a CustomVoice model.path the speaker is installed in its row and generate_custom_voice
speaks: custom_voice.speak). Each sample lands in RUN/samples/step-NNNNNN/<speaker>-<k>.wav and is scored:
- similarity: cosine of the model's own speaker-encoder x-vector of the sample and that conditioning vector;
- with eval.asr_model: the transcript, its character and word error rates against the sentence.
Sampling is seeded per sentence inside a forked RNG, so samples are repeatable and training's random
stream is untouched (a resumed run still reproduces an uninterrupted one). On a CustomVoice model.path the
built-in speakers' forgetting is measured too (training.eval.keep_check).

The other ranks wait at a barrier meanwhile, so the samples are bounded: each by a frame count from its
sentence's length (an undertrained model may never emit the end code), the eval by eval.budget_seconds
(samples not started by then are skipped and named in the log and the eval record).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist

from shared.audio import CODEC_SAMPLE_RATE
from shared.qwen import speaker_mel
from training.eval.asr import Transcriber, cer, wer
from training.checkpoint.step_folders import step_dir_name
from training.config import Config
from training.speakers.custom_voice import speak
from training.eval.inference_copy import InferenceCopy
from training.eval.keep_check import keep_check_for
from training.model.layout import has_language
from training.model.talker import speaker_embedding
from training.data.samples import SampleBuilder

log = logging.getLogger(__name__)

DEFAULT_SENTENCES = {
    "english": ["The quick brown fox jumps over the lazy dog.",
                "Please call me back when you get this message."],
    "chinese": ["今天天气很好，我们一起去公园散步吧。",
                "请在听到提示音后留言，我会尽快给你回电话。"],
}
_MIN_SCORED_SAMPLES = 2048  # shorter output (~85 ms) has too few mel frames for an x-vector
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CODEC_FRAMES_PER_SECOND = 12.5
# A slow reading: 2 characters/s for CJK, kana and hangul, 5/s for other non-space characters (normal speech is
# about twice as fast in either), plus 2 s of lead-in and trailing silence.
_SLOW_SECONDS_PER_CHARACTER = {True: 0.5, False: 0.2}
_LEAD_SECONDS = 2.0
_SYLLABIC = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


@dataclass
class SampleScore:
    speaker: str
    index: int
    sentence: str
    path: str
    reference: str  # the speaker's most used reference (its rows' vector conditioned the sample)
    seconds: float
    similarity: float | None  # None when the sample is too short to embed
    transcript: str | None = None
    cer: float | None = None
    wer: float | None = None
    max_new_tokens: int = 0  # the frame bound it was generated under

    def to_dict(self) -> dict:
        return asdict(self)


def guess_language(texts: list[str]) -> str:
    """chinese when the speaker's texts hold CJK characters, else english (the keys of DEFAULT_SENTENCES)."""
    return "chinese" if any(re.search(r"[\u4e00-\u9fff]", t or "") for t in texts) else "english"


def generation_language(rows) -> str:
    """The language the speaker's rows train with (their codec prefix carries its id), when they share one;
    else "Auto", inference's prefix without a language id (what rows without a language train with)."""
    languages = {r.language.lower() for r in rows if has_language(r.language)}
    return languages.pop() if len(languages) == 1 and all(has_language(r.language) for r in rows) else "Auto"


def sentence_frame_bound(sentence: str) -> int:
    """Codec frames a sample of `sentence` may take at most: a slow reading of it (see _SLOW_SECONDS_PER_CHARACTER)."""
    seconds = _LEAD_SECONDS + sum(_SLOW_SECONDS_PER_CHARACTER[bool(_SYLLABIC.match(c))]
                                  for c in sentence if not c.isspace())
    return math.ceil(seconds * CODEC_FRAMES_PER_SECOND)


def generation_bound(config: Config, tts, sentence: str) -> int:
    """eval.max_new_tokens, else the sentence's frame bound (never above the model's own generation limit)."""
    if config.eval.max_new_tokens:
        return config.eval.max_new_tokens
    bound = sentence_frame_bound(sentence)
    limit = (tts.generate_defaults or {}).get("max_new_tokens") or bound
    return min(bound, limit)


def file_name(speaker: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", speaker) or "speaker"


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


class VoiceCheck:
    def __init__(self, config: Config, run_dir: Path, builder: SampleBuilder, device: torch.device):
        self.config, self.run_dir, self.builder, self.device = config, run_dir, builder, device
        self.rank = dist.get_rank()
        # A few sentences need no training kernel: sdpa runs on every device (eager when asked for).
        attention = "eager" if config.model.attn_implementation == "eager" else "sdpa"
        self.copy = InferenceCopy(config.model.path, device, _DTYPES[config.fsdp.param_dtype], attention)
        self.transcriber = None
        encoder = builder.references.speaker_encoder if builder.references is not None else None
        # The built-in speakers of a CustomVoice model.path, their generation bounded like a sample's.
        self.keep = keep_check_for(config, builder.voices, encoder, lambda text: self.max_new_tokens(None, text))
        self.last_keep: dict = {}  # speaker -> keep_check.KeepScore of the last eval (rank 0)

    def sentences(self, speaker) -> list[str]:
        """eval.sentences, else the defaults in the speaker's language (its rows' `language`, else guessed from
        their texts)."""
        if self.config.eval.sentences:
            return self.config.eval.sentences
        languages = {(r.language or "").lower() for r in speaker.rows} & set(DEFAULT_SENTENCES)
        if len(languages) == 1:
            return DEFAULT_SENTENCES[languages.pop()]
        return DEFAULT_SENTENCES[guess_language([r.text or "" for r in speaker.rows[:8]])]

    def run(self, step: int, module, speakers: dict) -> tuple[list[SampleScore], list[str]]:
        """Collective (the weight copy); the synthesis runs on rank 0 while the other ranks wait. Returns rank 0's
        scores and the samples skipped for want of time (empty lists elsewhere)."""
        if self.rank == 0 and self.keep is not None and self.keep.base is None:
            base = self.copy.load()  # the first time: the base model's own weights, before any refresh
            with self.copy.on_device():
                self.keep.remember_base(base)
        tts = self.copy.refresh(module)
        done = self._synthesise(step, tts, speakers) if self.rank == 0 else ([], [])
        dist.barrier()
        return done

    def max_new_tokens(self, tts, sentence: str) -> int:
        return generation_bound(self.config, tts or self.copy.tts, sentence)

    def _synthesise(self, step: int, tts, speakers: dict) -> tuple[list[SampleScore], list[str]]:
        if self.config.eval.asr_model and self.transcriber is None:
            self.transcriber = Transcriber(self.config.eval.asr_model)  # on the host, like the inference copy
        out_dir = self.run_dir / "samples" / step_dir_name(step)
        out_dir.mkdir(parents=True, exist_ok=True)
        budget = self.config.eval.budget_seconds
        scores, skipped = [], []
        started = time.monotonic()
        with self.copy.on_device(), self._transcriber_on_device():
            for speaker in speakers.values():
                # The vector the speaker's rows train with (the builder's), taken from a row on its main reference.
                reference = self.builder.speaker(next(r for r in speaker.rows if r.ref_audio == speaker.reference))
                language = generation_language(speaker.rows)
                for k, sentence in enumerate(self.sentences(speaker)):
                    name = f"{file_name(speaker.name)}-{k}"
                    if scores and time.monotonic() - started > budget:  # the first sample always runs
                        skipped.append(name)
                        continue
                    limit = self.max_new_tokens(tts, sentence)
                    wav, rate = self._generate(tts, sentence, language, reference, self.config.train.seed + k, limit,
                                               speaker.rows[0].speaker)
                    path = out_dir / f"{name}.wav"
                    sf.write(path, wav, rate)
                    wav, rate = sf.read(path, dtype="float32")  # score what was written (16-bit PCM)
                    scores.append(self._score(speaker, k, sentence, path, wav, rate, reference))
                    scores[-1].max_new_tokens = limit
            self.last_keep = self.keep.measure(tts) if self.keep is not None else {}
        if skipped:
            log.warning("step %d: eval.budget_seconds=%g spent after %d sample(s) (%.1f s); skipped %s", step, budget,
                        len(scores), time.monotonic() - started, ", ".join(skipped))
        (out_dir / "scores.json").write_text(json.dumps([s.to_dict() for s in scores], indent=1, ensure_ascii=False))
        return scores, skipped

    def _transcriber_on_device(self):
        if self.transcriber is None:
            return contextlib.nullcontext()
        return self.transcriber.on_device(self.device)

    def _generate(self, tts, sentence: str, language: str, xvector: torch.Tensor, seed: int,
                  max_new_tokens: int, speaker: str | None = None) -> tuple[np.ndarray, int]:
        prompt = dict(ref_code=[None], ref_spk_embedding=[xvector], x_vector_only_mode=[True], icl_mode=[False])
        devices = [] if self.device.type == "cpu" else [self.device.index or 0]
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            torch.manual_seed(seed)
            if self.builder.voices is not None:  # a CustomVoice base: the speaker's row, as its export holds it
                wavs, rate = speak(tts, self.builder.voices, speaker, xvector, sentence, language,
                                   max_new_tokens=max_new_tokens)
            else:
                wavs, rate = tts.generate_voice_clone(text=sentence, language=language, voice_clone_prompt=prompt,
                                                      non_streaming_mode=True, max_new_tokens=max_new_tokens)
        return np.asarray(wavs[0], dtype=np.float32), int(rate)

    def _score(self, speaker, k: int, sentence: str, path: Path, wav: np.ndarray, rate: int,
               reference: torch.Tensor) -> SampleScore:
        similarity = None
        if len(wav) >= _MIN_SCORED_SAMPLES and self.builder.references is not None:  # trainable rows: no encoder
            audio = wav if rate == CODEC_SAMPLE_RATE else _resample(wav, rate)
            sample = speaker_embedding(self.builder.references.speaker_encoder, speaker_mel(audio))
            similarity = cosine(sample.cpu(), reference)
        score = SampleScore(speaker.name, k, sentence, str(path), speaker.reference, len(wav) / rate, similarity)
        if self.transcriber is not None:
            score.transcript = self.transcriber(wav, rate)
            score.cer, score.wer = cer(sentence, score.transcript), wer(sentence, score.transcript)
        return score


def _resample(wav: np.ndarray, rate: int) -> np.ndarray:
    import soxr

    return soxr.resample(wav, rate, CODEC_SAMPLE_RATE).astype(np.float32)
