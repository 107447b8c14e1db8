"""Training matches inference: greedy generation's codes, replayed through the training forward, are the
argmax of both heads at every frame (the proof that the four upstream bugs are absent). Both codec prefixes are
replayed: inference's "auto" (nothink, think_bos, think_eos) and an explicit language (think, think_bos,
language id, think_eos), which moves the speaker slot and everything after it one position on."""
from typing import NamedTuple

import numpy as np
import pytest
import torch

from shared.qwen import load_inference_model, speaker_mel
from training.layout import IGNORE, SpecialIds, build_sample, collate, load_text_tokenizer, text_token_ids
from training.model import TalkerForTraining, speaker_embedding
from training.synthetic import tone

TEXT = "hello world the quick brown fox"
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module", params=["auto", "english"])
def replay(tiny_dir, request):
    """Greedy non-streaming generation with an x-vector prompt, then our training forward on its codes."""
    language = request.param
    torch.manual_seed(0)
    inference = load_inference_model(tiny_dir / "model")
    model = inference.model
    ref = tone(1.3, seed=5)
    items = inference.create_voice_clone_prompt(ref_audio=(ref, 24000), x_vector_only_mode=True)
    prompt = inference._prompt_items_to_voice_clone_prompt(items)
    input_ids = inference._tokenize_texts([f"<|im_start|>assistant\n{TEXT}<|im_end|>\n<|im_start|>assistant\n"])
    codes, hidden = model.generate(input_ids=input_ids, voice_clone_prompt=prompt, languages=[language],
                              non_streaming_mode=True, do_sample=False, subtalker_dosample=False,
                              repetition_penalty=1.0, max_new_tokens=MAX_NEW_TOKENS)
    codes, hidden = codes[0], hidden[0]  # hidden[j]: the talker state that predicted frame j
    ids = SpecialIds.from_config(model.config)
    role, text_ids = text_token_ids(inference.processor.tokenizer, TEXT)
    xvector = speaker_embedding(model.speaker_encoder, speaker_mel(ref))
    torch.testing.assert_close(xvector, items[0].ref_spk_embedding.float(), rtol=0, atol=1e-6)
    sample = build_sample(role, text_ids, codes.numpy(), ids, language)
    assert sample.speaker_pos == (6 if language == "auto" else 7)
    assert list(sample.codec_ids[3:sample.speaker_pos, 0]) == (
        [ids.codec_nothink, ids.codec_think_bos, ids.codec_think_eos] if language == "auto" else
        [ids.codec_think, ids.codec_think_bos, model.config.talker_config.codec_language_id[language],
         ids.codec_think_eos])
    batch = collate([sample], xvector.unsqueeze(0), ids.tts_pad)
    trainer = TalkerForTraining(model.talker).eval()
    with torch.no_grad():
        out = trainer(batch, return_logits=True)
    return Replay(codes, batch, out, trainer, ids, model, language, hidden, role, text_ids, xvector)


class Replay(NamedTuple):
    codes: torch.Tensor
    batch: object
    out: object
    trainer: TalkerForTraining
    ids: SpecialIds
    model: object
    language: str
    hidden: torch.Tensor  # generation's talker hidden states, one per frame
    role: list
    text_ids: list
    xvector: torch.Tensor


def predicting_hidden(replay: Replay, language: str) -> torch.Tensor:
    """The training forward's talker hidden states at the positions that predict each frame, for `language`."""
    sample = build_sample(replay.role, replay.text_ids, replay.codes.numpy(), replay.ids, language)
    batch = collate([sample], replay.xvector.unsqueeze(0), replay.ids.tts_pad)
    trainer = replay.trainer
    with torch.no_grad():
        hidden = trainer.talker.model(inputs_embeds=trainer.input_embeddings(batch),
                                      attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    return hidden[0, batch.predictor_index[:, 1]]


def test_talker_hidden_states_equal_generation_and_the_other_prefix_differs(replay):
    """Every hidden state generation computed is reproduced (to float rounding) with the row's prefix; the
    other prefix (language id present or absent) shifts them far beyond rounding, so this test tells the two
    apart even where the tiny model's argmax does not."""
    torch.testing.assert_close(predicting_hidden(replay, replay.language), replay.hidden, rtol=0, atol=1e-5)
    other = "auto" if replay.language != "auto" else "chinese"
    assert (predicting_hidden(replay, other) - replay.hidden).abs().max() > 1e-3


def test_generation_is_not_degenerate(replay):
    codes = replay[0]
    assert len(codes) >= 8
    assert len(torch.unique(codes[:, 0])) > 3 and len(torch.unique(codes[:, 1:])) > 20


def test_talker_argmax_reproduces_codebook_0_and_eos(replay):
    codes, batch, out, _, ids, model = replay[:6]
    logits = out.talker_logits[0].clone()
    # Generation never emits special ids other than eos (suppress_tokens), nor eos in its first 2 steps.
    logits[:, 2048:] = float("-inf")
    logits[:, ids.codec_eos] = out.talker_logits[0][:, ids.codec_eos]
    labels = batch.labels[0]
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
    codes, batch, out, *_ = replay
    assert torch.equal(out.sub_logits.argmax(-1), codes[:, 1:])  # 100 % of codebooks 1..15, head k vs codebook k


def test_upstream_hidden_state_bug_would_be_caught(replay):
    """Feeding the hidden state of the frame's own position (upstream bug 4) does not reproduce generation,
    so the exact-match test above distinguishes the right input from the wrong one."""
    codes, batch, _, trainer, *_ = replay
    with torch.no_grad():
        hidden = trainer.talker.model(inputs_embeds=trainer.input_embeddings(batch),
                                      attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
        own = hidden[0, batch.predictor_index[:, 1] + 1]
        logits = trainer.talker.code_predictor.forward_finetune(
            inputs_embeds=trainer.sub_talker_inputs(own, batch.frames)).logits
    assert (logits.argmax(-1) == codes[:, 1:]).float().mean() < 1.0


def test_losses_are_token_sums(replay):
    codes, batch, out, *_ = replay
    assert out.talker_targets == len(codes) + 1  # every frame's c0 plus eos
    assert out.sub_targets == len(codes) * 15
    assert torch.isfinite(out.talker_loss_sum) and torch.isfinite(out.sub_loss_sum)


def test_training_tokenizes_text_exactly_as_inference(tiny_dir):
    inference_tokenizer = load_inference_model(tiny_dir / "model").processor.tokenizer
    training_tokenizer = load_text_tokenizer(tiny_dir / "model")
    for text in (TEXT, "numbers 123 and punctuation, too!", "今天天气很好", "  spaces\tand\nnewlines "):
        assert text_token_ids(training_tokenizer, text) == text_token_ids(inference_tokenizer, text)


def test_padding_does_not_change_any_sample_loss(replay):
    """Right padding, the attention mask, the per-frame predictor index and per-row speaker slots (rows with and
    without a language id mixed): a batch's loss sums are the sums of its samples' losses computed alone."""
    _, batch, _, trainer, ids, model = replay[:6]
    rng = np.random.default_rng(0)
    samples = [build_sample([151644, 358, 198], list(rng.integers(300, 400, size=n)),
                            rng.integers(0, 2048, size=(t, 16)), ids, language)
               for n, t, language in ((2, 5, None), (7, 12, "Chinese"), (4, 1, "auto"))]
    speakers = torch.randn(3, model.config.talker_config.hidden_size)
    with torch.no_grad():
        together = trainer(collate(samples, speakers, ids.tts_pad))
        alone = [trainer(collate([s], speakers[i:i + 1], ids.tts_pad)) for i, s in enumerate(samples)]
    torch.testing.assert_close(together.talker_loss_sum, sum(a.talker_loss_sum for a in alone), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(together.sub_loss_sum, sum(a.sub_loss_sum for a in alone), rtol=1e-5, atol=1e-4)
    assert together.talker_targets == sum(a.talker_targets for a in alone) == 5 + 12 + 1 + 3
