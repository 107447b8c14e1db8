"""Export of a run on a CustomVoice model: the built-in speakers (spk_id, spk_is_dialect and their rows, as the
base model had them) plus the run's speakers in the rows they trained with (RUN/voices.json).

A new speaker's row holds its mean reference x-vector (model.speaker_encoder's encoder) or, for a run without
one, the row as trained. Built-in rows are copied back from the base model, so a built-in voice leaves the
export exactly as it came (weight decay touches every row of the embedding, even unused ones), unless the run
retrained that speaker (model.retrain_speakers). A LoRA run's adapters (and trained speaker rows) are merged into
the base weights first (training.export.lora). The export is always a CustomVoice model: every flag
combination of training.export works, and no flag exports every speaker of the run.
"""
from __future__ import annotations

from pathlib import Path

import torch

from shared.qwen import load_speaker_encoder, load_tts_model, save_model_dir
from training.speakers.custom_voice import VOICES_FILE, Voices
from training.data.stream import resolve_output_dir
from training.export.lora import load_trained_weights
from training.speakers.reference import ReferenceCache, scan_speakers


def export_custom_voice(checkpoint: Path, output: Path, base: Path, config: dict, speaker_name: str | None,
                        ref_audio: str | None, dtype: str, all_speakers: bool, lora_scale: float = 1.0
                        ) -> dict[str, int]:
    """Write the model directory; returns the run's exported speakers (name -> codec-embedding row)."""
    from training.export.model_dir import (ExportError, _target_dtype, choose_speakers, copy_base_files, run_held_out,
                                 trained_speakers)

    voices = Voices.read(checkpoint.parent)
    if voices is None:
        raise ExportError(f"{checkpoint.parent} has no {VOICES_FILE} (the speaker rows of a run on a CustomVoice "
                          "model); export a run trained by this version")
    model = load_tts_model(base, "cpu", torch.float32)
    embedding = model.talker.get_input_embeddings().weight
    kept = {name: embedding[row].detach().clone() for name, row in voices.builtin.items()
            if name not in voices.retrained}
    load_trained_weights(checkpoint, model, base, lora_scale)  # a LoRA run's adapters merged

    shards = resolve_output_dir(config.get("data", {}).get("shards", ""))
    table = scan_speakers(shards, needs_reference=not voices.learned)  # a trained row needs no reference
    if ref_audio and (all_speakers or not speaker_name):
        raise ExportError("--ref-audio names one reference: pass it with --speaker-name alone")
    held_out = run_held_out(config)  # a speaker whose rows were all held out never trained: left out
    trained = trained_speakers(shards, held_out, not voices.learned) if held_out.enabled else None
    chosen = choose_speakers(table, speaker_name, all_speakers or not speaker_name, trained)
    clash = [name for name, key in chosen.items() if name in voices.builtin and key != name]
    if clash:
        raise ExportError(f"--speaker-name {clash[0]!r} is a built-in speaker of the base model; pick another name")
    encoder_path = config.get("model", {}).get("speaker_encoder")
    cache = ReferenceCache(load_speaker_encoder(encoder_path), table) if not voices.learned else None
    rows = {}
    with torch.no_grad():
        for name, key in chosen.items():
            rows[name] = voices.row_of(key)
            if cache is not None:
                embedding[rows[name]] = cache.xvector(ref_audio) if ref_audio else cache.speaker_vector(key)
        for name, vector in kept.items():
            embedding[voices.builtin[name]] = vector
    talker = model.config.talker_config
    talker.spk_id = {**voices.builtin, **rows}
    talker.spk_is_dialect = {**voices.builtin_dialect, **{name: voices.dialect[key] for name, key in chosen.items()}}
    target_dtype = _target_dtype(base, dtype)
    model = model.to(target_dtype)
    output.mkdir(parents=True, exist_ok=True)
    copy_base_files(base, output)
    save_model_dir(model, output)
    return rows

