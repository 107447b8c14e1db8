"""EncoderPool: places encoder actors on the cluster's accelerators and keeps them fed with shards.

A lost actor (its process or node died, while it works or while it starts) gives its in-flight shards back to
the queue and is replaced at once; only an error raised by the actor's own start-up code (the same on every
try) ends the job, and only before any encoder came up. An application error in a shard is retried a few times
and then reported as failed; a shard that cannot be written stops the job (the storage is at fault, not the
shard). Unless a fixed count is asked for, accelerators that join the cluster mid-run get encoders too. The
first encoders are waited for; later ones are given shards only once started, so a slow or never-placed actor
holds no work that others could do.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import ray
from ray.exceptions import (ActorDiedError, ActorUnavailableError, GetTimeoutError, OutOfMemoryError, RayActorError,
                            RayTaskError, WorkerCrashedError)

from services.encode.encoder import EncoderActor, EncoderOptions
from shared.shard_writer import OutputWriteError
from services.encode.plan import ShardSpec
from shared.device import RAY_RESOURCE

# The encoder's process is gone: killed, crashed, its node lost, or killed by Ray's memory monitor (seen here killing
# an encoder in start-up while another job filled the machine's memory).
LOST = (RayActorError, ActorDiedError, ActorUnavailableError, OutOfMemoryError, WorkerCrashedError)
START_TIMEOUT_SECONDS = 180.0  # the first encoders' start (codec load) is waited for this long at most


class EncoderStartError(RuntimeError):
    """An encoder's start-up code raised (a bad codec, a missing device): every replacement would too."""


def last_line(exc: BaseException) -> str:
    """The line of a Ray error that says what went wrong: the last one of the remote traceback."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def cluster_kind(device: str, log=print) -> str:
    """The accelerator kind encoders are placed on: the one asked for, or what the cluster offers."""
    if device != "auto":
        return device
    resources = ray.cluster_resources()
    if resources.get("NPU", 0) >= 1:
        return "npu"
    if resources.get("GPU", 0) >= 1:
        return "cuda"
    unregistered = nodes_with_unregistered_npus()
    if unregistered:
        log(f"WARNING: --device auto runs CPU encoders, but Ascend cards (/dev/davinci*) are on nodes where Ray "
            f"registered no NPU resource: {', '.join(f'{ip} ({n} cards)' for ip, n in unregistered)}. Fix: on "
            "those nodes source CANN before `ray start` (deploy/node_env.sh does), so that Ray detects the cards, "
            "or start Ray with --resources '{\"NPU\": <cards>}'; pass --device cpu to encode on the CPU anyway")
    return "cpu"


@ray.remote(num_cpus=0)
def _ascend_device_files() -> int:
    import glob
    import os

    return len(glob.glob(f"{os.environ.get('QWEN3TTS_SYSROOT', '')}/dev/davinci[0-9]*"))


def nodes_with_unregistered_npus(timeout: float = 30.0) -> list[tuple[str, int]]:
    """(node address, device files) of alive nodes that have /dev/davinci* but no NPU resource in Ray, checked by
    a zero-CPU task on each such node. A node that does not answer in time is left out (no warning, no wait)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and not n.get("Resources", {}).get(RAY_RESOURCE["npu"])]
    refs = {_ascend_device_files.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(): n["NodeManagerAddress"] for n in nodes}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    found = []
    for ref in ready:
        try:
            count = ray.get(ref)
        except Exception:  # a node lost meanwhile: nothing to say about it
            continue
        if count:
            found.append((refs[ref], count))
    return sorted(found)


def placement(kind: str, cpus: float) -> dict:
    if kind == "npu":
        return {"resources": {"NPU": 1}, "num_cpus": cpus}
    if kind == "cuda":
        return {"num_gpus": 1, "num_cpus": cpus}
    return {"num_cpus": cpus}


def shards_at_once(kind: str) -> int:
    """An accelerator encoder overlaps the next shard's decoding (and this one's Parquet write) with the
    device's work; a CPU encoder's cores are busy encoding, so it takes one shard at a time."""
    return 1 if kind == "cpu" else 2


def encoder_count(kind: str, fixed: int | None) -> int:
    """A fixed count, or one encoder per accelerator the cluster has now (one on CPU)."""
    if fixed:
        return fixed
    return max(1, int(ray.cluster_resources().get(RAY_RESOURCE[kind], 0))) if kind in RAY_RESOURCE else 1


@dataclass
class Encoder:
    name: str
    handle: object
    starting: object | None  # its first info() call until the actor has started (then None): no work before
    in_flight: dict = field(default_factory=dict)  # ObjectRef -> ShardSpec


class EncoderPool:
    def __init__(self, options: EncoderOptions, kind: str, num_encoders: int | None, cpus_per_encoder: float = 1.0,
                 max_in_flight: int = 2, max_retries: int = 2, log: Callable[[str], None] = print):
        self.options, self.kind, self.fixed_count = options, kind, num_encoders
        self.cpus, self.max_retries, self.log = cpus_per_encoder, max_retries, log
        # One shard queued behind those the actor works on, so it never waits for the driver's round trip.
        self.max_in_flight = max_in_flight + shards_at_once(kind) - 1
        self.encoders: dict[str, Encoder] = {}
        self.on_started: Callable[[dict], None] | None = None  # called with each started encoder's info()
        self.actor_class = ray.remote(max_restarts=0, max_task_retries=0)(EncoderActor)
        self._next_index = 0
        self.failed: dict[int, str] = {}  # shard id -> reason, for shards that failed for good
        self.attempts: dict[int, int] = {}  # shard id -> failed attempts so far
        self.losses = 0  # encoders lost in this run
        self.losses_since_progress = 0  # lost since a shard was last written: many in a row end the job
        self.changed = False  # a failure, retry or loss the driver has not yet written to its heartbeat
        self._scale_now = False
        self.started = 0  # encoders that came up; until one has, a failing start fails the job at once
        self.first_started_at: float | None = None  # start-up (actor, device, codec load) ends here

    def desired_count(self) -> int:
        return encoder_count(self.kind, self.fixed_count)

    def _spawn(self) -> None:
        name = f"encoder-{self._next_index}"
        self._next_index += 1
        handle = self.actor_class.options(name=None, scheduling_strategy="SPREAD",
                                          max_concurrency=shards_at_once(self.kind),
                                          **placement(self.kind, self.cpus)).remote(self.options, name)
        self.encoders[name] = Encoder(name, handle, handle.info.remote())

    def scale(self) -> None:
        """Replace lost encoders, add one per accelerator that joined, and drop encoders still waiting for
        accelerators that left (an actor that can never be placed must not hold on to shards)."""
        desired = self.desired_count()
        waiting = [e for e in self.encoders.values() if e.starting is not None]
        for enc in waiting[:max(0, len(self.encoders) - desired)]:
            self._drop(enc)
        while len(self.encoders) < desired:
            self._spawn()

    def run(self, pending: list[ShardSpec], on_done: Callable[[ShardSpec, object], None],
            on_tick: Callable[[], None] | None = None, tick_seconds: float = 10.0) -> dict[int, str]:
        """Encode every shard in `pending`; returns {shard id: reason} for shards that failed for good.

        Raises OutputWriteError as soon as a shard cannot be written: every other shard would fail the same
        way, so the job stops with the storage's error instead of retrying each shard.
        """
        queue = deque(pending)
        self.scale()
        first = list(self.encoders.values())
        last_tick = last_scale = time.time()
        start_deadline = last_tick + START_TIMEOUT_SECONDS
        while queue or any(e.in_flight for e in self.encoders.values()):
            # The first encoders are waited for, so that each takes part from the first shard (and a bad codec
            # fails the job before any work); one that cannot be placed is not waited for past the deadline.
            if time.time() > start_deadline or not any(e.starting is not None and e.name in self.encoders
                                                       for e in first):
                for enc in list(self.encoders.values()):
                    while enc.starting is None and queue and len(enc.in_flight) < self.max_in_flight:
                        spec = queue.popleft()
                        enc.in_flight[enc.handle.encode_shard.remote(spec)] = spec
            starting = {e.starting: e for e in self.encoders.values() if e.starting is not None}
            refs = [ref for e in self.encoders.values() for ref in e.in_flight] + list(starting)
            if refs:
                ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            else:  # no encoder at all (all lost, or none can be placed yet): wait for scale() to add one
                ready = []
                time.sleep(1.0)
            for ref in ready:
                if ref in starting:
                    self._check_started(starting[ref])
                else:
                    self._collect(ref, queue, on_done)
            now = time.time()
            if self._scale_now or now - last_scale > 5.0:
                self._scale_now = False
                self.scale()
                last_scale = now
            # A failure or a loss is told at once (driver.json, so /status), not at the next regular tick.
            if on_tick and (self.changed or now - last_tick > tick_seconds):
                self.changed = False
                on_tick()
                last_tick = now
        return self.failed

    @property
    def retries(self) -> int:
        """Failed shard attempts that were given another try."""
        return sum(min(n, self.max_retries) for n in self.attempts.values())

    def _check_started(self, enc: Encoder) -> None:
        try:
            info = ray.get(enc.starting)
        except (*LOST, RayTaskError) as exc:
            # An exception from the start-up code itself fails the same way on every try; a process that died
            # (killed, out of memory, its node gone) is replaced like any lost encoder.
            deterministic = isinstance(exc, RayTaskError) or getattr(exc, "actor_init_failed", False)
            if deterministic and not self.started:
                raise EncoderStartError(f"{enc.name} could not start: {last_line(exc)}") from exc
            self._lose(enc, exc)
            return
        enc.starting = None
        self.started += 1
        self.first_started_at = self.first_started_at or time.time()
        self.log(f"{enc.name} started on {info['hostname']} ({info['node']}, node {info['node_id'][:12]}) "
                 f"device {info['device']} {info.get('visible_devices') or ''}")
        if self.on_started is not None:
            self.on_started(info)

    def _drop(self, enc: Encoder) -> None:
        self.encoders.pop(enc.name, None)
        ray.kill(enc.handle, no_restart=True)

    def _lose(self, enc: Encoder, exc: BaseException, queue: deque | None = None) -> None:
        """An encoder's process or node died: its in-flight shards go back to the front of the queue."""
        lost = list(enc.in_flight.values())
        self.log(f"{enc.name} lost ({type(exc).__name__}); re-queueing its shards {[s.id for s in lost]}")
        if queue is not None:
            queue.extendleft(reversed(lost))
        enc.in_flight.clear()
        self._drop(enc)
        self.losses += 1
        self.losses_since_progress += 1
        self.changed = self._scale_now = True  # tell the heartbeat; start the replacement now, not at the next tick
        if self.losses_since_progress > 3 * self.desired_count() + 3:
            raise RuntimeError(f"encoders keep dying ({self.losses_since_progress} lost with no shard written "
                               f"in between); last: {last_line(exc)}") from exc

    def _collect(self, ref, queue: deque, on_done) -> None:
        enc = next(e for e in self.encoders.values() if ref in e.in_flight)
        spec = enc.in_flight[ref]
        try:
            stats = ray.get(ref)
        except LOST as exc:
            self._lose(enc, exc, queue)
            return
        except (RayTaskError, GetTimeoutError) as exc:
            del enc.in_flight[ref]
            if isinstance(getattr(exc, "cause", None), OutputWriteError):
                raise exc.cause from None
            self.attempts[spec.id] = self.attempts.get(spec.id, 0) + 1
            self.changed = True
            reason = last_line(exc)
            if self.attempts[spec.id] <= self.max_retries:
                self.log(f"shard {spec.id} failed on {enc.name} (attempt {self.attempts[spec.id]}): {reason}; retrying")
                queue.append(spec)
            else:
                self.log(f"shard {spec.id} failed {self.attempts[spec.id]} times; giving up: {reason}")
                self.failed[spec.id] = reason
            return
        del enc.in_flight[ref]
        self.losses_since_progress = 0
        on_done(spec, stats)

    def shutdown(self) -> None:
        for enc in self.encoders.values():
            ray.kill(enc.handle, no_restart=True)
        self.encoders.clear()
