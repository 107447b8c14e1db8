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

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("step %d  loss %.4f (talker %.4f, sub-talker %.4f)  grad_norm %.3f  lr %.2e  %.0f frames/s  "
                 "step %.2fs  peak_mem %.2f GiB", record["step"], record["loss"], record["talker_loss"],
                 record["sub_talker_loss"], record["grad_norm"], record["lr"], record["frames_per_s"],
                 record["step_time_s"], record["peak_memory_bytes"] / 2**30)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
