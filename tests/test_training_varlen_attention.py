"""The varlen attention paths for packed rows: flex_attention over a block mask built from the block boundaries
gives the per-utterance losses and gradients of eager attention on the same packed batch, and the block mask
equals the one torch builds by evaluating the block-diagonal causal rule at every pair."""
import itertools

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from shared.qwen import load_tts_model
from training.model.document_mask import computed_fraction, document_ids, packed_causal_block_mask
from training.model.layout import SpecialIds, build_sample, collate
from training.model.talker import TalkerForTraining
from tests.test_training_packing import ROLE, run


def boundaries(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(n for row in rows for n in row)], dtype=torch.int32)


@pytest.mark.parametrize("rows", [
    [[100, 300, 37], [250, 187]],  # blocks crossing tiles, a row length off the 128 grid
    [[128, 128, 256], [1, 511]],  # blocks on tile edges (full tiles), a one-position block
    [[640]],  # one utterance: plain causal
])
def test_block_mask_equals_the_mask_evaluated_at_every_pair(rows):
    length = sum(rows[0])
    cu = boundaries(rows)
    ours = packed_causal_block_mask(cu, len(rows), length, "cpu")
    docs = document_ids(cu, len(rows), length)
    reference = create_block_mask(lambda b, h, q, kv: (q >= kv) & (docs[b, q] == docs[b, kv]), len(rows), None,
                                  length, length, device="cpu", _compile=False)
    assert torch.equal(ours.to_dense(), reference.to_dense())  # the same computed and full tiles
    for b, h, q, kv in [(0, 0, 5, 3), (len(rows) - 1, 0, length - 1, 0), (0, 0, length - 1, length - 1)]:
        assert bool(ours.mask_mod(*map(torch.tensor, (b, h, q, kv)))) == bool(reference.mask_mod(
            *map(torch.tensor, (b, h, q, kv))))


def test_block_mask_skips_most_tiles_at_the_shipped_pack_length():
    """Four rows of 4096 packed with 150-500-position utterances: most tiles lie between utterances."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(4):
        row = []
        while sum(row) < 4096 - 500:
            row.append(int(rng.integers(150, 500)))
        rows.append(row + [4096 - sum(row)])
    fraction = computed_fraction(packed_causal_block_mask(boundaries(rows), 4, 4096, "cpu"))
    assert fraction < 0.2  # against 0.52 for causal tiles alone (528 of 1024), 1.0 for the dense mask


SIZES = [(9, 150), (30, 90), (4, 160), (12, 200), (7, 120)]  # rows of 300-500 positions: 3-4 tiles each


def test_flex_attention_gives_eager_losses_and_gradients_on_packed_rows(tiny_dir, monkeypatch):
    """Forward through the compiled flex kernel (the CPU has one, forward only); losses and gradients through
    flex_attention's eager implementation, since torch 2.9.1 compiles no flex backward on the CPU (CUDA does)."""
    torch.manual_seed(0)
    eager = load_tts_model(tiny_dir / "model", attn_implementation="eager")
    flex = load_tts_model(tiny_dir / "model", attn_implementation="flex_attention")
    assert flex.talker.config._attn_implementation == "flex_attention"
    assert flex.talker.code_predictor.config._attn_implementation == "sdpa"  # 16 positions, never packed
    ids = SpecialIds.from_config(eager.config)
    rng = np.random.default_rng(0)
    items = [build_sample(ROLE, list(rng.integers(300, 400, size=n)), rng.integers(0, 2048, size=(t, 16)), ids)
             for n, t in SIZES]
    speakers = torch.randn(len(items), eager.config.talker_config.hidden_size)
    batch = collate([items[:3], items[3:]], speakers, ids.tts_pad)
    assert batch.shape.padding > 0 and batch.text_ids.shape[1] > 3 * 128

    reference, reference_grads = run(TalkerForTraining(eager.talker).train(), batch)
    expected = torch.stack([reference.utterance_talker_loss, reference.utterance_sub_loss], 1).detach()
    trainer = TalkerForTraining(flex.talker)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch 2.9.1's compiled CPU flex kernel corrupts the heap at head_dim 16 with >1 thread
    try:
        with torch.no_grad():
            compiled = trainer.eval()(batch)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(torch.stack([compiled.utterance_talker_loss, compiled.utterance_sub_loss], 1),
                               expected, rtol=1e-5, atol=1e-5)

    from transformers.integrations import flex_attention as hf_flex
    monkeypatch.setattr(hf_flex.WrappedFlexAttention, "__call__", lambda self: flex_attention)
    out, grads = run(trainer.train(), batch)
    torch.testing.assert_close(torch.stack([out.utterance_talker_loss, out.utterance_sub_loss], 1), expected,
                               rtol=1e-5, atol=1e-5)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
