"""Evaluation during training: held-out loss, best checkpoint, voice and forgetting checks."""
