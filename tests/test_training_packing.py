"""Packing: several utterances per row give exactly the per-utterance losses and gradients of each utterance
trained alone (fp32), through transformers' own block-diagonal mask from position ids (sdpa and eager); and
the planner keeps padding small on a realistic length mix."""
import random

import numpy as np
import pytest
import torch

from shared.qwen import load_tts_model
from training.model.layout import SpecialIds, build_sample, collate
from training.model.talker import TalkerForTraining
from training.data.packing import batch_shape, plan_packed, plan_unpacked

ROLE = [151644, 358, 198]
# (text tokens, frames) of five utterances of different lengths
SIZES = [(2, 5), (7, 12), (4, 1), (9, 20), (3, 8)]


def samples(ids):
    rng = np.random.default_rng(0)
    return [build_sample(ROLE, list(rng.integers(300, 400, size=n)), rng.integers(0, 2048, size=(t, 16)), ids)
            for n, t in SIZES]


def gradients(trainer):
    return {n: p.grad.clone() for n, p in trainer.named_parameters() if p.grad is not None}


def run(trainer, batch):
    trainer.zero_grad(set_to_none=True)
    out = trainer(batch)
    (out.talker_loss_sum + 0.3 * out.sub_loss_sum).backward()
    return out, gradients(trainer)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_each_utterances_own_losses_and_gradients(tiny_dir, attention):
    torch.manual_seed(0)
    model = load_tts_model(tiny_dir / "model", attn_implementation=attention)
    ids = SpecialIds.from_config(model.config)
    trainer = TalkerForTraining(model.talker).train()
    items = samples(ids)
    speakers = torch.randn(len(items), model.config.talker_config.hidden_size)

    alone_losses, alone_grads = [], []
    for i, s in enumerate(items):  # the unpacked reference: each utterance in a batch of its own
        out, grads = run(trainer, collate([[s]], speakers[i:i + 1], ids.tts_pad))
        alone_losses.append((out.talker_loss_sum.item(), out.sub_loss_sum.item()))
        alone_grads.append(grads)
    summed = {n: sum(g[n] for g in alone_grads) for n in alone_grads[0]}

    # Two rows of packed utterances, the second shorter (so it has a padding tail of its own).
    rows = [[0, 1, 3], [2, 4]]
    order = [i for row in rows for i in row]  # utterances are numbered row-major
    packed = collate([[items[i] for i in row] for row in rows], speakers[order], ids.tts_pad)
    assert packed.shape.padding > 0 and packed.shape.rows == 2
    out, grads = run(trainer, packed)
    expected = torch.tensor(alone_losses)[order]
    torch.testing.assert_close(torch.stack([out.utterance_talker_loss, out.utterance_sub_loss], 1), expected,
                               rtol=1e-5, atol=1e-5)
    assert out.talker_targets == sum(t + 1 for _, t in SIZES) and out.sub_targets == 15 * sum(t for _, t in SIZES)
    assert grads.keys() == summed.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, summed[name], rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


def test_the_mask_really_separates_utterances(tiny_dir):
    """Control: the second utterance's hidden states equal its own alone only with per-utterance position ids;
    with continuous ones (one block: no packing) they differ, so the equalities above are the mask's doing."""
    model = load_tts_model(tiny_dir / "model", attn_implementation="sdpa")
    ids = SpecialIds.from_config(model.config)
    trainer = TalkerForTraining(model.talker).eval()
    first, second = samples(ids)[:2]
    speakers = torch.randn(2, model.config.talker_config.hidden_size)
    batch = collate([[first, second]], speakers, ids.tts_pad)
    with torch.no_grad():
        alone = trainer.hidden_states(collate([[second]], speakers[1:], ids.tts_pad))[0]
        packed = trainer.hidden_states(batch)[0, len(first):]
        batch.position_ids = torch.arange(len(first) + len(second)).expand_as(batch.position_ids).contiguous()
        joined = trainer.hidden_states(batch)[0, len(first):]
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    assert (joined - alone).abs().max() > 0.1


def realistic_lengths(n, seed=0):
    """Utterance positions for 1-20 s of speech (12.5 frames/s) with 5-60 text tokens, skewed to short clips."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(5.0), 0.6, size=n), 1.0, 20.0)
    return [int(s * 12.5) + int(rng.integers(5, 60)) + 11 for s in seconds]


@pytest.mark.parametrize("budget,pack_length", [(16384, 0), (16384, 4096), (8192, 2048)])
def test_packed_plans_pad_at_most_5_percent(budget, pack_length):
    lengths = realistic_lengths(4000)
    plans = plan_packed(lengths, budget, pack_length, random.Random(0))
    assert sorted(i for plan in plans for seq in plan for i in seq) == list(range(len(lengths)))
    shapes = [batch_shape([[lengths[i] for i in seq] for seq in plan], [[0] * len(seq) for seq in plan])
              for plan in plans]
    assert all(s.positions <= budget for s in shapes)
    assert all(max(s.sequence_lengths) <= (pack_length or budget) for s in shapes)
    computed = sum(s.positions for s in shapes)
    assert sum(s.padding for s in shapes) / computed <= 0.05
    # The bin count is close to the minimum any packing could reach.
    assert len(plans) <= 1.06 * sum(lengths) / budget + 1
    # The unpacked layout on the same lengths, for contrast, pads far more.
    unpacked = plan_unpacked(lengths, budget, 64, 512, random.Random(0))
    unpacked_shapes = [batch_shape([[lengths[i] for i in seq] for seq in plan], [[0]] * len(plan))
                       for plan in unpacked]
    assert sum(s.padding for s in unpacked_shapes) / sum(s.positions for s in unpacked_shapes) > 0.05


def test_plans_are_deterministic_per_seed():
    lengths = realistic_lengths(500)
    assert plan_packed(lengths, 4096, 1024, random.Random(3)) == plan_packed(lengths, 4096, 1024, random.Random(3))
    assert plan_packed(lengths, 4096, 1024, random.Random(3)) != plan_packed(lengths, 4096, 1024, random.Random(4))


def test_sample_builder_turns_shard_rows_into_packed_device_batches(tiny_dir, synthetic_encoded):
    """The data path outside the training loop (e.g. an evaluation): shard rows with codes -> packed batches
    within the budget, every row once, x-vectors from each row's reference, loss sums per batch."""
    from shared import schema
    from training.data.samples import SampleBuilder

    model = load_tts_model(tiny_dir / "model", attn_implementation="sdpa")
    builder = SampleBuilder.for_model(tiny_dir / "model", model)
    rows = [r for path in schema.published_shards(synthetic_encoded).values() for r in schema.read_rows(path)
            if r.ok]
    batches = builder.batches(rows, frame_budget=96, device="cpu")
    assert sum(b.shape.utterances for b in batches) == len(rows) == 10
    assert sum(b.shape.frames for b in batches) == sum(r.num_frames for r in rows)
    assert all(b.shape.positions <= 96 or b.shape.utterances == 1 for b in batches)
    assert any(b.shape.utterances > 1 for b in batches)  # packed
    assert len({tuple(v.tolist()) for b in batches for v in b.speaker}) == 2  # the two references of the data
    trainer = TalkerForTraining(model.talker).eval()
    with torch.no_grad():
        outs = [trainer(b) for b in batches]
    assert sum(o.talker_targets for o in outs) == sum(r.num_frames + 1 for r in rows)
    for o in outs:
        torch.testing.assert_close(o.utterance_talker_loss.sum(), o.talker_loss_sum)


def test_a_batch_moved_to_an_npu_keeps_its_block_boundaries_on_the_host(monkeypatch):
    """torch_npu's varlen attention reads cu_seq_lens on the host in every layer; moved to the NPU it would cost
    a copy and a sync per layer. No NPU here: the same rule is checked on torch's `meta` device."""
    from training.model import layout

    assert layout.HOST_FIELDS_ON["npu"] == {"cu_seq_lens"}
    ids = SpecialIds(tts_pad=1, tts_bos=2, tts_eos=3, codec_pad=4, codec_bos=5, codec_eos=6, codec_nothink=7,
                     codec_think_bos=8, codec_think_eos=9)
    items = samples(ids)
    batch = collate([items[:2], items[2:3]], torch.zeros(3, 8), pad_text_id=ids.tts_pad)
    monkeypatch.setitem(layout.HOST_FIELDS_ON, "meta", layout.HOST_FIELDS_ON["npu"])
    moved = batch.to(torch.device("meta"))
    assert moved.cu_seq_lens.device.type == "cpu" and torch.equal(moved.cu_seq_lens, batch.cu_seq_lens)
    assert moved.text_ids.device.type == "meta" and moved.frames.device.type == "meta"
    assert batch.to("cpu").cu_seq_lens.device.type == "cpu"
