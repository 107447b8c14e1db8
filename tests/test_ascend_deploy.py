"""deploy/node_env.sh and deploy/train.sh against fake Ascend hosts: a directory standing in for / (QWEN3TTS_SYSROOT)
with CANN in its older (ascend-toolkit/) or newer (cann/) layout or missing, and /dev/davinci* device files.
CANN is found in either layout, a node with devices but no CANN fails with the reason before anything starts,
and train.sh prints the Ascend settings and the torchrun command without running anything (TRAIN_PRINT_ONLY)."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"toolkit": "usr/local/Ascend/ascend-toolkit", "cann": "usr/local/Ascend/cann"}


def fake_host(root: Path, layout: str | None, devices: int) -> Path:
    """A host tree: CANN's set_env.sh in `layout` (None: no CANN) and `devices` /dev/davinciN files."""
    (root / "dev").mkdir(parents=True)
    for i in range(devices):
        (root / "dev" / f"davinci{i}").touch()
    (root / "dev" / "davinci_manager").touch()  # present on real hosts; not a card
    if layout:
        home = root / LAYOUTS[layout]
        home.mkdir(parents=True)
        # Like CANN's script: exports its home and reads a variable that may be unset (the caller's `set -u`).
        (home / "set_env.sh").write_text(f'export ASCEND_HOME_PATH={home}/latest\n'
                                         f'export LD_LIBRARY_PATH={home}/lib64:$LD_LIBRARY_PATH\n')
    return root


def base_env(tmp_path: Path, root: Path, **extra) -> dict:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "QWEN3TTS_SYSROOT": str(root),
           "PYTHON": sys.executable, "PYTHONPATH": str(REPO), **extra}
    return {k: v for k, v in env.items() if v is not None}


def node_env(tmp_path: Path, root: Path, **extra) -> subprocess.CompletedProcess:
    script = f"set -euo pipefail; source {REPO / 'deploy/node_env.sh'}; echo '--- env'; env"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env=base_env(tmp_path, root, QWEN3TTS_ENV_PRINT="1", **extra))


def exported(result: subprocess.CompletedProcess) -> dict[str, str]:
    text = result.stdout.split("--- env\n", 1)[1]
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@pytest.mark.parametrize("layout", ["toolkit", "cann"])
def test_node_env_finds_cann_in_either_layout(tmp_path, layout):
    root = fake_host(tmp_path / "host", layout, devices=8)
    result = node_env(tmp_path, root)
    assert result.returncode == 0, result.stderr
    set_env = root / LAYOUTS[layout] / "set_env.sh"
    assert f"cann: {set_env}" in result.stdout and "ascend devices: 8" in result.stdout
    env = exported(result)
    assert env["ASCEND_HOME_PATH"] == f"{root / LAYOUTS[layout]}/latest"
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["MULTI_STREAM_MEMORY_REUSE"] == "1" and env["ACLNN_CACHE_LIMIT"] == "100000"
    assert "CPU_AFFINITY_CONF" not in env  # npu_affine binds by visible index: every encoder on card 0's cores


def test_node_env_prefers_an_explicit_set_env(tmp_path):
    root = fake_host(tmp_path / "host", "toolkit", devices=2)
    elsewhere = fake_host(tmp_path / "opt", "cann", devices=0) / LAYOUTS["cann"] / "set_env.sh"
    result = node_env(tmp_path, root, ASCEND_SET_ENV=str(elsewhere))
    assert result.returncode == 0, result.stderr
    assert f"cann: {elsewhere}" in result.stdout
    missing = node_env(tmp_path, root, ASCEND_SET_ENV=str(tmp_path / "absent.sh"))
    assert missing.returncode != 0 and "ASCEND_SET_ENV=" in missing.stderr and "does not exist" in missing.stderr


def test_node_with_devices_but_no_cann_fails_with_the_reason(tmp_path):
    root = fake_host(tmp_path / "host", None, devices=4)
    result = node_env(tmp_path, root)
    assert result.returncode != 0
    assert "4 Ascend devices" in result.stderr and "no CANN" in result.stderr
    assert "ascend-toolkit/set_env.sh" in result.stderr and "cann/set_env.sh" in result.stderr
    assert "ASCEND_SET_ENV" in result.stderr  # the fix
    assert "--- env" not in result.stdout  # `source node_env.sh && ray start` stops here


def test_node_without_devices_or_cann_sets_only_token_auth(tmp_path):
    result = node_env(tmp_path, fake_host(tmp_path / "host", None, devices=0))
    assert result.returncode == 0, result.stderr
    env = exported(result)
    assert env["RAY_AUTH_MODE"] == "token" and "cann: none" in result.stdout
    assert not {"ASCEND_HOME_PATH", "TASK_QUEUE_ENABLE", "CPU_AFFINITY_CONF", "ACLNN_CACHE_LIMIT"} & set(env)


def train_print(tmp_path: Path, root: Path, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "deploy/train.sh"), "training/configs/qwen3tts_1.7b.yaml",
                           "data.shards=/data/out"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=base_env(tmp_path, root, TRAIN_PRINT_ONLY="1", **extra))


@pytest.mark.parametrize("layout", ["toolkit", "cann"])
def test_train_sh_on_an_ascend_node_prints_npu_settings(tmp_path, layout):
    root = fake_host(tmp_path / "host", layout, devices=4)
    result = train_print(tmp_path, root, MASTER_ADDR="10.0.0.5", HCCL_SOCKET_IFNAME="eth1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "device: npu"  # found from /dev/davinci*, not guessed from torch
    env = dict(line.split("=", 1) for line in lines[1:-1])
    assert env["ASCEND_HOME_PATH"] == f"{root / LAYOUTS[layout]}/latest"
    assert env["CPU_AFFINITY_CONF"] == "2,npu_affine:1"  # every card visible: visible index = physical card
    assert env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["HCCL_SOCKET_IFNAME"] == "eth1"  # the operator's per-node value goes through
    assert env["MULTI_STREAM_MEMORY_REUSE"] == "1" and env["ACLNN_CACHE_LIMIT"] == "100000"
    assert env["HCCL_BUFFSIZE"] == "400" and env["ASCEND_LAUNCH_BLOCKING"] == "0"
    command = shlex.split(lines[-1])
    assert command[command.index("--nproc_per_node") + 1] == "4"  # one rank per device file
    assert command[-1] == "train.device=npu"


def test_train_sh_topology_binding_can_be_overridden(tmp_path):
    root = fake_host(tmp_path / "host", "cann", devices=2)
    result = train_print(tmp_path, root, TRAIN_CPU_AFFINITY_CONF="2,npu0:0-23,npu1:24-47", NPUS_PER_NODE="2")
    assert result.returncode == 0, result.stderr
    assert "CPU_AFFINITY_CONF=2,npu0:0-23,npu1:24-47" in result.stdout.splitlines()


def test_train_sh_leaves_binding_to_the_ranks_when_they_see_a_subset_of_cards(tmp_path):
    """torch_npu's npu_affine binds by visible index: rank 0 on cards 4-7 would get card 0's cores."""
    root = fake_host(tmp_path / "host", "cann", devices=8)
    result = train_print(tmp_path, root, ASCEND_RT_VISIBLE_DEVICES="4,5,6,7", NPUS_PER_NODE="4")
    assert result.returncode == 0, result.stderr
    env = dict(line.split("=", 1) for line in result.stdout.splitlines()[1:-1])
    assert "CPU_AFFINITY_CONF" not in env and env["ASCEND_RT_VISIBLE_DEVICES"] == "4,5,6,7"


def test_train_sh_on_a_node_with_devices_but_no_cann_fails_before_torchrun(tmp_path):
    result = train_print(tmp_path, fake_host(tmp_path / "host", None, devices=8))
    assert result.returncode != 0
    assert "no CANN" in result.stderr
    assert "torch.distributed.run" not in result.stdout
