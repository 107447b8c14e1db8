"""A real Ray cluster on loopback for tests: `ray start --head` (and worker nodes) with their own ports,
temp dirs and auth token. Stopped by session of the `ray start` calls we made: never `ray stop`, never a
kill by name, so nobody else's Ray on this machine is touched."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.device import SIMULATED_ACCELERATORS_VAR

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    def __init__(self, simulated_accelerators: bool = True):
        """simulated_accelerators: the fake NPU/GPU resources tests declare are stood in for by the CPU, and the
        encoders placed on them say so (shared.device.SIMULATED_ACCELERATORS_VAR); False tests the refusal."""
        # Unix socket paths are limited to ~107 bytes: keep the temp root short.
        self.root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.token_file = self.root / "token"
        self.token_file.write_text(secrets.token_hex(32))
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop(SIMULATED_ACCELERATORS_VAR, None)
        if simulated_accelerators:
            self.env[SIMULATED_ACCELERATORS_VAR] = "1"
        self.groups: list[int] = []  # one session (pid of its `ray start`) per node: the head first
        self.removed: set[int] = set()
        self.gcs_port = free_port()
        self.dashboard_port = free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray_start(self, args: list[str], temp_dir: Path) -> None:
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--node-ip-address", "127.0.0.1",
                                 "--temp-dir", str(temp_dir), "--disable-usage-stats", *args],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.groups.append(proc.pid)  # every daemon it starts stays in this process group
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{out[-3000:]}")

    def start_head(self, num_cpus: int, resources: dict | None = None) -> "LocalRayCluster":
        self._ray_start(["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                         "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true",
                         "--ray-client-server-port", str(free_port()),
                         "--dashboard-agent-listen-port", str(free_port()),
                         "--num-cpus", str(num_cpus), "--resources", json.dumps(resources or {})],
                        self.root / "head")
        return self

    def add_node(self, num_cpus: int, resources: dict | None = None) -> int:
        """Start a worker node; returns its index for remove_node."""
        index = len(self.groups)
        self._ray_start(["--address", self.address, "--num-cpus", str(num_cpus),
                         "--dashboard-agent-listen-port", str(free_port()),
                         "--resources", json.dumps(resources or {})], self.root / f"node{index}")
        return index

    def remove_node(self, index: int) -> None:
        """The node leaves as a crashed machine would: SIGKILL to every process it runs."""
        _signal_sessions([self.groups[index]], signal.SIGKILL)
        self.removed.add(index)

    @property
    def nodes_alive(self) -> list[int]:
        return [i for i in range(len(self.groups)) if i not in self.removed]

    def node_of_pid(self, pid: int) -> int | None:
        """Which node (index) runs this process: a node's daemons and workers share its session."""
        try:
            session = os.getsid(pid)
        except ProcessLookupError:
            return None
        return self.groups.index(session) if session in self.groups else None

    def driver(self, *args: str, log: Path) -> "Background":
        """`python -m services.encode` connected to this cluster as a plain driver (not a Ray job), so that
        a test holds its pid and can kill it; its actors are owned by it and die with it."""
        return Background([sys.executable, "-m", "services.encode", "--address", self.address, *args],
                          env=self.env, log=log)

    def submit_background(self, *entrypoint: str, log: Path) -> "Background":
        """`ray job submit` that a test can do other things beside (add a node) while the job runs."""
        return Background(self._submit_command(entrypoint), env=self.env, log=log)

    def _submit_command(self, entrypoint) -> list[str]:
        return [str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url, "--working-dir", str(REPO),
                "--", *entrypoint]

    def submit(self, *entrypoint: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self._submit_command(entrypoint), env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)

    def stop(self) -> None:
        stop_sessions(self.groups)
        shutil.rmtree(self.root, ignore_errors=True)


class Background:
    """A command in its own session, output to a file: a test can wait for it with a timeout, kill exactly
    it (SIGKILL to the pid, a fault) and clean up after it (its whole session, nothing else)."""

    def __init__(self, command: list[str], env: dict, log: Path):
        self.log_path = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{self.proc.args[:4]} still running after {timeout} s:\n{self.output[-4000:]}")

    def stop(self) -> None:
        sessions = {self.proc.pid}
        for pid in descendants(self.proc.pid):
            try:
                sessions.add(os.getsid(pid))
            except ProcessLookupError:
                pass
        stop_sessions(sorted(sessions))
        self.proc.wait(timeout=10)

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll `condition` until it returns something truthy (which is returned); fail naming `what`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stop_sessions(sessions: list[int]) -> None:
    """SIGTERM, then SIGKILL, to every process of sessions we started (`start_new_session`), and wait until
    they are gone. By session, not process group: Ray puts each worker in a group of its own, but the worker
    stays in its node's session."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        _signal_sessions(sessions, sig)
        deadline = time.time() + grace
        while time.time() < deadline and session_members(sessions):
            time.sleep(0.2)


def _signal_sessions(sessions: list[int], sig: int) -> None:
    for pid in session_members(sessions):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def session_members(sessions: list[int]) -> list[int]:
    """Live (not zombie) processes whose session is one of `sessions`."""
    return [pid for pid, (state, _, session) in _processes().items() if state != "Z" and session in sessions]


def descendants(pid: int) -> list[int]:
    """Children, grandchildren... of `pid` (torchrun starts each worker in a session of its own)."""
    table = _processes()
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, (_, parent, _) in table.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _processes() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, parent pid, session) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        except OSError:
            continue
        table[int(entry)] = (fields[0], int(fields[1]), int(fields[3]))
    return table
