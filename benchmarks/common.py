"""What every benchmark shares: flags, the machine description, measured subprocesses, tables and JSON.

Every flow a benchmark compares runs in its own child process, measured the same way (wall time, peak RSS
of the whole process tree, CPU seconds of the tree), so memory and CPU figures are comparable between an
in-process loop and a Ray job that spawns a dozen processes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "qwen3tts-bench"
GIB = 2**30


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "npu"), default="auto")
    p.add_argument("--quick", action="store_true", help="smaller sizes: a 1-3 minute run on a 2-core CPU box")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                   help="generated inputs are cached here between runs (keyed by their parameters)")
    return p


def add_corpus_args(p: argparse.ArgumentParser, clips: int) -> None:
    """The generated corpus and codec of the encode benchmarks, and the torch threads of each encoder."""
    p.add_argument("--clips", type=int, default=clips)
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--max-seconds", type=float, default=20.0)
    p.add_argument("--codec-size", choices=("tiny", "full"), default="full")
    p.add_argument("--threads", type=int, default=1, help="torch threads per encoder (the same in every flow)")


def timed_calls(seconds: dict, name: str, fn):
    """`fn`, adding the wall time of each call to seconds[name]."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start
    return wrapper


def resolve_device(preference: str) -> dict:
    """The device kind, how many accelerators this host has and their name (for MFU and the report)."""
    from shared.device import resolve_kind

    kind = resolve_kind(preference)
    info = {"kind": kind, "count": 0, "name": platform.processor() or "cpu"}
    if kind == "cuda":
        import torch
        info.update(count=torch.cuda.device_count(), name=torch.cuda.get_device_name(0))
    elif kind == "npu":
        import torch
        info.update(count=torch.npu.device_count(), name=torch.npu.get_device_name(0))
    return info


def machine_info(device: dict | None = None) -> dict:
    model = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                  if line.startswith("model name")), platform.processor())
    import torch
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "nproc": os.cpu_count(),
            "cpu_model": model, "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "device": device or {}}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def child_env(threads: int, **extra: str) -> dict:
    """Environment for a measured child: the same thread count for every flow, never someone else's Ray."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "RAY_ADDRESS": "", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra)
    return env


@dataclass
class Measured:
    """One child process run: its exit, wall time, and the peaks of its whole process tree."""
    command: list[str]
    returncode: int
    wall_s: float
    peak_rss_bytes: int  # peak of the summed RSS of the tree (shared pages count once per process)
    peak_single_rss_bytes: int  # the largest single process of the tree
    cpu_s: float  # user + system seconds of every process of the tree
    killed_for_memory: bool = False
    stdout: str = field(default="", repr=False)
    stderr: str = field(default="", repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("stdout"), d.pop("stderr")
        return d

    def tail(self, chars: int = 3000) -> str:
        return (self.stdout + "\n" + self.stderr)[-chars:]


class _TreeSampler(threading.Thread):
    """Samples the RSS and CPU time of a process and all its descendants every `interval` seconds."""

    def __init__(self, root: psutil.Process, interval: float, memory_limit: int | None):
        super().__init__(daemon=True)
        self.root, self.interval, self.memory_limit = root, interval, memory_limit
        self.peak = self.peak_single = 0
        self.cpu: dict[int, float] = {}  # last seen user+system seconds per pid (exited ones keep their last)
        self.killed_for_memory = False
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    times = p.cpu_times()
                except psutil.Error:
                    continue
                total += rss
                self.peak_single = max(self.peak_single, rss)
                self.cpu[p.pid] = times.user + times.system
            self.peak = max(self.peak, total)
            if self.memory_limit and total > self.memory_limit and not self.killed_for_memory:
                # Other people share this machine: stop our own tree before the kernel's OOM killer picks anyone.
                self.killed_for_memory = True
                _kill_group(self.root.pid)
            self.done.wait(self.interval)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the child was started in its own session: its group is ours alone
    except (ProcessLookupError, PermissionError):
        pass


def run_measured(command: list[str], env: dict | None = None, timeout: float | None = None,
                 memory_limit_bytes: int | None = None, interval: float = 0.1, log_to: Path | None = None,
                 stop_when=None, cwd: Path = REPO) -> Measured:
    """Run `command` from the repository root (or `cwd`) in a new session and measure its whole process tree.

    `stop_when(elapsed)` may return True to end the run early (SIGTERM to the group, then SIGKILL).
    """
    started = time.perf_counter()
    out_path = log_to or Path(os.devnull)
    with open(out_path.with_suffix(".out") if log_to else os.devnull, "w") as out, \
            open(out_path.with_suffix(".err") if log_to else os.devnull, "w") as err:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        sampler = _TreeSampler(psutil.Process(proc.pid), interval, memory_limit_bytes)
        sampler.start()
        chunks = {"out": [], "err": []}
        readers = [threading.Thread(target=_pump, args=(proc.stdout, chunks["out"], out), daemon=True),
                   threading.Thread(target=_pump, args=(proc.stderr, chunks["err"], err), daemon=True)]
        for r in readers:
            r.start()
        try:
            while proc.poll() is None:
                elapsed = time.perf_counter() - started
                if timeout and elapsed > timeout:
                    _kill_group(proc.pid)
                elif stop_when is not None and stop_when(elapsed):
                    _stop_group(proc)
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                _kill_group(proc.pid)
            proc.wait()
            sampler.done.set()
            sampler.join()
            for r in readers:
                r.join()
    return Measured(command, proc.returncode, time.perf_counter() - started, sampler.peak, sampler.peak_single,
                    sum(sampler.cpu.values()), sampler.killed_for_memory, "".join(chunks["out"]),
                    "".join(chunks["err"]))


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
    except ProcessLookupError:
        pass


def _pump(stream, sink: list, copy) -> None:
    for line in stream:
        sink.append(line)
        copy.write(line)
        copy.flush()


def peak_rss_self() -> int:
    """This process's peak RSS. Not ru_maxrss: Linux carries that across fork+exec, so a child started by a
    parent that had imported torch would report the parent's size."""
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_self() -> int:
    return psutil.Process().memory_info().rss


RESULT_PREFIX = "BENCH_RESULT "


def evict_from_page_cache(codec: Path) -> None:
    """Drop the weight files' clean pages from the page cache, so that the next flow reads them from disk."""
    for path in codec.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def emit_result(result: dict) -> None:
    """A child's answer to its parent: one line on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


def parse_last(pattern: str, text: str) -> re.Match | None:
    matches = list(re.finditer(pattern, text))
    return matches[-1] if matches else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def gib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / GIB


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """A Markdown table (pasted as is into docs/benchmarks.md)."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def ratio_lines(checks: list[tuple[str, float | None, float | None]]) -> list[str]:
    """('b/a', value, target) -> 'b/a = 1.93 (target >= 1.50: met)'."""
    lines = []
    for name, value, target in checks:
        if value is None:
            lines.append(f"{name}: not measured (a flow it needs was not run or did not finish)")
            continue
        verdict = "" if target is None else f" (target >= {target:.2f}: {'met' if value >= target else 'NOT met'})"
        lines.append(f"{name} = {fmt(value)}{verdict}")
    return lines


def write_json(path: Path | None, data: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {path}")


def python() -> str:
    return sys.executable
