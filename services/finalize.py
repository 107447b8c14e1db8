"""End of a run: the summary, the error report and the completion marker (written last), and the
upstream-format JSONL export for tools that expect `train_with_codes.jsonl`."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from services.plan import Plan, write_json_atomic
from shared.schema import COMPLETE_MARKER, ERRORS_FILE, SUMMARY_FILE, ShardRow, published_shards, read_rows, read_stats


def iter_rows(output: Path, columns: list[str]):
    """Every row of every published shard, in shard order, with the asked ShardRow fields read."""
    for _, path in published_shards(output).items():
        yield from read_rows(path, columns)


def write_summary(output: Path, plan: Plan, elapsed: float) -> dict:
    """Totals over the published shards plus errors.jsonl; _COMPLETE only if every shard is there."""
    shards = published_shards(output)
    stats = [read_stats(p) for p in shards.values()]
    errors_path = output / ERRORS_FILE
    tmp = errors_path.with_name(errors_path.name + ".tmp")
    reasons: dict[str, int] = {}
    with open(tmp, "w", encoding="utf-8") as f:
        for row in iter_rows(output, ["index", "id", "audio", "error"]):
            if not row.ok:
                reasons[row.reason] = reasons.get(row.reason, 0) + 1
                f.write(json.dumps({"index": row.index, "id": row.id, "audio": row.audio, "error": row.error},
                                   ensure_ascii=False) + "\n")
    os.replace(tmp, errors_path)
    complete = len(shards) == len(plan.shards)
    summary = {
        "complete": complete, "shards_total": len(plan.shards), "shards_done": len(shards),
        "rows_planned": plan.num_rows, "rows_ok": sum(s.rows_ok for s in stats),
        "rows_error": sum(s.rows_error for s in stats), "errors_by_reason": reasons,
        "audio_hours": sum(s.audio_seconds for s in stats) / 3600, "frames": sum(s.frames for s in stats),
        "elapsed_seconds": elapsed, "finished": time.time(),
    }
    write_json_atomic(output / SUMMARY_FILE, summary)
    if complete:
        (output / COMPLETE_MARKER).write_text(json.dumps({"finished": summary["finished"]}))
    return summary


def export_jsonl(output: Path, destination: Path) -> int:
    """Good rows as upstream's train_with_codes.jsonl: audio, text, ref_audio, audio_codes (frames x 16)."""
    tmp = destination.with_name(destination.name + ".tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in iter_rows(output, ["audio", "text", "ref_audio", "codes", "error"]):
            if row.ok:
                f.write(json.dumps({"audio": row.audio, "text": row.text, "ref_audio": row.ref_audio,
                                    "audio_codes": row.codes.tolist()}, ensure_ascii=False) + "\n")
                count += 1
    os.replace(tmp, destination)
    return count
