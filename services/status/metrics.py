"""Prometheus metrics of an encode job (`GET /metrics`), built at each scrape from the same snapshot /status
serves: a custom collector over services.status.dashboard, no global counters, so every server process reports
the output directory's truth and a restarted server picks up where the job is.

Everything is a gauge: the values are the directory's state, which may go down (a --replan, a shard
moved aside), not counts this process has incremented.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from services.status.dashboard import Dashboard
from services.status.progress import node_label

PREFIX = "qwen3tts_encode"
JOB_STATES = ("empty", "planned", "running", "stopped", "complete")
ENCODER_LABELS = ("encoder", "node")


class DashboardSource(Protocol):
    def dashboard(self) -> Dashboard: ...


class EncodeJobCollector:
    """Yields the job's metric families from a fresh (cached per directory change) dashboard per scrape."""

    def __init__(self, source: DashboardSource):
        self.source = source

    def collect(self) -> Iterator[Metric]:
        d = self.source.dashboard()
        p = d.progress
        yield from job_metrics(p, d.errors_by_reason)
        yield from encoder_metrics(p["encoders"], time.time())


def gauge(name: str, documentation: str, value: float | None = None, labels: tuple[str, ...] | None = None):
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value, labels=labels)


def job_metrics(p: dict, errors_by_reason: dict[str, int]) -> Iterator[Metric]:
    state = gauge("state", "1 for the job's state (complete, running, stopped: driver and encoders gone, "
                           "planned, empty), 0 for the others", labels=("state",))
    for name in JOB_STATES:
        state.add_metric([name], float(p["state"] == name))
    yield state

    rows = gauge("rows", "Manifest rows in published shards, by result (ok: encoded; error: an error row)",
                 labels=("result",))
    rows.add_metric(["ok"], p["rows"]["ok"])
    rows.add_metric(["error"], p["rows"]["error"])
    yield rows
    if p["rows"]["planned"] is not None:
        yield gauge("rows_planned", "Manifest rows in the plan", p["rows"]["planned"])
    errors = gauge("error_rows", "Error rows in published shards by reason code", labels=("reason",))
    for reason, count in errors_by_reason.items():
        errors.add_metric([reason], count)
    yield errors

    shards = p["shards"]
    yield gauge("shards_planned", "Shards in the plan", shards["total"])
    by_state = gauge("shards", "Planned shards by state: done (published), running, failed (given up on "
                               "after retries, as the driver reports), pending", labels=("state",))
    for name in ("done", "running", "failed", "pending"):
        if name in shards:  # tolerate a driver.json / progress without failures
            by_state.add_metric([name], shards[name])
    yield by_state

    yield gauge("audio_seconds", "Seconds of source audio in the good rows of published shards",
                p["audio_hours"] * 3600.0)
    yield gauge("rows_per_second", "Job throughput: sum over alive encoders, else the finished run's average",
                p["rate"]["rows_per_s"])
    yield gauge("audio_seconds_per_second", "Job throughput in seconds of audio per second (as rows_per_second)",
                p["rate"]["audio_seconds_per_s"])
    if p["eta_seconds"] is not None:
        yield gauge("eta_seconds", "Estimated seconds until every planned row is encoded", p["eta_seconds"])
    faults = p.get("faults") or {}  # retries and losses, when driver.json reports them
    if "shard_retries" in faults:
        yield gauge("shard_retries", "Failed shard attempts that were retried, in the current (or last) run",
                    faults["shard_retries"])
    if "encoders_lost" in faults:
        yield gauge("encoders_lost", "Encoders lost (and replaced) in the current (or last) run",
                    faults["encoders_lost"])


def encoder_metrics(encoders: list[dict], now: float) -> Iterator[Metric]:
    families = {
        "rows_per_s": gauge("encoder_rows_per_second", "Rows per second of one encoder (its heartbeat)",
                            labels=ENCODER_LABELS),
        "audio_seconds_per_s": gauge("encoder_audio_seconds_per_second",
                                     "Seconds of audio per second of one encoder (its heartbeat)",
                                     labels=ENCODER_LABELS),
        "rows": gauge("encoder_rows", "Rows one encoder has written since it started", labels=ENCODER_LABELS),
    }
    age = gauge("encoder_heartbeat_age_seconds", "Seconds since the encoder's last heartbeat",
                labels=ENCODER_LABELS)
    alive = gauge("encoder_alive", "1 when the encoder's heartbeat is recent enough to count it alive",
                  labels=ENCODER_LABELS)
    for e in encoders:
        labels = [e["name"], node_label(e)]
        for key, family in families.items():
            family.add_metric(labels, e[key])
        if e["updated"] is not None:
            age.add_metric(labels, max(0.0, now - e["updated"]))
        alive.add_metric(labels, float(e["alive"]))
    yield from families.values()
    yield age
    yield alive


def job_registry(source: DashboardSource) -> CollectorRegistry:
    """A registry of its own per server (not the process-wide default one, which holds Ray's metrics and
    would be shared by every server in the process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EncodeJobCollector(source))
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The scrape body and its content type; OpenMetrics when the scraper asks for it (Prometheus does)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
