"""The encoder runs only the 16 residual quantizers whose codes are kept, and those codes are exactly the first 16
codebooks of upstream's 32-quantizer encode, on the tiny codec and on the released-size architecture (random
weights), for a batch of two clips of different lengths (so padding is part of the check)."""
import numpy as np
import pytest
import torch

from shared.audio import SAMPLES_PER_FRAME
from shared.qwen import kept_codes
from shared.synth import synth_utterance
from shared.tiny_codec import build_codec


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_sixteen_quantizers_give_the_first_sixteen_of_thirty_two(size):
    model = build_codec(size)
    clips = [synth_utterance(1.6, seed=1), synth_utterance(0.9, seed=2)]
    batch = np.zeros((2, 20 * SAMPLES_PER_FRAME), dtype=np.float32)
    for i, clip in enumerate(clips):
        batch[i, : len(clip)] = clip
    values = torch.from_numpy(batch)
    with torch.inference_mode():
        full = model.encoder.encode(input_values=values.unsqueeze(1), return_dict=True).audio_codes
        kept = kept_codes(model, values)
    assert model.encoder_valid_num_quantizers == 16
    assert full.shape[:2] == (2, 32) and kept.shape == (2, 16, full.shape[2])
    assert torch.equal(kept, full[:, :16])
    # Real codes, not a degenerate codebook: every later codebook varies over the frames of the first clip.
    assert all(len(torch.unique(kept[0, q])) > 1 for q in range(1, 16))


def test_sixteen_quantizer_run_skips_the_last_sixteen_layers():
    """The saving is real: the acoustic quantizer layers past the 15th are never run."""
    model = build_codec("tiny")
    acoustic = model.encoder.quantizer.acoustic_residual_vector_quantizer.layers
    assert len(acoustic) == 31  # 1 semantic + 31 acoustic quantizers in the checkpoint
    ran = []
    for i, layer in enumerate(acoustic):  # the residual loop calls each layer's encode()
        layer.encode = (lambda run, i: lambda *a, **k: (ran.append(i), run(*a, **k))[1])(layer.encode, i)
    values = torch.from_numpy(synth_utterance(0.8, seed=3).astype(np.float32))[None]
    with torch.inference_mode():
        kept_codes(model, values)
    assert ran == list(range(15)), ran  # 1 semantic + 15 acoustic = the 16 kept codebooks
