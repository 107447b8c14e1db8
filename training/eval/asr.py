"""Intelligibility of a sample: a local speech-recognition model transcribes it; CER and WER against the sentence.

The model is any directory transformers' "automatic-speech-recognition" pipeline loads (a Whisper checkpoint,
for instance); nothing is downloaded. Both texts are normalised the same way first (lower case, punctuation
dropped, whitespace collapsed); the character error rate ignores spaces, so it also suits Chinese text, where
the word error rate means little.
"""
from __future__ import annotations

import contextlib
import re
import unicodedata
from pathlib import Path

import numpy as np
import torch


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c).startswith(("P", "S")) else c for c in text)
    return re.sub(r"\s+", " ", text).strip()


def edit_distance(reference: list, hypothesis: list) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, start=1):
        current = [i]
        for j, hyp in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


def error_rate(reference: list, hypothesis: list) -> float:
    """Edits per reference unit; a hypothesis for an empty reference counts each inserted unit as an error."""
    return edit_distance(reference, hypothesis) / max(1, len(reference))


def cer(reference: str, hypothesis: str) -> float:
    return error_rate(list(normalise(reference).replace(" ", "")), list(normalise(hypothesis).replace(" ", "")))


def wer(reference: str, hypothesis: str) -> float:
    return error_rate(normalise(reference).split(), normalise(hypothesis).split())


class Transcriber:
    """transformers' ASR pipeline over a local model directory, loaded once on the host; on_device() places it on
    an accelerator for a while (training's memory stays free of it between evals)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        from transformers import pipeline

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"eval.asr_model {path} has no config.json; give a local speech-recognition "
                                    f"model directory (e.g. a Whisper checkpoint)")
        self.pipeline = pipeline("automatic-speech-recognition", model=str(path), device=device)

    def __call__(self, samples: np.ndarray, sample_rate: int) -> str:
        out = self.pipeline({"raw": np.asarray(samples, dtype=np.float32), "sampling_rate": sample_rate})
        return out["text"].strip()

    @contextlib.contextmanager
    def on_device(self, device: torch.device):
        """The model on `device` for the block, then back on the host (the pipeline places inputs by its .device)."""
        self._place(device)
        try:
            yield self
        finally:
            self._place(torch.device("cpu"))

    def _place(self, device: torch.device) -> None:
        self.pipeline.model.to(device)
        self.pipeline.device = device
