"""A training command with a bad input stops before the heavy start-up with one line (printed once, even under
torchrun), exit code 2, and nothing written: no run folder, no config.yaml."""
import os
import subprocess
import sys

import pytest

from training.train.validate import TrainingInputProblem, validate
from tests.test_training_distributed import ENV, REPO

TINY = str(REPO / "training/configs/tiny.yaml")


@pytest.fixture
def good(tiny_dir, synthetic_encoded, tmp_path) -> list[str]:
    return [f"model.path={tiny_dir / 'model'}", f"data.shards={synthetic_encoded}", f"checkpoint.dir={tmp_path / 'run'}"]


def problem(overrides: list[str], config: str | None = TINY) -> str:
    with pytest.raises(TrainingInputProblem) as caught:
        validate(config, overrides)
    return str(caught.value)


def test_a_good_command_passes(good):
    assert validate(TINY, good).data.follow is False


def test_mistyped_keys_get_a_suggestion(good, tmp_path):
    assert "unknown config key train.lrr (override 'train.lrr=1'); did you mean train.lr?" in problem([*good, "train.lrr=1"])
    assert "did you mean data.shards?" in problem([*good, "data.shard=/x"])
    assert "did you mean train.warmup_steps?" in problem([*good, "trian.warmup_steps=3"])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  stepz: 3\n")
    assert f"unknown config key train.stepz ({yaml_file}); did you mean train.steps?" in problem(good, str(yaml_file))
    assert "train.steps: expected an integer" in problem([*good, "train.steps=many"])


def test_model_and_shards_paths_are_checked(good, tiny_dir, tmp_path):
    model, shards, run = good
    assert "model.path=/nowhere/model: no such directory; point model.path at" in problem(["model.path=/nowhere/model",
                                                                                         shards, run])
    assert "model.path" in problem([f"model.path={tiny_dir}", shards, run]) and "no config.json" in problem(
        [f"model.path={tiny_dir}", shards, run])
    empty = tmp_path / "empty"
    (empty / "shards").mkdir(parents=True)
    message = problem([model, f"data.shards={empty}", run])
    assert message.startswith(f"data.shards={empty}: no published shards yet; run the encode service first")
    assert "data.follow=true" in message
    assert validate(TINY, [model, f"data.shards={empty}", run, "data.follow=true"]).data.follow  # follow may wait
    assert "not an encode output directory" in problem([model, f"data.shards={tmp_path}", run])
    assert "no such directory" in problem([model, "data.shards=/nowhere/out", run])


def test_under_torchrun_one_line_once_exit_2_and_nothing_written(good, tmp_path):
    model, shards, _ = good
    run = tmp_path / "never"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "training.train",
         "--config", TINY, model, shards, f"checkpoint.dir={run}", "train.lrr=1"],
        cwd=REPO, env={**ENV, "MASTER_PORT": str(21000 + os.getpid() % 20000)}, capture_output=True, text=True,
        timeout=240)
    output = result.stdout + result.stderr
    line = "error: unknown config key train.lrr (override 'train.lrr=1'); did you mean train.lr?"
    assert result.returncode != 0 and output.count(line) == 1, output[-3000:]
    assert "exitcode  : 2" in output  # torchrun's summary carries our exit code
    assert "training/train/loop.py" not in output and "training/train/validate.py" not in output  # no rank's traceback
    assert not run.exists()

    plain = subprocess.run([sys.executable, "-m", "training.train", "--config", TINY, "model.path=/nowhere", shards,
                            f"checkpoint.dir={run}"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert plain.returncode == 2 and plain.stderr.strip().splitlines()[-1].startswith("error: model.path=/nowhere: ")
    assert not run.exists()


def test_flex_attention_off_cuda_is_one_line(good):
    """torch compiles no flex backward for a CPU: refused before the run folder exists, with the fix."""
    line = problem([*good, "model.attn_implementation=flex_attention", "train.device=cpu"])
    assert "flex_attention trains on CUDA only" in line and "model.attn_implementation=auto" in line
    assert "\n" not in line
