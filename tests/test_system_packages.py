"""deploy/system_packages.sh, the part of tests/run.sh that installs the Debian programs some tests start: it does
nothing when they are on PATH, and without apt-get it fails with the command to run instead of going on."""
import os
import shutil
import subprocess
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "system_packages.sh"


def run_sourced(bin_dir: Path, programs: list[str]) -> subprocess.CompletedProcess:
    """Sourced the way tests/run.sh does (set -euo pipefail) with PATH = bin_dir only: `id` and stand-ins (that
    only exist) for `programs`; no apt-get there."""
    bin_dir.mkdir()
    os.symlink(shutil.which("id"), bin_dir / "id")
    for name in programs:
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / name).chmod(0o755)
    return subprocess.run(["bash", "-c", f'set -euo pipefail; source "{SCRIPT}"; echo after'], capture_output=True,
                          text=True, timeout=30, env={"PATH": str(bin_dir)}, executable=shutil.which("bash"))


def test_does_nothing_when_the_programs_are_on_path(tmp_path):
    started = time.monotonic()
    done = run_sourced(tmp_path / "bin", ["chromium", "prometheus", "promtool", "curl"])
    assert done.returncode == 0 and done.stdout == "after\n" and done.stderr == "", done
    assert time.monotonic() - started < 5


def test_without_apt_get_it_fails_with_the_install_command(tmp_path):
    done = run_sourced(tmp_path / "bin", ["chromium", "prometheus", "curl"])  # promtool missing: the prometheus package
    assert done.returncode == 1 and "after" not in done.stdout, done  # tests/run.sh stops here
    assert done.stderr.count("\n") == 1, done.stderr  # one line
    assert "missing prometheus (no apt-get here)" in done.stderr
    assert "apt-get update && apt-get install -y --no-install-recommends prometheus" in done.stderr
