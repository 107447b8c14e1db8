"""Real `torchrun --standalone --nproc_per_node 2` runs on CPU (gloo) over encoded shards: the loss goes down,
checkpoints appear (the last `keep`), a killed run resumes to exactly the losses of an uninterrupted one, and the
exported model loads and generates."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shared.qwen import load_inference_model
from tests.conftest import kill_tree
from training.checkpoint.step_folders import complete_checkpoints
from training.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
STEPS = 8


def train_command(tiny_dir: Path, data: Path, run: Path, nproc: int = 0) -> list[str]:
    """Arguments after the Python executable; nproc > 0 launches through torchrun."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc else []
    return [*launcher, "-m", "training.train", "--config", str(REPO / "training/configs/tiny.yaml"),
            f"model.path={tiny_dir / 'model'}", f"data.shards={data}", f"checkpoint.dir={run}"]


def torchrun(tiny_dir, data, run, *overrides, timeout=240):
    return subprocess.run([sys.executable, *train_command(tiny_dir, data, run, nproc=2), *overrides],
                          cwd=REPO, env=ENV, timeout=timeout, capture_output=True, text=True)


def losses_by_step(run: Path) -> dict[int, tuple]:
    """The last record per step (a resumed run re-logs the steps after its checkpoint)."""
    return {r["step"]: (r["loss"], r["talker_loss"], r["sub_talker_loss"], r["grad_norm"]) for r in read_metrics(run)}


def kill_after_step(command: list[str], run: Path, step: int, env: dict = ENV, timeout: float = 180) -> int:
    """Start the training command, SIGKILL torchrun and its ranks once `step` is logged (in `run`'s metrics);
    the last logged step."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and max(losses_by_step(run), default=0) < step:
            time.sleep(0.05)
    finally:
        kill_tree(proc)  # mid-training
    return max(losses_by_step(run), default=0)


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, synthetic_encoded, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "uninterrupted"
    result = torchrun(tiny_dir, synthetic_encoded / "shards", run, f"train.steps={STEPS}", "checkpoint.interval=2")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_loss_goes_down_and_metrics_are_complete(uninterrupted):
    records = read_metrics(uninterrupted)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1
    for r in records:
        assert r["loss"] == pytest.approx(r["talker_loss"] + 0.3 * r["sub_talker_loss"])
        assert r["frames_per_s"] > 0 and r["step_time_s"] > 0 and r["peak_memory_bytes"] > 0
        assert r["grad_norm"] > 0 and r["lr"] > 0
        # Throughput from the plan's host-side shapes: every computed position, the padded share of them,
        # time spent waiting for input, and FLOP/s (no mfu on a CPU: there is no peak to divide by).
        assert r["tokens"] > r["frames"] > 0 and r["utterances"] > 0 and 0 <= r["padding_fraction"] < 0.5
        assert r["data_wait_s"] >= 0 and r["tflops"] > 0 and r["mfu"] is None


def test_checkpoints_keep_the_last_two_complete_folders(uninterrupted):
    assert sorted(complete_checkpoints(uninterrupted)) == [STEPS - 2, STEPS]
    final = uninterrupted / f"step-{STEPS:06d}"
    assert (final / ".metadata").exists()
    assert sorted(p.name for p in final.glob("extra-rank*.pt")) == ["extra-rank00000.pt", "extra-rank00001.pt"]
    assert not list(uninterrupted.glob(".step-*"))  # no temporary left behind


def test_killed_run_resumes_to_exactly_the_same_losses(tiny_dir, synthetic_encoded, uninterrupted, tmp_path):
    run = tmp_path / "killed"
    command = [sys.executable, *train_command(tiny_dir, synthetic_encoded, run, nproc=2), f"train.steps={STEPS}",
               "checkpoint.interval=2"]  # the output directory this time, not shards/: both are accepted
    killed_at = kill_after_step(command, run, 3)
    assert 3 <= killed_at < STEPS, "the run must be killed part-way through"
    assert STEPS not in complete_checkpoints(run)

    result = subprocess.run(command, cwd=REPO, env=ENV, timeout=240, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert losses_by_step(run) == losses_by_step(uninterrupted)  # bit-exact: fp32 on CPU


def test_exported_base_model_loads_and_generates(uninterrupted, synthetic_encoded, tmp_path):
    out = tmp_path / "base"
    subprocess.run([sys.executable, "-m", "training.export", "--checkpoint", str(uninterrupted / f"step-{STEPS:06d}"),
                    "--output", str(out)], cwd=REPO, env=ENV, check=True, timeout=120, capture_output=True)
    config = json.loads((out / "config.json").read_text())
    assert config["tts_model_type"] == "base"
    tts = load_inference_model(out)
    ref = str(synthetic_encoded / "audio" / "ref_a.wav")
    wavs, rate = tts.generate_voice_clone(text="hello world", ref_audio=ref, x_vector_only_mode=True,
                                          max_new_tokens=6)
    assert rate == 24000 and len(wavs[0]) > 0 and np.isfinite(wavs[0]).all()


def test_two_ranks_equal_one_rank_accumulating_the_same_micro_batches(tiny_dir, synthetic_encoded, uninterrupted,
                                                                       tmp_path):
    """The loss is a global token mean and the gradient norm is taken across ranks: 2 ranks x 1 micro-batch and
    1 rank x 2 accumulated micro-batches see the same batches per step and must agree (up to summation order)."""
    run = tmp_path / "one_rank"
    subprocess.run([sys.executable, *train_command(tiny_dir, synthetic_encoded / "shards", run), f"train.steps={STEPS}",
                    "checkpoint.interval=2", "train.grad_accum=2"], cwd=REPO, env=ENV, check=True, timeout=240,
                   capture_output=True)
    one, two = read_metrics(run), read_metrics(uninterrupted)
    assert [r["frames"] for r in one] == [r["frames"] for r in two]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["talker_loss"] == pytest.approx(b["talker_loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
