"""deploy/train.sh: wraps torchrun from NPUS_PER_NODE/NNODES/...; Ascend variables only on an NPU."""
import math
import os
import subprocess
import sys

import torch
from torch.distributed.checkpoint import FileSystemReader

from training.checkpoint.step_folders import complete_checkpoints
from training.train.metrics import read_metrics

from tests.test_training_distributed import ENV, REPO

ASCEND_VARS = ("HCCL_CONNECT_TIMEOUT", "HCCL_BUFFSIZE", "ASCEND_LAUNCH_BLOCKING", "TASK_QUEUE_ENABLE",
               "CPU_AFFINITY_CONF", "PYTORCH_NPU_ALLOC_CONF", "COMBINED_ENABLE")


def launch(*args, **env):
    clean = {k: v for k, v in ENV.items() if k not in ASCEND_VARS}
    return subprocess.run(["bash", str(REPO / "deploy/train.sh"), *args], cwd=REPO, capture_output=True, text=True,
                          env={**clean, "PYTHON": sys.executable, **env}, timeout=240)


def test_cpu_launch_sets_no_ascend_variables_and_builds_the_torchrun_command():
    out = launch("training/configs/tiny.yaml", "train.steps=2", TRAIN_PRINT_ONLY="1", NNODES="2", NODE_RANK="1",
                 MASTER_ADDR="10.1.2.3", MASTER_PORT="29555", NPUS_PER_NODE="4")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("device: cpu")
    assert not any(name in out.stdout for name in ASCEND_VARS)
    for part in ("--nnodes 2", "--node_rank 1", "--nproc_per_node 4", "--master_addr 10.1.2.3",
                 "--master_port 29555", "-m training.train --config training/configs/tiny.yaml train.steps=2"):
        assert part in out.stdout


def test_train_sh_runs_two_cpu_ranks_in_bf16_with_activation_checkpointing(tiny_dir, synthetic_encoded, tmp_path):
    """The 1.7B settings on the tiny model: bf16 compute, fp32 master weights, recompute, accumulation."""
    run = tmp_path / "run"
    out = launch("training/configs/tiny.yaml", f"model.path={tiny_dir / 'model'}", f"data.shards={synthetic_encoded}",
                 f"checkpoint.dir={run}", "train.steps=2", "fsdp.param_dtype=bfloat16",
                 "fsdp.activation_checkpointing=true", "train.grad_accum=2",
                 NPUS_PER_NODE="2", MASTER_PORT=str(20000 + os.getpid() % 20000))
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(complete_checkpoints(run)) == [2]
    records = read_metrics(run)
    assert [r["micro_batches"] for r in records] == [2, 2] and all(math.isfinite(r["loss"]) for r in records)
    metadata = FileSystemReader(str(run / "step-000002")).read_metadata().state_dict_metadata
    weights = {k: v.properties.dtype for k, v in metadata.items() if k.startswith("model.")}
    assert weights and set(weights.values()) == {torch.float32}  # master weights stay fp32
    assert sorted(p.name for p in (run / "step-000002").glob("extra-rank*")) == ["extra-rank00000.pt",
                                                                              "extra-rank00001.pt"]
