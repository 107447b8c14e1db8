"""Per-step metrics to the console and RUN_DIR/metrics.jsonl (rank 0 only)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("training")


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"

    def append(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.append(record)
        log.info("step %d  loss %.4f (talker %.4f, sub-talker %.4f)  grad_norm %.3f  lr %.2e  %.0f frames/s  "
                 "step %.2fs  peak_mem %.2f GiB", record["step"], record["loss"], record["talker_loss"],
                 record["sub_talker_loss"], record["grad_norm"], record["lr"], record["frames_per_s"],
                 record["step_time_s"], record["peak_memory_bytes"] / 2**30)


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    """The records of one kind: "train" (one per logged step) or "eval" (records carrying kind "eval")."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in records if r.get("kind", "train") == kind]
