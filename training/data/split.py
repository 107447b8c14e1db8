"""Which rows are held out for evaluation: a pure function of the row, never of the order rows are read in.

A row is held out when its shard is named in `eval.shards`, or when a hash of (seed, speaker, row id) falls
below `eval.fraction`. Nothing depends on the shard listing, the rank, the world size or the step, so every
rank, every restart and every follow-mode round agree on it, and a row published later is classified the
moment it appears. The hash is per speaker, so each speaker keeps about `fraction` of its rows for eval.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from training.config import EvalConfig

DEFAULT_SPEAKER = "default"  # the speaker of rows that name none
SPLIT_FILE = "eval_split.json"  # RUN/eval_split.json: the rule this run started with and the rows it chose


def speaker_of(speaker: str | None) -> str:
    """The speaker a row's `speaker` value names: compared lower-cased (as inference looks voices up)."""
    return (speaker or "").strip().lower() or DEFAULT_SPEAKER


def held_out_score(row_id: str, speaker: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, speaker, row id): stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}\x1f{speaker}\x1f{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out(row_id: str, speaker: str | None, seed: int, fraction: float) -> bool:
    return fraction > 0 and held_out_score(row_id, speaker_of(speaker), seed) < fraction


@dataclass(frozen=True)
class HeldOut:
    """The eval split of a run: `contains` says whether a row belongs to eval (and so is never trained on)."""
    fraction: float = 0.0
    shards: frozenset[int] = frozenset()
    seed: int = 0

    @classmethod
    def from_config(cls, config: EvalConfig) -> "HeldOut":
        return cls(config.fraction, frozenset(config.shards), config.seed)

    @property
    def enabled(self) -> bool:
        return self.fraction > 0 or bool(self.shards)

    def contains(self, shard_id: int, row_id: str, speaker: str | None) -> bool:
        return shard_id in self.shards or is_held_out(row_id, speaker, self.seed, self.fraction)

    def rule(self) -> dict:
        return {"fraction": self.fraction, "shards": sorted(self.shards), "seed": self.seed}


def check_same_rule(run_dir: Path, held_out: HeldOut) -> None:
    """A restart must hold out what the first start held out: otherwise eval rows were (or will be) trained on."""
    path = run_dir / SPLIT_FILE
    if not path.exists():
        return
    recorded = json.loads(path.read_text())["rule"]
    if recorded != held_out.rule():
        raise ValueError(f"{path} records the eval split {recorded}, but this start asks for {held_out.rule()}: "
                         f"rows held out before would be trained on (or the reverse). Restore eval.fraction/"
                         f"eval.shards/eval.seed to the recorded values, or start a new checkpoint.dir")


def write_split(run_dir: Path, held_out: HeldOut, rows: dict[str, list[str]]) -> None:
    """Record the rule and the held-out row ids per speaker (what the eval loss is computed on)."""
    path = run_dir / SPLIT_FILE
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps({"rule": held_out.rule(), "rows": rows}, indent=1))
    temporary.rename(path)


def read_split(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / SPLIT_FILE).read_text())


@dataclass(frozen=True)
class RowFilter:
    """One side of the split, handed to the shard reader: training rows only, or eval rows only."""
    held_out: HeldOut
    eval_side: bool

    def keeps(self, shard_id: int, row_id: str, speaker: str | None) -> bool:
        return self.held_out.contains(shard_id, row_id, speaker) == self.eval_side


def training_rows(held_out: HeldOut) -> RowFilter:
    return RowFilter(held_out, eval_side=False)


def eval_rows(held_out: HeldOut) -> RowFilter:
    return RowFilter(held_out, eval_side=True)
