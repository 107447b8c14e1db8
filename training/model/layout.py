"""The dual-channel talker input, built exactly as non-streaming inference builds it.

Per utterance with n text tokens, T frames and a codec prefix of k ids (L = n + T + 8 + k positions):

    pos          text channel                 codec channel
    0..2         <|im_start|> assistant \\n     off
    3..2+k       tts_pad                      the codec prefix (below)
    s = 3+k      tts_pad                      speaker x-vector
    s+1          tts_bos                      codec pad
    s+2..s+1+n   text tokens                  codec pad
    s+2+n        tts_eos                      codec pad
    s+3+n        tts_pad                      codec bos
    next T       tts_pad                      frame j: c0 embedding + code-predictor embeddings of c1..c15
    last         tts_pad                      codec eos

The role positions hold the first three tokens of the utterance's own tokenized prompt, as inference slices
them: a text that starts with a newline merges it into the third ("\\n\\n"), so they are not the same for all texts.

The codec prefix is what inference builds for the row's language: nothink, think_bos, think_eos (k = 3) for a
row without one (inference's "auto"), think, think_bos, <language id>, think_eos (k = 4) for a row with one.

Labels are stored already shifted: the label at position p is what the talker's output at p must predict
(c0 of the frame at p+1, or eos after the last frame). Nothing downstream shifts again.

A batch packs several utterances into each row: every utterance has its own position ids, restarting at 0,
and no attention mask is passed, so transformers' create_causal_mask (sdpa/eager) builds a block-diagonal
causal mask from the position ids; for flash attention the varlen boundaries (cu_seq_lens) are computed
here, once per batch, on the host. A row's padding tail is a block of its own and carries no targets.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from training.data.packing import BatchShape, batch_shape

IGNORE = -100
ROLE_LEN = 3  # <|im_start|>assistant\n
NUM_CODEBOOKS = 16
AUTO_LANGUAGE = "auto"  # inference's name for "no language id"


@dataclass(frozen=True)
class SpecialIds:
    tts_pad: int
    tts_bos: int
    tts_eos: int
    codec_pad: int
    codec_bos: int
    codec_eos: int
    codec_nothink: int
    codec_think_bos: int
    codec_think_eos: int
    codec_think: int = 0
    languages: tuple[tuple[str, int], ...] = ()  # (lower-cased name, codec id) of talker_config.codec_language_id

    @classmethod
    def from_config(cls, config) -> "SpecialIds":
        """From a Qwen3TTSConfig (top level holds the text ids, talker_config the codec ids)."""
        t = config.talker_config
        return cls(config.tts_pad_token_id, config.tts_bos_token_id, config.tts_eos_token_id, t.codec_pad_id,
                   t.codec_bos_id, t.codec_eos_token_id, t.codec_nothink_id, t.codec_think_bos_id,
                   t.codec_think_eos_id, t.codec_think_id,
                   tuple(sorted((name.lower(), int(i)) for name, i in (t.codec_language_id or {}).items())))

    def language_id(self, language: str) -> int:
        """The codec id of a language, looked up lower-cased as inference does."""
        ids = dict(self.languages)
        if language.lower() not in ids:
            raise ValueError(f"language {language!r} is not one of this model's languages "
                             f"({', '.join(sorted(ids)) or 'none'}); fix the manifest's `language` or leave it out")
        return ids[language.lower()]

    def codec_prefix(self, language: str | None) -> tuple[int, ...]:
        """The codec ids between the role tokens and the speaker slot, as inference builds them for `language`."""
        if not has_language(language):
            return (self.codec_nothink, self.codec_think_bos, self.codec_think_eos)
        return (self.codec_think, self.codec_think_bos, self.language_id(language), self.codec_think_eos)


def has_language(language: str | None) -> bool:
    """A row trains with a language id unless it has none or says "auto" (inference's default)."""
    return bool(language) and language.lower() != AUTO_LANGUAGE


def prefix_length(language: str | None) -> int:
    return 4 if has_language(language) else 3


@dataclass(frozen=True)
class Positions:
    """Where each part of one utterance's prompt sits; every index of the layout is derived here."""
    num_text: int
    num_frames: int
    prefix_len: int = 3

    @property
    def speaker(self) -> int:  # the x-vector slot, right after the codec prefix
        return ROLE_LEN + self.prefix_len

    @property
    def tts_bos(self) -> int:
        return self.speaker + 1

    @property
    def text_start(self) -> int:
        return self.speaker + 2

    @property
    def tts_eos(self) -> int:
        return self.text_start + self.num_text

    @property
    def codec_bos(self) -> int:
        return self.tts_eos + 1

    @property
    def first_frame(self) -> int:
        return self.codec_bos + 1

    @property
    def length(self) -> int:  # frames, then codec eos
        return self.first_frame + self.num_frames + 1


def assistant_prompt(text: str) -> str:
    """The prompt inference tokenizes; its tokens [3:-5] are the text tokens."""
    return f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"


def load_text_tokenizer(model_path):
    """The model directory's tokenizer with the pre-tokenizer patch Qwen3TTSModel applies (fix_mistral_regex),
    so training tokenizes exactly as inference does."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path), fix_mistral_regex=True)


def text_token_ids(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(role ids, text ids) exactly as Qwen3TTSModel slices its tokenized prompt."""
    return batch_text_token_ids(tokenizer, [text])[0]


def batch_text_token_ids(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """text_token_ids of many texts in one tokenizer call (no padding: each prompt is tokenized alone)."""
    if not texts:  # a shard of error rows only; the fast tokenizer fails on an empty batch
        return []
    encoded = tokenizer([assistant_prompt(t) for t in texts])["input_ids"]
    return [(ids[:ROLE_LEN], ids[ROLE_LEN:-5]) for ids in encoded]


def sequence_length(num_text: int, num_frames: int, language: str | None = None) -> int:
    return Positions(num_text, num_frames, prefix_length(language)).length


@dataclass
class Sample:
    text_ids: np.ndarray  # (L,) text-channel token at every position
    codec_ids: np.ndarray  # (L, 16) codec-channel ids; columns 1..15 used on frame positions only
    codec_on: np.ndarray  # (L,) bool: codec channel present (off on the role positions)
    frame_on: np.ndarray  # (L,) bool: position carries a full 16-code frame
    labels: np.ndarray  # (L,) talker target at each position (IGNORE where none), already shifted
    predictor_pos: np.ndarray  # (T,) position whose hidden state predicted frame j (its sub-talker input)
    frames: np.ndarray  # (T, 16) the codes
    speaker_pos: int  # the position whose codec-channel input is the x-vector (after the codec prefix)

    def __len__(self) -> int:
        return len(self.text_ids)


def build_sample(role_ids: list[int], text_ids: list[int], codes: np.ndarray, ids: SpecialIds,
                 language: str | None = None) -> Sample:
    """One utterance's training input; `language` (a row's manifest language, None or "auto" for none) picks
    the codec prefix inference uses for it."""
    prefix = ids.codec_prefix(language)
    n, t = len(text_ids), len(codes)
    pos = Positions(n, t, len(prefix))
    length, first_frame = pos.length, pos.first_frame
    text = np.full(length, ids.tts_pad, dtype=np.int64)
    text[:ROLE_LEN] = role_ids
    text[pos.tts_bos] = ids.tts_bos
    text[pos.text_start:pos.tts_eos] = text_ids
    text[pos.tts_eos] = ids.tts_eos

    codec = np.zeros((length, NUM_CODEBOOKS), dtype=np.int64)
    codec[ROLE_LEN:pos.speaker, 0] = prefix
    codec[pos.speaker, 0] = ids.codec_pad  # placeholder id; the x-vector replaces this embedding
    codec[pos.tts_bos:pos.codec_bos, 0] = ids.codec_pad
    codec[pos.codec_bos, 0] = ids.codec_bos
    codec[first_frame:first_frame + t] = codes
    codec[-1, 0] = ids.codec_eos

    codec_on = np.ones(length, dtype=bool)
    codec_on[:ROLE_LEN] = False
    frame_on = np.zeros(length, dtype=bool)
    frame_on[first_frame:first_frame + t] = True

    labels = np.full(length, IGNORE, dtype=np.int64)
    # The position before frame j predicts frame j's c0; the last frame's position predicts eos.
    labels[first_frame - 1:first_frame - 1 + t] = codes[:, 0]
    labels[first_frame - 1 + t] = ids.codec_eos
    predictor_pos = np.arange(first_frame - 1, first_frame - 1 + t)
    return Sample(text, codec, codec_on, frame_on, labels, predictor_pos, np.asarray(codes, dtype=np.int64),
                  pos.speaker)


# Fields that stay in host memory when a batch moves to a device of this type. torch_npu's variable-length
# attention takes the block boundaries as a host list: transformers calls `.cpu()` on cu_seq_lens in every layer,
# which on a device tensor is a copy and a stream sync per layer; a host tensor makes it free.
HOST_FIELDS_ON = {"npu": frozenset({"cu_seq_lens"})}


@dataclass
class TalkerBatch:
    """Rows of packed utterances. Index tensors address (row, position); utterances are numbered row-major."""
    text_ids: torch.Tensor  # (B, L)
    codec_ids: torch.Tensor  # (B, L, 16)
    codec_on: torch.Tensor  # (B, L) bool
    frame_on: torch.Tensor  # (B, L) bool
    position_ids: torch.Tensor  # (3, B, L) MRoPE positions, restarting at 0 for every utterance and padding tail
    speaker: torch.Tensor  # (U, D) x-vector per utterance
    speaker_index: torch.Tensor  # (U, 2) (row, position) of each utterance's speaker slot
    target_index: torch.Tensor  # (T, 2) (row, position) of each talker target
    target_labels: torch.Tensor  # (T,) what the talker's output there must predict (already shifted)
    target_utterance: torch.Tensor  # (T,) utterance of each talker target
    predictor_index: torch.Tensor  # (N, 2) (row, position) of each frame's predicting position
    frames: torch.Tensor  # (N, 16) codes of every frame in the batch, same order as predictor_index
    frame_utterance: torch.Tensor  # (N,) utterance of each frame
    cu_seq_lens: torch.Tensor  # (S + 1,) int32 block boundaries over the flattened rows (flash attention varlen)
    max_block: int  # longest block (flash attention varlen)
    shape: BatchShape  # host-side counts: no device sync needed to read them
    # (U,) bool: the utterance's speaker slot keeps its codec id's embedding (a trainable speaker row, see
    # training.speakers.custom_voice) instead of taking `speaker`; None: every slot takes `speaker`
    speaker_learned: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "TalkerBatch":
        kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
        return self._map(lambda t: t.to(device, non_blocking=True), keep=HOST_FIELDS_ON.get(kind, frozenset()))

    def pin_memory(self) -> "TalkerBatch":
        """Page-locked host tensors, so that `to(accelerator)` copies asynchronously."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn, keep: frozenset = frozenset()) -> "TalkerBatch":
        return TalkerBatch(**{f.name: fn(v) if isinstance(v := getattr(self, f.name), torch.Tensor)
                              and f.name not in keep else v for f in fields(self)})

    @property
    def num_frames(self) -> int:
        return self.shape.frames


def collate(sequences: list[list[Sample]], speaker: torch.Tensor, pad_text_id: int,
            speaker_learned: torch.Tensor | None = None) -> TalkerBatch:
    """Rows of packed samples (one sample per row = the unpacked layout), right-padded to the longest row.

    `speaker` holds one x-vector per sample, in row-major sample order (`speaker_learned`: see TalkerBatch).
    """
    rows = [sum(len(s) for s in seq) for seq in sequences]
    b, longest = len(sequences), max(rows)
    text = np.full((b, longest), pad_text_id, dtype=np.int64)
    codec = np.zeros((b, longest, NUM_CODEBOOKS), dtype=np.int64)
    codec_on = np.zeros((b, longest), dtype=bool)
    frame_on = np.zeros((b, longest), dtype=bool)
    positions = np.zeros((b, longest), dtype=np.int64)
    speaker_index, targets, predictors, blocks = [], [], [], []
    for r, seq in enumerate(sequences):
        offset = 0
        for s in seq:
            n = len(s)
            span = slice(offset, offset + n)
            text[r, span], codec[r, span], codec_on[r, span], frame_on[r, span] = (s.text_ids, s.codec_ids,
                                                                                  s.codec_on, s.frame_on)
            positions[r, span] = np.arange(n)
            speaker_index.append((r, offset + s.speaker_pos))
            labelled = np.flatnonzero(s.labels != IGNORE)
            targets.append(np.stack([np.full(len(labelled), r), offset + labelled, s.labels[labelled]], axis=1))
            predictors.append(np.stack([np.full(len(s.predictor_pos), r), offset + s.predictor_pos], axis=1))
            blocks.append(n)
            offset += n
        if longest > offset:  # the padding tail: a block of its own, so it attends only to itself
            positions[r, offset:] = np.arange(longest - offset)
            blocks.append(longest - offset)
    samples = [s for seq in sequences for s in seq]
    target = np.concatenate(targets)
    target_utterance = np.repeat(np.arange(len(samples)), [len(t) for t in targets])
    frame_utterance = np.repeat(np.arange(len(samples)), [len(s.frames) for s in samples])
    cu = np.zeros(len(blocks) + 1, dtype=np.int32)
    np.cumsum(blocks, out=cu[1:])
    shape = batch_shape([[len(s) for s in seq] for seq in sequences], [[len(s.frames) for s in seq]
                                                                       for seq in sequences])
    t = torch.from_numpy
    return TalkerBatch(t(text), t(codec), t(codec_on), t(frame_on),
                       t(positions).unsqueeze(0).expand(3, -1, -1).contiguous(), speaker,
                       torch.tensor(speaker_index, dtype=torch.int64), t(target[:, :2].copy()),
                       t(target[:, 2].copy()), t(target_utterance), t(np.concatenate(predictors)),
                       t(np.concatenate([s.frames for s in samples])), t(frame_utterance), t(cu), max(blocks),
                       shape, speaker_learned)
