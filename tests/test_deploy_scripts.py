"""deploy/'s scripts: every one passes `bash -n`; deploy/submit_encode.sh refuses to run without token auth, then
submits a real encode to a real token-auth cluster; deploy/train_on_shards.sh builds the multi-node torchrun command
and refuses what cannot work."""
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shared.schema import published_shards, read_stats
from tests.conftest import synth_corpus, write_manifest
from tests.raycluster import LocalRayCluster

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SUBMIT = DEPLOY / "submit_encode.sh"


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.sh")), ids=lambda p: p.name)
def test_every_script_parses(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def fake_ray(tmp_path):
    """A `ray` first on PATH that records how it was called, so the script's decisions are visible."""
    record = tmp_path / "ray-call.json"
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump({{'argv': sys.argv[1:], 'auth_mode': os.environ.get('RAY_AUTH_MODE')}}, "
                    f"open({str(record)!r}, 'w'))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    token = tmp_path / "token"
    token.write_text("t" * 64)
    env = {"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
           "HEAD": "10.0.0.1", "RAY_AUTH_TOKEN_PATH": str(token)}

    def run(*args: str, **overrides) -> tuple[subprocess.CompletedProcess, dict | None]:
        full = {k: v for k, v in {**env, **overrides}.items() if v is not None}
        result = subprocess.run(["bash", str(SUBMIT), *args], env=full, capture_output=True, text=True, timeout=30)
        return result, json.loads(record.read_text()) if record.exists() else None

    return run


ENCODE_ARGS = ("--manifest", "/data/m.jsonl", "--codec", "/models/codec", "--output", "/data/out")


def test_submit_passes_the_encode_arguments_through(fake_ray):
    result, call = fake_ray(*ENCODE_ARGS, "--shard-size", "64")
    assert result.returncode == 0, result.stderr
    assert call["argv"] == ["job", "submit", "--address", "http://10.0.0.1:8265", "--working-dir", str(REPO),
                            "--", "python", "-m", "services.encode", *ENCODE_ARGS, "--shard-size", "64"]
    assert call["auth_mode"] == "token"


def test_submit_refuses_auth_disabled(fake_ray):
    result, call = fake_ray(*ENCODE_ARGS, RAY_AUTH_MODE="disabled")
    assert result.returncode != 0 and call is None
    assert "refusing to submit without token authentication" in result.stderr


@pytest.mark.parametrize("case", ["no token anywhere", "token path unreadable"])
def test_submit_refuses_without_a_token(fake_ray, tmp_path, case):
    path = None if case == "no token anywhere" else str(tmp_path / "missing")
    result, call = fake_ray(*ENCODE_ARGS, RAY_AUTH_TOKEN_PATH=path)
    assert result.returncode != 0 and call is None
    assert "token" in result.stderr.lower()


def test_submit_finds_the_default_token_file(fake_ray, tmp_path):
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    (tmp_path / "home" / ".ray" / "auth_token").write_text("t" * 64)
    result, call = fake_ray(*ENCODE_ARGS, RAY_AUTH_TOKEN_PATH=None)
    assert result.returncode == 0, result.stderr
    assert call is not None


def test_submit_refuses_an_open_status_server_without_a_token(fake_ray):
    result, call = fake_ray(*ENCODE_ARGS, "--status-host", "0.0.0.0")
    assert result.returncode != 0 and call is None
    assert "--status-token-file" in result.stderr
    result, call = fake_ray(*ENCODE_ARGS, "--status-host=0.0.0.0", "--status-token-file", "/etc/status-token/token")
    assert result.returncode == 0, result.stderr


def test_submit_encodes_on_a_real_token_cluster(tiny_codec_dir, tmp_path):
    """The script as an operator runs it, against `ray start --head` with token auth and a fake NPU."""
    entries = synth_corpus(tmp_path / "wav", [(0.6 + 0.2 * i, 24_000) for i in range(4)])
    manifest = write_manifest(tmp_path / "raw.jsonl", entries)
    out = tmp_path / "out"
    cluster = LocalRayCluster().start_head(num_cpus=2, resources={"NPU": 1})
    try:
        env = {**cluster.env, "HEAD": "127.0.0.1", "DASHBOARD_PORT": str(cluster.dashboard_port)}
        env.pop("RAY_AUTH_MODE")  # the script sets token mode itself
        result = subprocess.run(["bash", str(SUBMIT), "--manifest", str(manifest), "--codec", str(tiny_codec_dir),
                                 "--output", str(out), "--shard-size", "2", "--status-port", "0"],
                                env=env, capture_output=True, text=True, timeout=300)
    finally:
        cluster.stop()
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "succeeded" in result.stdout + result.stderr
    shards = published_shards(out)
    assert sorted(shards) == [0, 1]
    assert sum(read_stats(p).rows_ok for p in shards.values()) == 4


TRAIN = DEPLOY / "train_on_shards.sh"


def train_on_shards(*args: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    """deploy/train_on_shards.sh with TRAIN_PRINT_ONLY=1: deploy/train.sh prints the torchrun command."""
    full = {"PATH": os.environ["PATH"], "HOME": str(cwd), "TRAIN_PRINT_ONLY": "1", "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(TRAIN), *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=120)


def test_train_on_shards_builds_the_multi_node_command(tmp_path):
    (tmp_path / "out").mkdir()
    result = train_on_shards("out", "train.steps=3", cwd=tmp_path, NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.5",
                             NPUS_PER_NODE="8", CONFIG="config.yaml")
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout.splitlines()[-1])
    assert command[command.index("--nnodes") + 1] == "2" and command[command.index("--node_rank") + 1] == "1"
    assert command[command.index("--master_addr") + 1] == "10.0.0.5"
    assert command[command.index("--nproc_per_node") + 1] == "8"
    # Paths made absolute from where the operator stood (train.sh runs from the repository root).
    assert command[command.index("--config") + 1] == str(tmp_path / "config.yaml")
    overrides = command[command.index("--config") + 2:]
    assert overrides[:2] == [f"data.shards={tmp_path / 'out'}", "train.steps=3"]
    assert "data.follow=true" not in overrides


def test_train_on_shards_follows_a_running_encode(tmp_path):
    result = train_on_shards("/data/not-yet", cwd=tmp_path, FOLLOW="1")
    assert result.returncode == 0, result.stderr
    assert "data.shards=/data/not-yet data.follow=true" in result.stdout


@pytest.mark.parametrize("case", ["missing directory", "no master address", "no directory argument"])
def test_train_on_shards_refuses_what_cannot_work(tmp_path, case):
    (tmp_path / "out").mkdir()
    args, env = {"missing directory": (["absent"], {}), "no master address": (["out"], {"NNODES": "2"}),
                 "no directory argument": (["train.steps=3"], {})}[case]
    result = train_on_shards(*args, cwd=tmp_path, **env)
    assert result.returncode == 2 and "train_on_shards: error:" in result.stderr
    assert "torch.distributed.run" not in result.stdout
