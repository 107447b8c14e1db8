"""Eval samples are bounded: a model that never emits the end code still finishes its eval (2 torchrun ranks,
gloo), each sample at the frame bound of its sentence, the samples after eval.budget_seconds skipped and named."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
from safetensors.torch import load_file, save_file

from training.config import load_config
from training.train.metrics import read_metrics
from training.eval.voice_check import CODEC_FRAMES_PER_SECOND, sentence_frame_bound

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ["hello world", "one two three", "今天天气很好"]


def test_sentence_frame_bound_is_a_slow_reading():
    # 2 s lead-in, then 0.2 s per non-space character, 0.5 s per CJK character, at 12.5 frames/s.
    assert sentence_frame_bound("hello world") == math.ceil((2 + 10 * 0.2) * 12.5)
    assert sentence_frame_bound("今天天气很好") == math.ceil((2 + 6 * 0.5) * 12.5)
    assert sentence_frame_bound("") == 25
    words = "the quick brown fox jumps over the lazy dog "
    assert sentence_frame_bound(words * 4) > sentence_frame_bound(words)


def test_budget_must_fit_inside_the_collective_timeout():
    with pytest.raises(ValueError, match="eval.budget_seconds must be > 0 and below train.timeout_minutes x 60"):
        load_config(None, ["model.path=m", "data.shards=s", "train.timeout_minutes=1", "eval.budget_seconds=90"])
    with pytest.raises(ValueError, match="eval.budget_seconds must be > 0"):
        load_config(None, ["model.path=m", "data.shards=s", "eval.budget_seconds=0"])
    config = load_config(None, ["model.path=m", "data.shards=s", "train.timeout_minutes=2.5", "eval.budget_seconds=90"])
    assert config.train.timeout_minutes == 2.5 and config.eval.budget_seconds == 90.0


@pytest.fixture(scope="module")
def never_stopping_model(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model with the end code's codec-head row zeroed: its logit is 0 while about half of the 2048 codes
    score above 0, so top-k sampling (k=50) never keeps it. Its generation limit is upstream's default, 2048."""
    model = tmp_path_factory.mktemp("never_stops") / "model"
    shutil.copytree(tiny_dir / "model", model)
    eos = json.loads((model / "config.json").read_text())["talker_config"]["codec_eos_token_id"]
    weights = load_file(model / "model.safetensors")
    weights["talker.codec_head.weight"][eos] = 0
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps(generation | {"max_new_tokens": 2048}))
    return model


def test_a_model_that_never_stops_finishes_its_eval(never_stopping_model, synthetic_encoded, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training.train", "--config", str(REPO / "training/configs/tiny.yaml"),
               f"model.path={never_stopping_model}", f"data.shards={synthetic_encoded}", f"checkpoint.dir={run}",
               "train.steps=1", "train.lr=0",  # lr 0: the end code's row stays zero through the step
               "eval.fraction=0.3", f"eval.sentences=[{', '.join(SENTENCES)}]",
               # the first sample always runs; the budget is spent by then, so the other two are skipped
               "eval.budget_seconds=0.001", "train.timeout_minutes=5"]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                            timeout=600, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = read_metrics(run, kind="eval")
    [score] = record["samples"]
    assert score["sentence"] == "hello world" and score["max_new_tokens"] == sentence_frame_bound("hello world")
    # It ran to its bound (the model never stopped), far short of the model's own 2048: upstream's generate
    # completes the residual codes of every sampled first code but the last, so the bound less one frame.
    wav, rate = sf.read(score["path"], dtype="float32")
    assert len(wav) / rate * CODEC_FRAMES_PER_SECOND == pytest.approx(score["max_new_tokens"] - 1)
    assert record["samples_skipped"] == ["default-1", "default-2"]
    assert "eval.budget_seconds=0.001 spent after 1 sample(s)" in result.stderr
    assert "skipped default-1, default-2" in result.stderr
