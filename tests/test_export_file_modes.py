"""An exported model directory is meant to be served or shared: its weights get the same permissions as the
rest of the directory, the ones the umask gives (not the owner-only mode safetensors creates files with)."""
import os
import stat

import pytest
import torch

from shared.qwen import load_tts_model, save_model_dir


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_weights_take_the_umask_mode_like_the_other_files(tiny_dir, tmp_path, umask):
    model = load_tts_model(tiny_dir / "model", "cpu", torch.float32)
    previous = os.umask(umask)
    try:
        save_model_dir(model, tmp_path / "export")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "export").iterdir()}
    assert modes == {"config.json": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask}, modes
