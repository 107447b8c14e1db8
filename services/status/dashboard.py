"""The status page's and /metrics' view of a job: services.status.progress's snapshot plus what only the shards'
columns and publication times tell (errors by reason, the most recent error rows, the duration histogram,
throughput over time) and per-node totals. Computed from the output directory alone, like /status.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from services.status.progress import node_label, planned_published_shards, planned_shard_ids
from shared.store import Store, open_store
from services.status.shard_details import DURATION_EDGES, ErrorRow, ShardDetail, ShardDetailsCache
from shared.schema import PLAN_FILE

THROUGHPUT_BUCKETS = 48
RECENT_ERRORS_SHOWN = 15


@dataclass(frozen=True)
class Throughput:
    """Rows/s and audio-s/s per equal time bucket from `start` to `end` (Unix seconds). Each shard's rows are
    spread evenly over the time its encoder spent on it (publication time minus encode_seconds, to
    publication), so the chart shows a rate, not a spike per shard.

    Shards still being encoded are not on disk yet, so the buckets after `measured_until` (when the oldest
    shard in flight began: its encoder's previous publication) would read low; the heartbeats' rate stands
    for that stretch instead."""
    start: float
    end: float
    rows_per_s: tuple[float, ...]
    audio_seconds_per_s: tuple[float, ...]
    live_rows_per_s: float | None  # the alive encoders' heartbeats now; None when none is alive
    live_audio_seconds_per_s: float | None
    measured_until: float = math.inf

    @property
    def empty(self) -> bool:
        return not self.rows_per_s

    @property
    def measured_buckets(self) -> int:
        """How many leading buckets lie wholly before `measured_until` (all of them when nothing is in flight)."""
        n = len(self.rows_per_s)
        if not n or self.measured_until >= self.end:
            return n
        return max(0, min(n, int((self.measured_until - self.start) / ((self.end - self.start) / n))))


@dataclass(frozen=True)
class NodeRow:
    node: str
    encoders: int
    alive: int
    rows: int
    rows_per_s: float
    audio_seconds_per_s: float


@dataclass(frozen=True)
class Dashboard:
    progress: dict  # services.status.progress.collect_progress, as /status serves it
    errors_by_reason: dict[str, int]  # most frequent first
    recent_errors: list[ErrorRow]  # newest shard first
    duration_counts: tuple[int, ...]  # per bin of shard_details.DURATION_EDGES, then longer
    throughput: Throughput
    nodes: list[NodeRow]

    @property
    def duration_edges(self) -> tuple[float, ...]:
        return DURATION_EDGES


def collect_dashboard(output: Path | Store, progress: dict, cache: ShardDetailsCache) -> Dashboard:
    store = open_store(output)
    planned = planned_shard_ids(store.read_json(PLAN_FILE))
    infos: dict = {}
    details = cache.details(planned_published_shards(store, planned, infos), infos)
    reasons: dict[str, int] = {}
    for detail in details:
        for reason, count in detail.errors_by_reason.items():
            reasons[reason] = reasons.get(reason, 0) + count
    recent: list[ErrorRow] = []
    for detail in reversed(details):
        if len(recent) >= RECENT_ERRORS_SHOWN:
            break
        recent.extend(reversed(detail.recent_errors[-(RECENT_ERRORS_SHOWN - len(recent)):]))
    histogram = [0] * (len(DURATION_EDGES) + 1)
    for detail in details:
        for i, count in enumerate(detail.duration_counts):
            histogram[i] += count
    return Dashboard(progress=progress,
                     errors_by_reason=dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
                     recent_errors=recent, duration_counts=tuple(histogram),
                     throughput=throughput(details, progress), nodes=node_rows(progress["encoders"]))


def throughput(details: list[ShardDetail], progress: dict, buckets: int = THROUGHPUT_BUCKETS) -> Throughput:
    alive = [e for e in progress["encoders"] if e["alive"]]
    live_rows = sum(e["rows_per_s"] for e in alive) if alive else None
    live_audio = sum(e["audio_seconds_per_s"] for e in alive) if alive else None
    spans = [(d.published - max(0.0, d.stats.encode_seconds), d.published, d.stats.rows, d.stats.audio_seconds)
             for d in details if math.isfinite(d.published)]
    if not spans:
        return Throughput(0.0, 0.0, (), (), live_rows, live_audio)
    start = min(s[0] for s in spans)
    end = max(max(s[1] for s in spans), progress["updated"] if progress["state"] == "running" else 0.0)
    if progress["state"] == "running":
        end = max(end, start + buckets)  # at least a second per bucket while the job grows
    else:  # the chart ends with the job's last shard, however short the job was
        end = max(end, start + 1e-3 * buckets)
    width = (end - start) / buckets
    rows, audio = [0.0] * buckets, [0.0] * buckets
    for begin, finish, n_rows, n_audio in spans:
        if finish - begin < 1e-6:  # no encode time recorded: all of it in the bucket it was published in
            k = min(buckets - 1, int((finish - start) / width))
            rows[k] += n_rows
            audio[k] += n_audio
            continue
        first, last = int((begin - start) / width), min(buckets - 1, int((finish - start) / width))
        for k in range(first, last + 1):
            overlap = min(finish, start + (k + 1) * width) - max(begin, start + k * width)
            share = max(0.0, overlap) / (finish - begin)
            rows[k] += n_rows * share
            audio[k] += n_audio * share
    return Throughput(start, end, tuple(r / width for r in rows), tuple(a / width for a in audio),
                      live_rows, live_audio, in_flight_since(details, alive))


def in_flight_since(details: list[ShardDetail], alive: list[dict]) -> float:
    """When the oldest shard now being encoded began, taken as its encoder's last publication (an encoder
    works through its shards one after another); inf when no alive encoder is busy or none has published."""
    last_published: dict[str, float] = {}
    for d in details:
        last_published[d.stats.worker] = max(last_published.get(d.stats.worker, -math.inf), d.published)
    began = [last_published[e["name"]] for e in alive if e["shard"] is not None and e["name"] in last_published]
    return min(began, default=math.inf)


def node_rows(encoders: list[dict]) -> list[NodeRow]:
    grouped: dict[str, list[dict]] = {}
    for e in encoders:
        grouped.setdefault(node_label(e), []).append(e)
    rows = []
    for node, members in sorted(grouped.items()):
        alive = [e for e in members if e["alive"]]
        rows.append(NodeRow(node=node, encoders=len(members), alive=len(alive), rows=sum(e["rows"] for e in members),
                            rows_per_s=sum(e["rows_per_s"] for e in alive),
                            audio_seconds_per_s=sum(e["audio_seconds_per_s"] for e in alive)))
    return rows
