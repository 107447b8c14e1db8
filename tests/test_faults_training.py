"""A training rank SIGKILLed mid-run under `torchrun --max-restarts 1`: the elastic agent restarts both ranks,
they resume from the last complete checkpoint and finish, and the steps redone after the checkpoint give
exactly the losses the killed attempt logged for them (fp32 on CPU is deterministic)."""
import os
import signal
import sys

from tests.raycluster import Background, descendants, wait_for
from tests.test_training_distributed import ENV, train_command
from training.checkpoint.step_folders import complete_checkpoints
from training.train.metrics import read_metrics

STEPS, INTERVAL = 8, 4


def rank_pid(launcher: int, rank: int) -> int | None:
    """The first attempt's worker process of `rank`: a child of the torchrun launcher whose environment says so."""
    for pid in descendants(launcher):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if environ.get(b"RANK") == str(rank).encode() and environ.get(b"TORCHELASTIC_RESTART_COUNT") == b"0":
            return pid
    return None


def last_step(run) -> int:
    return max((r["step"] for r in read_metrics(run)), default=0)


def test_killed_rank_is_restarted_and_resumes_from_the_last_complete_checkpoint(tiny_dir, synthetic_encoded,
                                                                                  tmp_path):
    run = tmp_path / "run"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1"]
    command = [sys.executable, *launcher, *train_command(tiny_dir, synthetic_encoded, run), f"train.steps={STEPS}",
               f"checkpoint.interval={INTERVAL}"]
    with Background(command, env=ENV, log=tmp_path / "torchrun.log") as torchrun:
        # Into the steps after the first checkpoint, so that the restart has steps to redo.
        wait_for(lambda: last_step(run) > INTERVAL, 180, f"step {INTERVAL + 1}", interval=0.05)
        os.kill(wait_for(lambda: rank_pid(torchrun.pid, 1), 30, "rank 1's process"), signal.SIGKILL)
        killed_after, checkpoint = last_step(run), max(complete_checkpoints(run))
        assert torchrun.wait(timeout=240) == 0, torchrun.output[-4000:]
    log = torchrun.output
    assert checkpoint == INTERVAL and killed_after < STEPS, "rank 1 must be killed between the two checkpoints"
    assert "restart" in log.lower() and f"resumed from {run / f'step-{checkpoint:06d}'}" in log, log[-4000:]
    assert STEPS in complete_checkpoints(run)
    attempts: dict[int, list[dict]] = {}
    for record in read_metrics(run):
        attempts.setdefault(record["step"], []).append(record)
    assert sorted(attempts) == list(range(1, STEPS + 1))
    redone = sorted(step for step, records in attempts.items() if len(records) > 1)
    assert redone == list(range(checkpoint + 1, killed_after + 1)), "the restart must resume right after the checkpoint"
    for step in redone:
        first, again = attempts[step]
        assert (first["loss"], first["grad_norm"]) == (again["loss"], again["grad_norm"]), f"step {step} differs"
