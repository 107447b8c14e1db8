"""A run killed after a checkpoint and resumed on another layout (world size, grad_accum) trains the same epoch
from the same place: over the whole run, every row once per epoch (padding repeats aside), exactly as an
uninterrupted run; the lr follows the same curve over micro-batches consumed; metrics.jsonl alone accounts for
each epoch. A resume that would change the data plan is refused with the reason.

Real processes (torchrun with gloo for 2 ranks, plain python for 1), the tiny model, the synthetic shards: two
shards of 5 good rows, one shard per round, ~2 utterances per micro-batch, so each round plans 3 micro-batches
(odd: 2 ranks pad each round's last step with a repeat) and the kills land mid-round."""
import json
import subprocess
import sys
import time
from collections import Counter

import pytest

from tests.conftest import kill_tree
from tests.test_training_distributed import ENV, REPO, train_command
from training.checkpoint import STATE_FILE, complete_checkpoints, step_dir_name
from training.metrics import read_metrics
from training.trace import read_trained_rows

EPOCHS, ROWS_PER_EPOCH = 2, 10
SETTINGS = ["train.steps=0", f"train.epochs={EPOCHS}", "train.warmup_steps=0", "data.shards_per_round=1",
            "data.frame_budget=64", "data.pack_length=0", "data.trace_rows=true"]


def launch(tiny_dir, data, run, nproc: int, accum: int, interval: int) -> list[str]:
    return [sys.executable, *train_command(tiny_dir, data, run, nproc=nproc if nproc > 1 else 0), *SETTINGS,
            f"train.grad_accum={accum}", f"checkpoint.interval={interval}"]


def run_to_end(command, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=ENV, timeout=timeout, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def kill_after_first_checkpoint(command, run) -> int:
    """Start `command`, SIGKILL it (torchrun and its ranks) once its first checkpoint is complete; that step."""
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not complete_checkpoints(run) and proc.poll() is None:
            time.sleep(0.05)
    finally:
        kill_tree(proc)
    found = complete_checkpoints(run)
    assert len(found) == 1, f"the run must be killed between its first two checkpoints, it has {sorted(found)}"
    return max(found)


def trained(run) -> Counter:
    """(row id, epoch) -> how often the run's kept steps trained it, padding repeats left out."""
    counts = Counter()
    for record in read_trained_rows(run):
        counts += Counter((row, record["epoch"]) for row in record["rows"])
        counts -= Counter((row, record["epoch"]) for row in record["repeated"])
    return counts


def kept_records(run) -> list[dict]:
    """The last metrics line of each step up to the run's final checkpoint (a resumed run re-logs the steps after
    the checkpoint it resumed from; a killed attempt may have logged steps past the resumed run's end)."""
    final = max(complete_checkpoints(run))
    return sorted({r["step"]: r for r in read_metrics(run) if r["step"] <= final}.values(), key=lambda r: r["step"])


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, synthetic_encoded, tmp_path_factory):
    run = tmp_path_factory.mktemp("layout") / "uninterrupted"
    run_to_end(launch(tiny_dir, synthetic_encoded, run, nproc=1, accum=1, interval=100))
    return run


# (ranks, grad_accum, checkpoint interval) before the kill, then (ranks, grad_accum) of the resume. The intervals
# put the first checkpoint mid-round: after step 3 of 2 ranks (5 micro-batches), after step 5 of 1 rank. The
# reverse also changes grad_accum (steps of 1 micro-batch, then of 4: 3 of them repeats at a round's end).
LAYOUTS = {"2_ranks_to_1": ((2, 1, 3), (1, 1)), "1_rank_to_2_and_grad_accum_1_to_2": ((1, 1, 5), (2, 2))}


@pytest.mark.parametrize("change", list(LAYOUTS))
def test_resume_on_another_layout_trains_every_row_once_per_epoch(change, tiny_dir, synthetic_encoded,
                                                                  uninterrupted, tmp_path):
    (ranks, accum, interval), (new_ranks, new_accum) = LAYOUTS[change]
    run = tmp_path / "run"
    checkpoint = kill_after_first_checkpoint(launch(tiny_dir, synthetic_encoded, run, ranks, accum, interval), run)
    state = json.loads((run / step_dir_name(checkpoint) / STATE_FILE).read_text())
    assert state["data"]["round_micro_batches"] > 0, "the kill must land mid-round"
    result = run_to_end(launch(tiny_dir, synthetic_encoded, run, new_ranks, new_accum, interval))
    assert f"resumed from {run / step_dir_name(checkpoint)}" in result.stderr

    expected = trained(uninterrupted)
    assert sorted(Counter(row for row, _ in expected).values()) == [EPOCHS] * ROWS_PER_EPOCH
    assert trained(run) == expected  # no row twice, none skipped, in either epoch
    if 2 in (ranks, new_ranks) or new_accum > 1:  # padded steps: their repeats are in the trace, named
        assert any(record["repeated"] for record in read_trained_rows(run))

    # metrics.jsonl alone: utterances - repeated over an epoch's steps is the epoch's rows; the lr is the same
    # function of micro-batches consumed as in the uninterrupted run, down to the floor at the end.
    records, reference = kept_records(run), {r["consumed_micro_batches"]: r["lr"] for r in read_metrics(uninterrupted)}
    for epoch in range(EPOCHS):
        assert sum(r["utterances"] - r["repeated"] for r in records if r["epoch"] == epoch) == ROWS_PER_EPOCH
    assert records[-1]["consumed_micro_batches"] == max(reference)
    assert [r["lr"] for r in records] == [reference[r["consumed_micro_batches"]] for r in records]
    assert records[-1]["lr"] == pytest.approx(1e-4)  # train.lr 1e-3 x min_lr_ratio 0.1

    if change == "2_ranks_to_1":  # a resume that would change the data plan is refused, naming why
        refused = subprocess.run([*launch(tiny_dir, synthetic_encoded, run, 1, 1, interval), "data.pack_length=32"],
                                 cwd=REPO, env=ENV, timeout=120, capture_output=True, text=True)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "data.pack_length=32 (was 0)" in refused.stderr and "start a new checkpoint.dir" in refused.stderr
        other = write_other_data(tiny_dir, tmp_path / "other")
        refused = subprocess.run(launch(tiny_dir, other, run, 1, 1, interval), cwd=REPO, env=ENV, timeout=240,
                                 capture_output=True, text=True)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "plan into other micro-batches than when the checkpoint was written" in refused.stderr


def write_other_data(tiny_dir, path):
    from training.synthetic import write_encoded

    return write_encoded(path, tiny_dir / "codec", num_shards=2, rows_per_shard=4, seed=7)
