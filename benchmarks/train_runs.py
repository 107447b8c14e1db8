"""What the training benchmarks share: a copy of another revision's code to run "before" beside "after", and
one measured `python -m training.train` run (their shards: benchmarks.inputs.train_shards)."""
from __future__ import annotations

import io
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import REPO, child_env, python, run_measured

# main just before metadata planning, packing and the background input landed (training/ and shared/ as of the
# ShardRow change): the "before" of the training benchmarks.
BEFORE = "c2f8353"


def export_revision(ref: str, work_dir: Path) -> Path:
    """The training code of git revision `ref` (shared/, training/) in a directory of its own, to run as it
    was: `git archive`, so the repository and its worktrees are left untouched."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    target = work_dir / f"revision-{sha}"
    if not (target / "training" / "train.py").is_file():
        archive = subprocess.run(["git", "archive", "--format=tar", sha, "shared", "training"], cwd=REPO,
                                 check=True, capture_output=True).stdout
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(target, filter="data")
    return target


@dataclass
class TrainingRun:
    name: str
    returncode: int
    wall_s: float
    first_step_s: float | None  # from process start to the first metrics line
    peak_rss_gib: float
    records: list[dict] = field(default_factory=list)
    log_tail: str = ""


def run_training(name: str, code_dir: Path, config: Path, overrides: list[str], run_dir: Path, steps: int,
                 threads: int, timeout: float, memory_limit_bytes: int | None = None) -> TrainingRun:
    """`python -m training.train` from `code_dir` (this checkout or an exported revision), one rank, stopped
    once `steps` metrics lines are written."""
    from training.train.metrics import read_metrics

    first: list[float] = []

    def done(elapsed: float) -> bool:
        count = len(read_metrics(run_dir))
        if count and not first:
            first.append(elapsed)
        return count >= steps

    env = child_env(threads, PYTHONPATH=str(code_dir))
    command = [python(), "-m", "training.train", "--config", str(config), *overrides]
    # cwd too: `python -m` puts the working directory first on sys.path.
    measured = run_measured(command, env, timeout, memory_limit_bytes, stop_when=done, cwd=code_dir)
    return TrainingRun(name, measured.returncode, measured.wall_s, first[0] if first else None,
                       measured.peak_rss_bytes / 2**30, read_metrics(run_dir), measured.tail(2000))
