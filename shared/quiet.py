"""Keeping what native code and import-time prints write straight to a file descriptor out of the logs: Python's
logging and warnings filters cannot reach those, so the descriptor itself points at /dev/null for a while."""
from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def quiet_fds(*fds: int):
    """Send `fds` (default stdout and stderr) to /dev/null inside the block; Python's own buffers are flushed on
    both sides so nothing written before or after is lost or swallowed."""
    fds = fds or (1, 2)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip(fds, saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)
