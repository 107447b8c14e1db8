"""One driver per output on an object store: a lease object with an owner and an expiry, renewed by the driver.

Object stores have no fcntl. The lease is created with `If-None-Match: *` (only one driver can create it) and
renewed, and taken over once expired, with `If-Match: <the ETag last seen>` (only one writer of each version
wins). Its age is measured on the store's clock (response Date minus Last-Modified), so drivers whose clocks
differ agree on expiry. A driver whose renewal fails because another wrote the lease has lost it and stops.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Callable

from services.encode.lock import OutputLock, OutputLocked
from shared.schema import LEASE_FILE
from shared.store import LocalStore, Store

DEFAULT_LEASE_SECONDS = 60.0


class OutputLease:
    def __init__(self, store, seconds: float = DEFAULT_LEASE_SECONDS, log=print,
                 on_lost: Callable[[str], None] | None = None):
        self.store, self.seconds, self.log, self.on_lost = store, seconds, log, on_lost
        self.owner = uuid.uuid4().hex
        self.acquired = 0.0
        self.tag: str | None = None
        self.lost: str | None = None  # why, once the lease was lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "acquired": self.acquired, "renewed": time.time(), "seconds": self.seconds}).encode()

    def acquire(self) -> "OutputLease":
        self.acquired = time.time()
        self.tag = self.store.create_tagged(LEASE_FILE, self._record())
        if self.tag is None:
            self.tag = self._take_over()
        self._thread = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._thread.start()
        return self

    def _take_over(self) -> str:
        current = self.store.age(LEASE_FILE)
        if current is None:  # released between our create and our read: try once more
            tag = self.store.create_tagged(LEASE_FILE, self._record())
            if tag is None:
                raise OutputLocked(f"{self.store.root} is being taken by another encode job; use another --output")
            return tag
        body, tag, age = current
        try:
            holder = json.loads(body)
        except ValueError:
            holder = {}
        seconds = holder.get("seconds") if isinstance(holder.get("seconds"), (int, float)) else DEFAULT_LEASE_SECONDS
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
        if age < seconds:
            raise OutputLocked(f"{self.store.root} is leased by another encode job ({who}, renewed {age:.0f} s ago; "
                               f"it expires {seconds - age:.0f} s after its last renewal if that job died); wait "
                               "for it to finish, or use another --output")
        new_tag = self.store.replace_if(LEASE_FILE, self._record(), tag)
        if new_tag is None:
            raise OutputLocked(f"{self.store.root}: another encode job took over the expired lease first; use "
                               "another --output or wait for it to finish")
        self.log(f"took over the expired lease of {who} (last renewed {age:.0f} s ago, lease {seconds:.0f} s)")
        return new_tag

    def _renew_loop(self) -> None:
        last_renewal = time.monotonic()
        while not self._stop.wait(self.seconds / 4):
            try:
                tag = self.store.replace_if(LEASE_FILE, self._record(), self.tag)
            except OSError as exc:  # the store is unreachable for now: retry until the lease would expire
                if time.monotonic() - last_renewal < self.seconds:
                    continue
                tag, reason = None, f"could not renew it for {self.seconds:.0f} s ({exc})"
            else:
                reason = "another encode job wrote it (ours had expired)"
            if tag is None:
                self.lost = f"lost the lease on {self.store.root}: {reason}; stopping"
                if self.on_lost is not None:
                    self.on_lost(self.lost)
                return
            self.tag, last_renewal = tag, time.monotonic()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.tag is not None and self.lost is None:
            current = self.store.info(LEASE_FILE)
            if current is not None and current.tag == self.tag:  # still ours: free it for the next driver now
                self.store.delete(LEASE_FILE)
            self.tag = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def single_driver_guard(store: Store, lease_seconds: float = DEFAULT_LEASE_SECONDS, log=print,
                        on_lost: Callable[[str], None] | None = None) -> OutputLock | OutputLease:
    """The fcntl lock on a local directory; the lease on an object store that offers conditional writes."""
    if isinstance(store, LocalStore):
        return OutputLock(store.path)
    if not hasattr(store, "create_tagged"):
        raise OutputLocked(f"{store.root}: the encode driver needs a path or an s3:// URI (a store with "
                           "conditional writes for its lease and plan)")
    return OutputLease(store, lease_seconds, log, on_lost)
