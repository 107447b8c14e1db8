"""Forgetting, measured: do a CustomVoice model's built-in speakers still say what they said before the fine-tune?

For each built-in speaker (eval.keep_speakers, or all of them), fixed sentences are generated greedily (no
sampling anywhere, so a difference is the weights' doing) once with the base model's own weights, the first
time an eval runs, and again at every eval with the current weights. Reported per speaker, over its sentences:
- codebook0: share of frames whose codebook-0 code equals the base model's at the same frame (frames beyond
  the shorter of the two count as different, so a changed length lowers it);
- all_codebooks: share of frames equal in all 16 codebooks, on the same footing;
- similarity: cosine of the speaker-encoder x-vectors of the two decoded waveforms, when the run has a speaker
  encoder (model.speaker_encoder).
A dialect speaker is asked for in chinese (its dialect id applies), the others in auto. The built-in rows are
put back as the base model had them before measuring, as training.export does (weight decay shrinks every row of
the embedding a little, used or not), so the score is that of the model the export would write.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from shared.audio import CODEC_SAMPLE_RATE
from shared.qwen import speaker_mel
from training.model.talker import speaker_embedding

SENTENCES = {False: ["The quick brown fox jumps over the lazy dog."], True: ["今天天气很好，我们一起去公园散步吧。"]}
_GREEDY = dict(do_sample=False, subtalker_dosample=False, repetition_penalty=1.0)
_MIN_EMBEDDED_SAMPLES = 2048  # shorter audio has too few mel frames for an x-vector


@dataclass
class KeepScore:
    codebook0: float
    all_codebooks: float
    similarity: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def frame_agreement(base: torch.Tensor, now: torch.Tensor) -> tuple[float, float]:
    """(codebook-0, all-16) agreement of two (frames, 16) code tensors, over the longer one's frames."""
    longest, shared = max(len(base), len(now)), min(len(base), len(now))
    if longest == 0:
        return 1.0, 1.0
    same = base[:shared].cpu() == now[:shared].cpu()
    return float(same[:, 0].sum()) / longest, float(same.all(1).sum()) / longest


class KeepCheck:
    def __init__(self, speakers: dict[str, str | bool], sentences: list[str], frame_bound: Callable[[str], int],
                 speaker_encoder=None, kept_rows: list[int] = ()):
        """`speakers`: built-in name -> dialect key or False; empty `sentences`: SENTENCES; `frame_bound`: the
        most frames a sentence may take (a fine-tune may lose the end code); `kept_rows`: the built-in rows the
        export copies from the base model."""
        self.speakers, self.sentences, self.speaker_encoder = speakers, sentences, speaker_encoder
        self.kept_rows, self.base_rows, self.frame_bound = list(kept_rows), None, frame_bound
        self.base: dict[str, list[torch.Tensor]] | None = None

    def prompts(self, dialect) -> list[str]:
        return self.sentences or SENTENCES[bool(dialect)]

    def codes(self, tts) -> dict[str, list[torch.Tensor]]:
        """Greedy codes per speaker and sentence, through upstream generation (as generate_custom_voice calls it)."""
        out = {}
        for name, dialect in self.speakers.items():
            texts = self.prompts(dialect)
            out[name] = greedy_codes(tts, name, texts, ["chinese" if dialect else "auto"] * len(texts),
                                     max(self.frame_bound(t) for t in texts))
        return out

    def remember_base(self, tts) -> None:
        """Once, with the base model's weights still loaded."""
        if self.base is None:
            self.base = self.codes(tts)
            self.base_rows = tts.model.talker.get_input_embeddings().weight[self.kept_rows].detach().cpu().clone()

    def measure(self, tts) -> dict[str, KeepScore]:
        if self.kept_rows:
            with torch.no_grad():
                weight = tts.model.talker.get_input_embeddings().weight
                weight[self.kept_rows] = self.base_rows.to(weight.device, weight.dtype)
        now = self.codes(tts)
        scores = {}
        for name, generated in now.items():
            pairs = list(zip(self.base[name], generated))
            agreements = [frame_agreement(b, n) for b, n in pairs]
            score = KeepScore(sum(a[0] for a in agreements) / len(pairs), sum(a[1] for a in agreements) / len(pairs))
            if self.speaker_encoder is not None:
                similarities = [s for s in (self.similarity(tts, b, n) for b, n in pairs) if s is not None]
                score.similarity = sum(similarities) / len(similarities) if similarities else None
            scores[name] = score
        return scores

    def similarity(self, tts, base: torch.Tensor, now: torch.Tensor) -> float | None:
        decoded = [tts.model.speech_tokenizer.decode([{"audio_codes": codes}]) for codes in (base, now)]
        wavs, rate = [w[0] for w, _ in decoded], decoded[0][1]
        if rate != CODEC_SAMPLE_RATE or min(len(w) for w in wavs) < _MIN_EMBEDDED_SAMPLES:
            return None
        a, b = (speaker_embedding(self.speaker_encoder, speaker_mel(w)).cpu() for w in wavs)
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def greedy_codes(tts, speaker: str, texts: list[str], languages: list[str], max_new_tokens: int
                 ) -> list[torch.Tensor]:
    """(frames, 16) codes per text, generated greedily by `tts` (a Qwen3TTSModel) for its built-in `speaker` through
    upstream generation (as generate_custom_voice calls it), on the host."""
    input_ids = tts._tokenize_texts([tts._build_assistant_text(t) for t in texts])
    codes, _ = tts.model.generate(input_ids=input_ids, languages=languages, speakers=[speaker] * len(texts),
                                  non_streaming_mode=True, max_new_tokens=max_new_tokens, **_GREEDY)
    return [c.cpu() for c in codes]


def kept_speakers(keep_speakers: list[str], voices) -> dict[str, str | bool]:
    """The built-in speakers a run keeps (eval.keep_speakers, else all; a retrained one is not kept): name ->
    its dialect key or False."""
    chosen = [name.lower() for name in keep_speakers] or sorted(voices.builtin)
    return {name: voices.builtin_dialect.get(name, False) for name in chosen
            if name in voices.builtin and name not in voices.retrained}


def keep_check_for(config, voices, speaker_encoder, frame_bound: Callable[[str], int]) -> KeepCheck | None:
    """The run's check: the built-in speakers not being retrained (eval.keep_speakers narrows them)."""
    if voices is None or not voices.builtin:
        return None
    speakers = kept_speakers(config.eval.keep_speakers, voices)
    kept = [row for name, row in voices.builtin.items() if name not in voices.retrained]
    return KeepCheck(speakers, [], frame_bound, speaker_encoder, kept) if speakers else None
