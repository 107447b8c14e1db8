"""One driver per output directory: an fcntl lock held for the life of the job."""
from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from shared.schema import LOCK_FILE


class OutputLocked(RuntimeError):
    pass


class OutputLock:
    def __init__(self, output: Path):
        self.path = Path(output) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputLocked(f"{self.path.parent} is in use by another encode job ({holder}); wait for it to "
                               "finish or use another --output") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
