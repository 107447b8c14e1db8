"""TensorBoard event files of a run, RUN/tensorboard/ (rank 0 only): `tensorboard --logdir RUN/tensorboard`.

Scalars: train/* (losses, lr, grad norm, frames/s, TFLOP/s, step time, padding, data wait), eval/* (the
same losses, and eval/loss/<speaker>), samples/* (similarity, cer, wer: the mean, and per speaker), keep/<built-in speaker>/* (codebook0,
all_codebooks, similarity: training.eval.keep_check); audio:
samples/<speaker>-<k>. A resumed run opens the writer with purge_step just after its checkpoint's step, so
TensorBoard drops what the interrupted run logged after the checkpoint instead of drawing it twice.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

TRAIN_SCALARS = ("loss", "talker_loss", "sub_talker_loss", "lr", "grad_norm", "frames_per_s", "tflops", "step_time_s",
                 "padding_fraction", "data_wait_s")
BOARD_DIR = "tensorboard"


class Board:
    def __init__(self, run_dir: Path, enabled: bool, resumed_step: int = 0):
        self.path, self.enabled, self.resumed_step = run_dir / BOARD_DIR, enabled, resumed_step
        self._writer = None

    @property
    def writer(self):
        """Opened at the first value, so a start that fails early leaves no event file (and no purge)."""
        if self._writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            # The resumed run logs again from the step after its checkpoint: only those steps are stale.
            purge = self.resumed_step + 1 if self.resumed_step else None
            self._writer = SummaryWriter(str(self.path), purge_step=purge, flush_secs=10)
        return self._writer

    def train(self, record: dict) -> None:
        if self.writer is None:
            return
        for name in TRAIN_SCALARS:
            if name in record:
                self.writer.add_scalar(f"train/{name}", record[name], record["step"])

    def eval(self, result) -> None:
        """An evaluate.EvalResult: its losses and, on rank 0, its scored samples."""
        if self.writer is None:
            return
        step, add = result.step, self.writer.add_scalar
        add("eval/loss", result.loss, step)
        add("eval/talker_loss", result.talker_loss, step)
        add("eval/sub_talker_loss", result.sub_talker_loss, step)
        for speaker, loss in result.loss_by_speaker.items():
            add(f"eval/loss/{speaker}", loss, step)
        record = result.record()
        for name in ("similarity", "cer", "wer"):
            if f"sample_{name}" in record:
                add(f"samples/{name}", record[f"sample_{name}"], step)
        for speaker, score in result.keep.items():  # a CustomVoice base's built-in speakers (training.eval.keep_check)
            for name, value in score.to_dict().items():
                if value is not None:
                    add(f"keep/{speaker}/{name}", value, step)
        for sample in result.samples:
            for name in ("similarity", "cer", "wer"):
                value = getattr(sample, name)
                if value is not None:
                    add(f"samples/{name}/{sample.speaker}-{sample.index}", value, step)
            audio, rate = sf.read(sample.path, dtype="float32")
            self.writer.add_audio(f"samples/{sample.speaker}-{sample.index}", np.clip(audio, -1, 1), step,
                                  sample_rate=rate)
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
