"""Does the voice sound right: rank 0 synthesises sentences per speaker with the current weights and scores them.

Each eval gathers the full talker weights from the FSDP shards (a collective: every rank takes part), loads
them into an unsharded inference model on rank 0 (Qwen3TTSModel, loaded once from model.path) and
synthesises `eval.sentences` for each speaker, conditioned on the x-vector that speaker's rows train with
(SampleBuilder.speaker; x-vector only, non-streaming layout, the rows' language id when they share one).
Each sample lands in RUN/samples/step-NNNNNN/<speaker>-<k>.wav and is scored:
- similarity: cosine of the model's own speaker-encoder x-vector of the sample and that conditioning vector;
- with eval.asr_model: the transcript, its character and word error rates against the sentence.
Sampling is seeded per sentence inside a forked RNG, so samples are repeatable and training's random
stream is untouched (a resumed run still reproduces an uninterrupted one).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from shared.audio import CODEC_SAMPLE_RATE
from shared.qwen import load_inference_model, speaker_mel
from training.asr import Transcriber, cer, wer
from training.checkpoint import step_dir_name
from training.config import Config
from training.layout import has_language
from training.lora import merged_state_dict
from training.model import speaker_embedding
from training.samples import SampleBuilder

log = logging.getLogger(__name__)

DEFAULT_SENTENCES = {
    "english": ["The quick brown fox jumps over the lazy dog.",
                "Please call me back when you get this message."],
    "chinese": ["今天天气很好，我们一起去公园散步吧。",
                "请在听到提示音后留言，我会尽快给你回电话。"],
}
_MIN_SCORED_SAMPLES = 2048  # shorter output (~85 ms) has too few mel frames for an x-vector
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def file_name(speaker: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", speaker) or "speaker"


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


class VoiceCheck:
    def __init__(self, config: Config, run_dir: Path, builder: SampleBuilder, device: torch.device):
        self.config, self.run_dir, self.builder, self.device = config, run_dir, builder, device
        self.rank = dist.get_rank()
        self.tts = None
        self.transcriber = None

    def sentences(self, speaker) -> list[str]:
        """eval.sentences, else the defaults in the speaker's language (its rows' `language`, else guessed from
        their texts)."""
        if self.config.eval.sentences:
            return self.config.eval.sentences
        languages = {(r.language or "").lower() for r in speaker.rows} & set(DEFAULT_SENTENCES)
        if len(languages) == 1:
            return DEFAULT_SENTENCES[languages.pop()]
        return DEFAULT_SENTENCES[guess_language([r.text or "" for r in speaker.rows[:8]])]

    def run(self, step: int, module, speakers: dict) -> list[SampleScore]:
        """Collective (the weight gather); the synthesis runs on rank 0 while the other ranks wait."""
        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = merged_state_dict(state, self.config.lora)  # LoRA: plain names, adapters merged in
        scores = self._synthesise(step, state, speakers) if self.rank == 0 else []
        dist.barrier()
        return scores

    def _model(self):
        if self.tts is None:
            dtype = _DTYPES[self.config.fsdp.param_dtype]
            # A few sentences need no training kernel: sdpa runs on every device (eager when asked for).
            attention = "eager" if self.config.model.attn_implementation == "eager" else "sdpa"
            self.tts = load_inference_model(self.config.model.path, self.device, dtype, attention)
            if self.config.eval.asr_model:
                self.transcriber = Transcriber(self.config.eval.asr_model,
                                               "cpu" if self.device.type == "cpu" else str(self.device))
        return self.tts

    def _synthesise(self, step: int, state: dict, speakers: dict) -> list[SampleScore]:
        tts = self._model()
        missing, unexpected = tts.model.load_state_dict(state, strict=False)
        if unexpected or any(k.startswith("talker.") for k in missing):
            raise RuntimeError(f"training weights do not fit the inference model: unexpected {unexpected[:5]}, "
                               f"missing talker weights {[k for k in missing if k.startswith('talker.')][:5]}")
        out_dir = self.run_dir / "samples" / step_dir_name(step)
        out_dir.mkdir(parents=True, exist_ok=True)
        scores = []
        for speaker in speakers.values():
            # The vector the speaker's rows train with (the builder's), taken from a row on its main reference.
            reference = self.builder.speaker(next(r for r in speaker.rows if r.ref_audio == speaker.reference))
            language = generation_language(speaker.rows)
            for k, sentence in enumerate(self.sentences(speaker)):
                wav, rate = self._generate(sentence, language, reference, seed=self.config.train.seed + k)
                path = out_dir / f"{file_name(speaker.name)}-{k}.wav"
                sf.write(path, wav, rate)
                wav, rate = sf.read(path, dtype="float32")  # score what was written (16-bit PCM)
                scores.append(self._score(speaker, k, sentence, path, wav, rate, reference))
        (out_dir / "scores.json").write_text(json.dumps([s.to_dict() for s in scores], indent=1, ensure_ascii=False))
        return scores

    def _generate(self, sentence: str, language: str, xvector: torch.Tensor, seed: int) -> tuple[np.ndarray, int]:
        prompt = dict(ref_code=[None], ref_spk_embedding=[xvector], x_vector_only_mode=[True], icl_mode=[False])
        extra = {"max_new_tokens": self.config.eval.max_new_tokens} if self.config.eval.max_new_tokens else {}
        devices = [] if self.device.type == "cpu" else [self.device.index or 0]
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            torch.manual_seed(seed)
            wavs, rate = self.tts.generate_voice_clone(text=sentence, language=language, voice_clone_prompt=prompt,
                                                       non_streaming_mode=True, **extra)
        return np.asarray(wavs[0], dtype=np.float32), int(rate)

    def _score(self, speaker, k: int, sentence: str, path: Path, wav: np.ndarray, rate: int,
               reference: torch.Tensor) -> SampleScore:
        similarity = None
        if len(wav) >= _MIN_SCORED_SAMPLES:
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
