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
from training.checkpoint.step_folders import STATE_FILE, complete_checkpoints, step_dir_name
from training.train.metrics import read_metrics
from training.data.trace import read_trained_rows

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
    from training.data.synthetic import write_encoded

    return write_encoded(path, tiny_dir / "codec", num_shards=2, rows_per_shard=4, seed=7)


# ------------------------------------------------------------------------------------------------------
# Units: the position and the schedule across layouts, and what a resume refuses (no processes).
# ------------------------------------------------------------------------------------------------------
from tests.test_training_data import builder, encoded, stream  # noqa: E402,F401  (fixtures and helper)


def new_rows(steps) -> list[str]:
    """Row ids of this rank's steps, padding repeats left out."""
    return [p.row.id for step in steps for mb, again in zip(step.micro_batches, step.own_repeated) if not again
            for seq in mb for p in seq]


def test_a_position_taken_on_two_ranks_continues_on_other_layouts(encoded, builder):
    config = dict(frame_budget=40, shards_per_round=2)
    whole = new_rows(stream(encoded, builder, **config).epoch_steps())
    assert len(whole) == len(set(whole)) > 8
    ranks = [stream(encoded, builder, rank=r, world=2, **config).epoch_steps() for r in range(2)]
    before = [[next(steps) for _ in range(3)] for steps in ranks]
    saved = before[0][-1].position.to_dict()
    assert saved == before[1][-1].position.to_dict()  # one global record, whichever rank writes it
    for world, accum in ((1, 1), (3, 2)):
        after = []
        for rank in range(world):
            resumed = stream(encoded, builder, rank=rank, world=world, accum=accum, **config)
            resumed.position = type(resumed.position).from_dict(saved)
            after += new_rows(resumed.epoch_steps())
        trained = new_rows(before[0]) + new_rows(before[1]) + after
        assert sorted(trained) == sorted(whole), (world, accum)  # each row once: none twice, none skipped


def test_the_lr_is_a_function_of_micro_batches_consumed_across_layouts():
    import torch

    from training.config import TrainConfig
    from training.train.schedule import SampleSchedule

    def schedule(per_step):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        made = SampleSchedule(optimizer, TrainConfig(warmup_steps=2, min_lr_ratio=0.1), per_step)
        made.total = 24
        return made

    two = schedule(per_step=4)  # warmup: 8 micro-batches
    lrs = {two.consumed + 4: two.step(4) for _ in range(3)}
    one = schedule(per_step=1)
    one.load_state_dict(two.state_dict())  # warmup stays 8 micro-batches, not 2 of the new steps
    lrs |= {one.consumed + 1: one.step(1) for _ in range(12)}
    assert lrs[4] == 0.5 and lrs[8] == 1.0 and lrs[24] == pytest.approx(0.1)
    for consumed, lr in lrs.items():
        assert lr == one.factor(consumed)
    decay = [lrs[c] for c in sorted(lrs) if c >= 8]
    assert decay == sorted(decay, reverse=True) and len(set(decay)) == len(decay)  # the cosine, without a jump
    legacy = schedule(per_step=2)
    legacy.load_state_dict({"last_epoch": 5, "base_lrs": [1.0]})  # torch's LambdaLR of an older checkpoint
    assert legacy.consumed == 10


def test_an_older_per_rank_checkpoint_resumes_on_its_world_size_only(tmp_path, tiny_dir, synthetic_encoded):
    import torch

    from training.config import load_config
    from training.data.stream import DataPosition
    from training.checkpoint.resume import resume_problem

    config = load_config(REPO / "training/configs/tiny.yaml", [f"model.path={tiny_dir / 'model'}",
                                                                f"data.shards={synthetic_encoded}",
                                                                f"checkpoint.dir={tmp_path}"])
    old = tmp_path / step_dir_name(4)
    old.mkdir()
    for rank in range(2):  # what the per-rank format wrote: no train_state.json
        torch.save({"step": 4, "data": {"epoch": 0, "consumed": [], "round_shards": [1], "step_in_round": 2}},
                   old / f"extra-rank{rank:05d}.pt")
    assert resume_problem(config, world=2) is None
    problem = resume_problem(config, world=1)
    assert "written by 2 rank(s) in an older format" in problem and "--nproc_per_node 2" in problem
    position = DataPosition.from_dict(torch.load(old / "extra-rank00001.pt")["data"], legacy_per_step=2)
    assert (position.round_shards, position.round_micro_batches) == ([1], 4)  # 2 steps of 2 ranks
