"""The typed training config: YAML + dotted overrides, validated."""
from pathlib import Path

import pytest

from training.config import dump_config, load_config, parse_override

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


@pytest.mark.parametrize("name", ["qwen3tts_1.7b.yaml", "qwen3tts_0.6b.yaml"])
def test_shipped_configs_have_the_corrected_upstream_values(name):
    c = load_config(CONFIGS / name)
    assert (c.fsdp.param_dtype, c.fsdp.reduce_dtype) == ("bfloat16", "float32")
    assert 2e-6 <= c.train.lr <= 2e-5
    assert (c.train.weight_decay, c.train.grad_clip, c.train.sub_talker_weight) == (0.01, 1.0, 0.3)


def test_overrides_are_typed_and_nested():
    c = load_config(CONFIGS / "tiny.yaml", ["train.lr=2e-5", "data.follow=true", "train.betas=[0.9, 0.95]",
                                            "data.shards=/data/out", "checkpoint.keep=5"])
    assert c.train.lr == 2e-5 and isinstance(c.train.lr, float)
    assert c.data.follow is True and c.train.betas == (0.9, 0.95)
    assert c.data.shards == "/data/out" and c.checkpoint.keep == 5
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key train.lrr"),
    ("train.steps=many", "train.steps: expected an integer"),
    ("data.follow=maybe", "data.follow: expected true/false"),
    ("train.lr_schedule=linear", "train.lr_schedule must be one of"),
    ("fsdp.param_dtype=fp8", "fsdp.param_dtype must be one of"),
    ("train.grad_accum=0", "train.grad_accum must be >= 1"),
    ("data.pack_length=100000", "data.pack_length must not exceed data.frame_budget"),
    ("noequals", "is not key=value"),
])
def test_bad_values_are_rejected(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_model_and_data_are_required(tmp_path):
    with pytest.raises(ValueError, match="model.path is required.*data.shards is required"):
        load_config(None, ["train.steps=1"])


def test_dumped_config_reloads_identically(tmp_path):
    c = load_config(CONFIGS / "qwen3tts_1.7b.yaml", ["train.seed=9"])
    dump_config(c, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == c
