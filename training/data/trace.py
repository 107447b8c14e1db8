"""The rows each step trained, per rank (data.trace_rows): RUN/trained_rows/rank-NNNNN.jsonl.

One line per step a rank trained: {"step", "epoch", "rows": row ids, "repeated": the ids among them that a
padding repeat trained again}. It is evidence of what the model saw, for checking an epoch row by row (e.g.
across a resume on another world size). A resumed run first drops every rank's lines after the checkpoint it
resumed from (those steps are trained again), so the files always describe the steps the model's state holds.
"""
from __future__ import annotations

import json
from pathlib import Path

from training.data.stream import Step

TRACE_DIR = "trained_rows"


class RowTrace:
    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.path = Path(run_dir) / TRACE_DIR / f"rank-{rank:05d}.jsonl" if enabled else None

    def write(self, step_number: int, step: Step) -> None:
        if self.path is None:
            return
        rows = [[r.row.id for seq in mb for r in seq] for mb in step.micro_batches]
        repeated = [row for ids, again in zip(rows, step.own_repeated) if again for row in ids]
        record = {"step": step_number, "epoch": step.position.epoch, "rows": [row for ids in rows for row in ids],
                  "repeated": repeated}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def drop_after(run_dir: Path, step: int) -> None:
    """Rank 0 at start (every rank waits for it): forget the steps after `step`, the checkpoint resumed from
    (0: none), on every rank's file, including ranks this start does not have."""
    for path in sorted((Path(run_dir) / TRACE_DIR).glob("rank-*.jsonl")):
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        temporary.rename(path)


def read_trained_rows(run_dir: Path) -> list[dict]:
    """Every rank's records, each with its "rank"."""
    records = []
    for path in sorted((Path(run_dir) / TRACE_DIR).glob("rank-*.jsonl")):
        rank = int(path.stem.split("-")[1])
        records += [{**json.loads(line), "rank": rank} for line in path.read_text().splitlines() if line.strip()]
    return records
