"""`python -m services.encode.reaper DRIVER_PID`: ends what a driver's private Ray leaves behind when the driver dies.

Ray ties its GCS and raylet to the process that started them, and workers die with the raylet, but the
dashboard and runtime-env agents were seen running on, orphaned, a minute after the driver was SIGKILLed.
The driver starts this process with a pipe on its stdin. While the pipe is open it records, every second,
the driver's descendants (pid and start time); when the pipe closes (the driver exited, however it ended)
it SIGKILLs every recorded process that still runs (same pid and start time, so never a reused pid), and exits.
Only the standard library: it must start in milliseconds.
"""
from __future__ import annotations

import os
import select
import signal
import sys

SCAN_SECONDS = 1.0


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time in clock ticks) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = stat_of(int(entry))
            if info is not None:
                table[int(entry)] = info
    return table


def stat_of(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid ... starttime is 20th
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19]


def descendants(root: int, table: dict[int, tuple[int, str]]) -> dict[int, str]:
    """pid -> start time of root's children, grandchildren, ..."""
    found, frontier = {}, {root}
    while frontier:
        children = {pid for pid, (parent, _) in table.items() if parent in frontier and pid not in found}
        found.update({pid: table[pid][1] for pid in children})
        frontier = children
    return found


def reap(recorded: dict[int, str]) -> int:
    killed = 0
    for pid, started in recorded.items():
        info = stat_of(pid)
        if info is not None and info[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def watch(driver: int) -> None:
    recorded: dict[int, str] = {}
    me = os.getpid()
    while True:
        readable, _, _ = select.select([sys.stdin.fileno()], [], [], SCAN_SECONDS)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            break  # end of file: the driver is gone
        found = descendants(driver, process_table())
        found.pop(me, None)
        recorded.update(found)
    reap(recorded)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver must not end the watch
    watch(int(sys.argv[1]))


if __name__ == "__main__":
    main()
