"""Per-step metrics to the console and RUN_DIR/metrics.jsonl (rank 0 only), and the throughput meter.

Times and rates are averages over the steps since the previous line: the loop synchronises with the
device only when it writes a line (every train.log_interval steps), so a single step's time is not
observable on an accelerator without adding a sync.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from training.data.stream import Step
from training.train.flops import FlopModel

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
        mfu = f"  mfu {record['mfu']:.1%}" if record.get("mfu") is not None else ""
        log.info("step %d  loss %.4f (talker %.4f, sub-talker %.4f)  grad_norm %.3f  lr %.2e  %.0f frames/s  "
                 "%.3f TFLOP/s%s  padding %.1f%%  data wait %.3fs  step %.2fs  peak_mem %.2f GiB", record["step"],
                 record["loss"], record["talker_loss"], record["sub_talker_loss"], record["grad_norm"], record["lr"],
                 record["frames_per_s"], record["tflops"], mfu, 100 * record["padding_fraction"],
                 record["data_wait_s"], record["step_time_s"], record["peak_memory_bytes"] / 2**30)


class Throughput:
    """Counts what the steps since the last record computed (from host-side shapes) and how long they took."""

    def __init__(self, flops: FlopModel, world: int, peak_tflops: float | None):
        self.flops, self.world, self.peak = flops, world, peak_tflops
        self.start = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self.steps, self.frames, self.training_flops, self.wait_s = 0, 0, 0.0, 0.0

    def add(self, step: Step, data_wait_s: float) -> dict:
        """One step (every rank's micro-batches): returns the step's own counts. `utterances` counts every
        utterance the step trained, `repeated` those of them in padding repeats (trained earlier in the round),
        so the sum of utterances - repeated over an epoch's lines is the epoch's rows."""
        shapes = step.shapes
        self.steps += 1
        frames = sum(s.frames for s in shapes)
        self.frames += frames
        self.training_flops += sum(self.flops.training_flops(s) for s in shapes)
        self.wait_s += data_wait_s
        tokens, padding = sum(s.positions for s in shapes), sum(s.padding for s in shapes)
        return dict(frames=frames, tokens=tokens, utterances=sum(s.utterances for s in shapes),
                    repeated=step.repeated_utterances, padding_fraction=padding / tokens if tokens else 0.0,
                    data_wait_s=data_wait_s, micro_batches=len(shapes) // self.world)

    def restart_clock(self) -> None:
        """Leave out the time since the last record (e.g. a checkpoint save just after it)."""
        self.start = time.perf_counter()

    def rates(self) -> dict:
        """Averages since the previous call (call after the device has synchronised)."""
        now = time.perf_counter()
        elapsed, steps = now - self.start, max(self.steps, 1)
        tflops = self.training_flops / self.world / elapsed / 1e12  # per device
        record = dict(step_time_s=elapsed / steps, frames_per_s=self.frames / elapsed, tflops=tflops,
                      mfu=tflops / self.peak if self.peak else None, data_wait_mean_s=self.wait_s / steps)
        self.start = now
        self._reset()
        return record


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    """The records of one kind: "train" (one per logged step) or "eval" (records carrying kind "eval")."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in records if r.get("kind", "train") == kind]
