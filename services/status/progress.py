"""Progress of an encode job, computed only from its output directory (see docs/design.md).

The directory is read while encoders and the driver write to it, so every file may be missing,
half-written or stale: nothing here raises on such a directory, it reports what it can.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from services.status.file_cache import FileVersionCache
from shared.schema import (
    COMPLETE_MARKER,
    PLAN_FILE,
    SHARDS_DIR,
    SUMMARY_FILE,
    WORKERS_DIR,
    ShardStats,
    read_stats,
    shard_id_of,
)
from shared.store import ObjectInfo, Store, open_store

DRIVER_FILE = "driver.json"
HEARTBEAT_ALIVE_SECONDS = 30.0  # docs/design.md: an older heartbeat counts as not alive


class ShardStatsCache(FileVersionCache[ShardStats]):
    """Footer stats per published shard, re-read only when the file changes (services.status.file_cache)."""

    def read(self, path: Path | str, info: ObjectInfo) -> ShardStats:
        return read_stats(path)


SHARD_STATS_CACHE = ShardStatsCache()


def as_number(value: Any, default: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return float(value)


def as_int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def as_text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def planned_shard_ids(plan: dict | None) -> set[int] | None:
    if plan is None or not isinstance(plan.get("shards"), list):
        return None
    return {s["id"] for s in plan["shards"] if isinstance(s, dict) and as_int_or_none(s.get("id")) is not None}


def planned_published_shards(output: Path | Store, planned_ids: set[int] | None,
                             infos: dict[int, ObjectInfo] | None = None) -> dict[int, Path | str]:
    """Published shards of the current plan (all of them when there is no readable plan); a shard left by an
    earlier plan of another size is not this job's. `infos`, when given, receives each shard's version."""
    store = open_store(output)
    try:
        listing = store.listing(SHARDS_DIR)
    except OSError:
        return {}
    shards = {}
    for name, info in sorted(listing.items()):
        sid = shard_id_of(name)
        if sid is not None and (planned_ids is None or sid in planned_ids):
            shards[sid] = store.location(f"{SHARDS_DIR}/{name}")
            if infos is not None:
                infos[sid] = info
    return dict(sorted(shards.items()))


def node_label(encoder: dict) -> str:
    """The node an encoder record (read_encoders) runs on, as status names it."""
    node = encoder["node"] or encoder["hostname"] or "unknown"
    if encoder["node_id"]:  # Ray nodes can share an IP (several on one host): tell them apart
        node = f"{node} ({encoder['node_id'][:8]})"
    return node


def read_encoders(output: Path | Store, now: float) -> list[dict]:
    store = open_store(output)
    try:
        names = sorted(n for n in store.listing(WORKERS_DIR) if n.endswith(".json") and not n.startswith("."))
    except OSError:
        return []
    encoders = []
    for name in names:
        beat = store.read_json(f"{WORKERS_DIR}/{name}")
        if beat is None:
            continue
        updated = as_number(beat.get("updated"), default=float("nan"))
        encoders.append({
            "name": as_text_or_none(beat.get("name")) or name[:-len(".json")],
            "node": as_text_or_none(beat.get("node")),
            "node_id": as_text_or_none(beat.get("node_id")),
            "hostname": as_text_or_none(beat.get("hostname")),
            "device": as_text_or_none(beat.get("device")),
            "shard": as_int_or_none(beat.get("shard")),
            "rows": int(as_number(beat.get("rows"))),
            "rows_error": int(as_number(beat.get("rows_error"))),
            "rows_per_s": as_number(beat.get("rows_per_s")),
            "audio_seconds_per_s": as_number(beat.get("audio_seconds_per_s")),
            "alive": math.isfinite(updated) and now - updated <= HEARTBEAT_ALIVE_SECONDS,
            "updated": updated if math.isfinite(updated) else None,
        })
    return encoders


def driver_is_running(driver: dict | None, now: float) -> bool:
    if driver is None or driver.get("state") != "running":
        return False
    return now - as_number(driver.get("updated"), default=-math.inf) <= HEARTBEAT_ALIVE_SECONDS


def failed_shard_ids(driver: dict | None) -> set[int]:
    failed = driver.get("failed_shards") if driver else None
    if not isinstance(failed, dict):
        return set()
    return {int(k) for k in failed if str(k).isdigit()}


def driver_faults(driver: dict | None) -> dict:
    """Retried shard attempts and lost encoders of the current (or last) run, as the driver last told them (a key
    only when driver.json has it)."""
    driver = driver or {}
    return {key: int(as_number(driver[key])) for key in ("shard_retries", "encoders_lost") if key in driver}


# What `rate` is measured over (the /status key `rate_basis`): a finished job's rate is over its wall time,
# start-up included, which is why it is lower than the driver's "throughput this run" (from the first encoder ready).
RATE_BASES = {"heartbeats": "the alive encoders' heartbeats now", "wall_time": "the job's wall time",
              "encode_time": "the shards' encode time"}


def idle_rate(stats: list[ShardStats], summary: dict | None) -> tuple[float, float, str]:
    """(rows/s, audio-s/s, basis) when no encoder is alive: over the job's wall time once the summary gives
    it, else the speed the published shards were encoded at (encoder time, so one encoder's speed)."""
    seconds, basis = (as_number(summary.get("elapsed_seconds")) if summary else 0.0), "wall_time"
    if seconds <= 0:
        seconds, basis = sum(s.encode_seconds for s in stats), "encode_time"
    if seconds <= 0:
        return 0.0, 0.0, basis
    return sum(s.rows for s in stats) / seconds, sum(s.audio_seconds for s in stats) / seconds, basis


def job_state(output: Path | Store, plan: dict | None, has_shards: bool, running: bool, driver: dict | None) -> str:
    if open_store(output).exists(COMPLETE_MARKER):
        return "complete"
    if running:
        return "running"
    if has_shards or driver is not None:
        return "stopped"
    return "planned" if plan is not None else "empty"


def collect_progress(output_dir: str | Path | Store, now: float | None = None) -> dict:
    """A JSON-able snapshot of the job in `output_dir` (a path, a URI or a shared.store.Store); see the module
    docstring for its tolerance."""
    output = open_store(output_dir)
    now = time.time() if now is None else now
    plan = output.read_json(PLAN_FILE)
    driver = output.read_json(DRIVER_FILE)
    planned_ids = planned_shard_ids(plan)
    infos: dict[int, ObjectInfo] = {}
    shards = planned_published_shards(output, planned_ids, infos)
    stats = [s for s in (SHARD_STATS_CACHE.get(p, infos.get(sid)) for sid, p in shards.items()) if s is not None]

    encoders = read_encoders(output, now)
    finished = output.exists(COMPLETE_MARKER)
    for e in encoders:  # a finished job's encoders stopped with it: neither alive nor stale, whatever their age
        e["alive"] = e["alive"] and not finished
        e["state"] = "alive" if e["alive"] else "finished" if finished else "stale"
    alive = [e for e in encoders if e["alive"]]
    running_ids = {e["shard"] for e in alive if e["shard"] is not None} - set(shards)
    failed_ids = failed_shard_ids(driver) - set(shards) - running_ids
    total = len(planned_ids) if planned_ids is not None else len(shards)
    if plan is not None and planned_ids is None:
        total = int(as_number(plan.get("num_shards"), default=len(shards)))

    rows_ok = sum(s.rows_ok for s in stats)
    rows_error = sum(s.rows_error for s in stats)
    audio_seconds = sum(s.audio_seconds for s in stats)
    summary = output.read_json(SUMMARY_FILE)
    if alive:
        rows_per_s = sum(e["rows_per_s"] for e in alive)
        audio_per_s = sum(e["audio_seconds_per_s"] for e in alive)
        basis = "heartbeats"
    else:
        rows_per_s, audio_per_s, basis = idle_rate(stats, summary)

    state = job_state(output, plan, bool(shards), bool(alive) or driver_is_running(driver, now), driver)
    duration = as_number(summary.get("elapsed_seconds")) if summary and state == "complete" else 0.0
    rows_planned = as_int_or_none(plan.get("num_rows")) if plan else None
    eta = None
    if state == "complete":
        eta = 0.0
    elif state == "running" and rows_planned is not None and rows_per_s > 0:
        eta = max(0, rows_planned - rows_ok - rows_error) / rows_per_s

    nodes: dict[str, int] = {}
    for e in encoders:
        node = node_label(e)
        nodes[node] = nodes.get(node, 0) + int(e["alive"])
    done = len(shards)
    return {
        "state": state,
        "shards": {"total": total, "done": done, "running": len(running_ids), "failed": len(failed_ids),
                   "pending": max(0, total - done - len(running_ids) - len(failed_ids))},
        "rows": {"planned": rows_planned, "ok": rows_ok, "error": rows_error},
        "audio_hours": audio_seconds / 3600.0,
        "rate": {"rows_per_s": rows_per_s, "audio_seconds_per_s": audio_per_s},
        "rate_basis": basis,
        "duration_seconds": duration or None,  # a finished job's wall time (summary.json)
        "eta_seconds": eta,
        "faults": driver_faults(driver),
        "encoders": encoders,
        "nodes": nodes,
        "updated": now,
    }


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_progress_line(progress: dict) -> str:
    shards, rows, rate = progress["shards"], progress["rows"], progress["rate"]
    duration = progress.get("duration_seconds")
    tail = (f"over the job's {format_duration(duration)} wall time (start-up included)" if duration
            else f"ETA {format_duration(progress['eta_seconds'])}")
    return (f"[{progress['state']}] shards {shards['done']}/{shards['total']} "
            f"({shards['running']} running, {shards['failed']} failed) "
            f"rows {rows['ok']} ok / {rows['error']} err, {progress['audio_hours']:.2f} h audio, "
            f"{rate['rows_per_s']:.1f} rows/s, {rate['audio_seconds_per_s']:.0f} audio-s/s, {tail}")
