"""EncoderPool: places encoder actors on the cluster's accelerators and keeps them fed with shards.

A lost actor (its process or node died) gives its in-flight shards back to the queue and is
replaced; an application error in a shard is retried a few times and then reported as failed. When
`target` is "auto", accelerators that join the cluster mid-run get encoders too.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from services.encoder import EncoderActor, EncoderOptions
from services.plan import ShardSpec
from shared.device import RAY_RESOURCE

LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


def cluster_kind(device: str) -> str:
    """The accelerator kind encoders are placed on: the one asked for, or what the cluster offers."""
    if device != "auto":
        return device
    resources = ray.cluster_resources()
    if resources.get("NPU", 0) >= 1:
        return "npu"
    if resources.get("GPU", 0) >= 1:
        return "cuda"
    return "cpu"


def placement(kind: str, cpus: float) -> dict:
    if kind == "npu":
        return {"resources": {"NPU": 1}, "num_cpus": cpus}
    if kind == "cuda":
        return {"num_gpus": 1, "num_cpus": cpus}
    return {"num_cpus": cpus}


def encoder_count(kind: str, fixed: int | None) -> int:
    """A fixed count, or one encoder per accelerator the cluster has now (one on CPU)."""
    if fixed:
        return fixed
    return max(1, int(ray.cluster_resources().get(RAY_RESOURCE[kind], 0))) if kind in RAY_RESOURCE else 1


@dataclass
class Encoder:
    name: str
    handle: object
    in_flight: dict = field(default_factory=dict)  # ObjectRef -> ShardSpec


class EncoderPool:
    def __init__(self, options: EncoderOptions, kind: str, num_encoders: int | None, cpus_per_encoder: float = 1.0,
                 max_in_flight: int = 2, max_retries: int = 2, log: Callable[[str], None] = print):
        self.options, self.kind, self.fixed_count = options, kind, num_encoders
        self.cpus, self.max_in_flight, self.max_retries, self.log = cpus_per_encoder, max_in_flight, max_retries, log
        self.encoders: dict[str, Encoder] = {}
        self.actor_class = ray.remote(max_restarts=0, max_task_retries=0)(EncoderActor)
        self._next_index = 0
        self.failed: dict[int, str] = {}
        self.attempts: dict[int, int] = {}
        self.losses = 0

    def desired_count(self) -> int:
        return encoder_count(self.kind, self.fixed_count)

    def _spawn(self) -> None:
        name = f"encoder-{self._next_index}"
        self._next_index += 1
        handle = self.actor_class.options(name=None, scheduling_strategy="SPREAD",
                                          **placement(self.kind, self.cpus)).remote(self.options, name)
        self.encoders[name] = Encoder(name, handle)

    def scale(self) -> None:
        while len(self.encoders) < self.desired_count():
            self._spawn()

    def run(self, pending: list[ShardSpec], on_done: Callable[[ShardSpec, object], None],
            on_tick: Callable[[], None] | None = None, tick_seconds: float = 10.0) -> dict[int, str]:
        """Encode every shard in `pending`; returns {shard id: reason} for shards that failed for good."""
        queue = deque(pending)
        self.scale()
        last_tick = last_scale = time.time()
        while queue or any(e.in_flight for e in self.encoders.values()):
            for enc in list(self.encoders.values()):
                while queue and len(enc.in_flight) < self.max_in_flight:
                    spec = queue.popleft()
                    enc.in_flight[enc.handle.encode_shard.remote(spec)] = spec
            refs = [ref for e in self.encoders.values() for ref in e.in_flight]
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0) if refs else ([], [])
            for ref in ready:
                self._collect(ref, queue, on_done)
            now = time.time()
            if now - last_scale > 5.0:
                self.scale()  # replaces lost encoders; adds encoders for accelerators that joined
                last_scale = now
            if on_tick and now - last_tick > tick_seconds:
                on_tick()
                last_tick = now
        return self.failed

    def _collect(self, ref, queue: deque, on_done) -> None:
        enc = next(e for e in self.encoders.values() if ref in e.in_flight)
        spec = enc.in_flight.pop(ref)
        try:
            on_done(spec, ray.get(ref))
        except LOST as exc:
            self.log(f"{enc.name} lost ({type(exc).__name__}); re-queueing its shards {[s.id for s in enc.in_flight.values()] + [spec.id]}")
            queue.appendleft(spec)
            queue.extendleft(enc.in_flight.values())
            self.encoders.pop(enc.name, None)
            ray.kill(enc.handle, no_restart=True)
            self.losses += 1
            if self.losses > 3 * self.desired_count() + 3:
                raise RuntimeError(f"encoders keep dying ({self.losses} lost); last: {exc}") from exc
        except (RayTaskError, GetTimeoutError) as exc:
            self.attempts[spec.id] = self.attempts.get(spec.id, 0) + 1
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            if self.attempts[spec.id] <= self.max_retries:
                self.log(f"shard {spec.id} failed on {enc.name} (attempt {self.attempts[spec.id]}): {reason}; retrying")
                queue.append(spec)
            else:
                self.log(f"shard {spec.id} failed {self.attempts[spec.id]} times; giving up: {reason}")
                self.failed[spec.id] = reason

    def describe(self) -> list[dict]:
        infos = []
        for enc in self.encoders.values():
            try:
                infos.append(ray.get(enc.handle.info.remote(), timeout=120))
            except Exception as exc:
                infos.append({"name": enc.name, "error": str(exc).splitlines()[0]})
        return infos

    def shutdown(self) -> None:
        for enc in self.encoders.values():
            ray.kill(enc.handle, no_restart=True)
        self.encoders.clear()
