"""Training matches inference: greedy generation's codes, replayed through the training forward, are the
argmax of both heads at every frame (the proof that the four upstream bugs are absent), alone in its batch and
packed between other utterances (each with its own positions, attending only to itself). Both codec prefixes are
replayed: inference's "auto" (nothink, think_bos, think_eos) and an explicit language (think, think_bos,
language id, think_eos), which moves the speaker slot and everything after it one position on. A text that
starts with a newline is replayed too: the tokenizer merges it with the role's newline, so the role ids are
that prompt's own, not those of any other text."""
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from shared.qwen import load_inference_model, speaker_mel
from shared.schema import ShardRow
from training.model.layout import IGNORE, SpecialIds, build_sample, collate, load_text_tokenizer, text_token_ids
from training.model.talker import TalkerForTraining, speaker_embedding
from training.data.samples import SampleBuilder
from training.data.synthetic import tone

TEXT = "hello world the quick brown fox"
TEXTS = {"plain": TEXT, "newline": "\n" + TEXT}  # "\n" + text: the prompt's third token is a double newline
MAX_NEW_TOKENS = 24


@dataclass
class Replay:
    codes: torch.Tensor  # (T, 16) generated
    sample: object  # its training sample
    batch: object
    out: object  # the forward's output, logits included
    row: int  # where the generated utterance sits in the batch
    offset: int
    utterance: int
    trainer: TalkerForTraining
    ids: SpecialIds
    model: object
    language: str
    hidden: torch.Tensor  # (T, D) generation's talker hidden states: the one that predicted each frame

    @property
    def talker_logits(self):  # (L, vocab) of the generated utterance's positions
        return self.out.talker_logits[self.row, self.offset:self.offset + len(self.sample)]

    @property
    def sub_logits(self):  # (T, 15, 2048) of its frames
        return self.out.sub_logits[self.batch.frame_utterance == self.utterance]


def other_samples(ids, sizes, seed, languages=None):
    rng = np.random.default_rng(seed)
    languages = languages or [None] * len(sizes)
    return [build_sample([151644, 358, 198], list(rng.integers(300, 400, size=n)),
                         rng.integers(0, 2048, size=(t, 16)), ids, language)
            for (n, t), language in zip(sizes, languages)]


@pytest.fixture(scope="module", params=[("auto", "alone"), ("auto", "packed"), ("english", "alone"),
                                        ("english", "packed"), ("auto", "packed", "newline")], ids="-".join)
def replay(tiny_dir, request):
    """Greedy non-streaming generation with an x-vector prompt, then our training forward on its codes (the
    sample built by the training data path's SampleBuilder from a shard row)."""
    language, placement, *which = request.param
    text = TEXTS[which[0] if which else "plain"]
    torch.manual_seed(0)
    inference = load_inference_model(tiny_dir / "model")
    model = inference.model
    ref = tone(1.3, seed=5)
    items = inference.create_voice_clone_prompt(ref_audio=(ref, 24000), x_vector_only_mode=True)
    prompt = inference._prompt_items_to_voice_clone_prompt(items)
    input_ids = inference._tokenize_texts([f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"])
    codes, hidden = model.generate(input_ids=input_ids, voice_clone_prompt=prompt, languages=[language],
                                   non_streaming_mode=True, do_sample=False, subtalker_dosample=False,
                                   repetition_penalty=1.0, max_new_tokens=MAX_NEW_TOKENS)
    codes, hidden = codes[0], hidden[0]
    ids = SpecialIds.from_config(model.config)
    xvector = speaker_embedding(model.speaker_encoder, speaker_mel(ref))
    torch.testing.assert_close(xvector, items[0].ref_spk_embedding.float(), rtol=0, atol=1e-6)
    row = ShardRow(0, "r0", "a.wav", text, "ref.wav", language=language, codes=codes.numpy(),
                   num_frames=len(codes))
    builder = SampleBuilder(load_text_tokenizer(tiny_dir / "model"), ids)
    planned = builder.plan_rows(0, [0], [row])[0]
    sample = builder.sample(planned)
    assert sample.text_ids[:3].tolist() == input_ids[0][0, :3].tolist()  # the role ids inference embedded
    assert sample.speaker_pos == (6 if language == "auto" else 7)
    assert list(sample.codec_ids[3:sample.speaker_pos, 0]) == (
        [ids.codec_nothink, ids.codec_think_bos, ids.codec_think_eos] if language == "auto" else
        [ids.codec_think, ids.codec_think_bos, model.config.talker_config.codec_language_id[language],
         ids.codec_think_eos])
    if placement == "alone":
        rows, where = [[sample]], (0, 0, 0)
    else:  # second in a row of three (neighbours with and without a language), beside a shorter row
        before, after, other = other_samples(ids, [(4, 9), (3, 5), (2, 6)], seed=1,
                                             languages=[None, "Chinese", "auto"])
        rows, where = [[other], [before, sample, after]], (1, len(before), 2)
    speakers = torch.randn(sum(len(r) for r in rows), xvector.shape[0])
    speakers[where[2]] = xvector
    batch = collate(rows, speakers, ids.tts_pad)
    trainer = TalkerForTraining(model.talker).eval()
    with torch.no_grad():
        out = trainer(batch, return_logits=True)
    return Replay(codes, sample, batch, out, *where, trainer, ids, model, language, hidden)


def predicting_hidden(trainer: TalkerForTraining, batch, utterance: int) -> torch.Tensor:
    """The training forward's hidden states at the positions that predict each frame of one utterance."""
    with torch.no_grad():
        hidden = trainer.hidden_states(batch)
    index = batch.predictor_index[batch.frame_utterance == utterance]
    return hidden[index[:, 0], index[:, 1]]


def test_talker_hidden_states_equal_generation_and_the_other_prefix_differs(replay):
    """Every hidden state generation computed is reproduced (to float rounding) with the row's prefix; the
    other prefix (language id present or absent) shifts them far beyond rounding, so the replay tells the two
    apart even where the tiny model's argmax does not."""
    torch.testing.assert_close(predicting_hidden(replay.trainer, replay.batch, replay.utterance), replay.hidden,
                               rtol=0, atol=1e-5)
    text_ids = replay.sample.text_ids
    role = text_ids[:3].tolist()
    text = text_ids[replay.sample.speaker_pos + 2:len(text_ids) - len(replay.codes) - 3].tolist()
    other = build_sample(role, text, replay.codes.numpy(), replay.ids,
                         "auto" if replay.language != "auto" else "chinese")
    batch = collate([[other]], replay.batch.speaker[replay.utterance:replay.utterance + 1], replay.ids.tts_pad)
    assert (predicting_hidden(replay.trainer, batch, 0) - replay.hidden).abs().max() > 1e-3


def test_generation_is_not_degenerate(replay):
    codes = replay.codes
    assert len(codes) >= 8
    assert len(torch.unique(codes[:, 0])) > 3 and len(torch.unique(codes[:, 1:])) > 20


def test_talker_argmax_reproduces_codebook_0_and_eos(replay):
    codes, ids = replay.codes, replay.ids
    logits = replay.talker_logits.clone()
    # Generation never emits special ids other than eos (suppress_tokens), nor eos in its first 2 steps.
    logits[:, 2048:] = float("-inf")
    logits[:, ids.codec_eos] = replay.talker_logits[:, ids.codec_eos]
    labels = torch.from_numpy(replay.sample.labels)
    positions = torch.nonzero(labels != IGNORE).squeeze(1)
    logits[positions[:2], ids.codec_eos] = float("-inf")
    predicted = logits[positions].argmax(-1)
    frame_targets = labels[positions][: len(codes)]
    assert torch.equal(frame_targets, codes[:, 0])  # labels are c0 of the next frame, shifted once
    assert torch.equal(predicted[: len(codes)], codes[:, 0])  # 100 % of codebook 0
    # The last token generate() samples is never fed back, so without eos it returns MAX_NEW_TOKENS - 1 frames.
    if len(codes) < MAX_NEW_TOKENS - 1:  # stopped on eos: the position after the last frame predicts it
        assert predicted[len(codes)].item() == ids.codec_eos


def test_sub_talker_argmax_reproduces_codebooks_1_to_15(replay):
    assert torch.equal(replay.sub_logits.argmax(-1), replay.codes[:, 1:])  # 100 % of codebooks 1..15, head k vs codebook k


def test_upstream_hidden_state_bug_would_be_caught(replay):
    """Feeding the hidden state of the frame's own position (upstream bug 4) does not reproduce generation,
    so the exact-match test above distinguishes the right input from the wrong one."""
    codes, batch, trainer = replay.codes, replay.batch, replay.trainer
    mine = batch.frame_utterance == replay.utterance
    with torch.no_grad():
        hidden = trainer.hidden_states(batch)
        index = batch.predictor_index[mine]
        own = hidden[index[:, 0], index[:, 1] + 1]
        logits = trainer.talker.code_predictor.forward_finetune(
            inputs_embeds=trainer.sub_talker_inputs(own, batch.frames[mine])).logits
    assert (logits.argmax(-1) == codes[:, 1:]).float().mean() < 1.0


def test_losses_are_token_sums(replay):
    codes, batch, out = replay.codes, replay.batch, replay.out
    frames = batch.frames.shape[0]
    assert out.talker_targets == frames + batch.speaker.shape[0]  # every frame's c0 plus one eos per utterance
    assert out.sub_targets == frames * 15
    assert (batch.target_utterance == replay.utterance).sum() == len(codes) + 1
    assert torch.isfinite(out.talker_loss_sum) and torch.isfinite(out.sub_loss_sum)
    torch.testing.assert_close(out.utterance_talker_loss.sum(), out.talker_loss_sum)


def test_training_tokenizes_text_exactly_as_inference(tiny_dir):
    inference_tokenizer = load_inference_model(tiny_dir / "model").processor.tokenizer
    training_tokenizer = load_text_tokenizer(tiny_dir / "model")
    for text in (TEXT, "numbers 123 and punctuation, too!", "今天天气很好", "  spaces\tand\nnewlines "):
        assert text_token_ids(training_tokenizer, text) == text_token_ids(inference_tokenizer, text)


def test_padding_does_not_change_any_sample_loss(replay):
    """Right padding, per-utterance positions and the per-frame predictor index: a batch's loss sums are the sums
    of its samples' losses computed alone, whatever their lengths (tests/test_training_packing.py checks
    gradients too)."""
    trainer, ids, model = replay.trainer, replay.ids, replay.model
    samples = other_samples(ids, ((2, 5), (7, 12), (4, 1)), seed=0)
    speakers = torch.randn(3, model.config.talker_config.hidden_size)
    with torch.no_grad():
        together = trainer(collate([[s] for s in samples], speakers, ids.tts_pad))
        alone = [trainer(collate([[s]], speakers[i:i + 1], ids.tts_pad)) for i, s in enumerate(samples)]
    torch.testing.assert_close(together.talker_loss_sum, sum(a.talker_loss_sum for a in alone), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(together.sub_loss_sum, sum(a.sub_loss_sum for a in alone), rtol=1e-5, atol=1e-4)
    assert together.talker_targets == sum(a.talker_targets for a in alone) == 5 + 12 + 1 + 3
