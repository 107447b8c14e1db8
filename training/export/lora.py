"""Export of a LoRA checkpoint (training.model.lora): merged into the base weights, or as a peft adapter directory.

Merged: peft injects the run's adapters into the base talker, the checkpoint's adapters are loaded, lora_B is
scaled by --lora-scale, and peft's merge_and_unload puts plain Linear modules back: the model directory is
written exactly as a full fine-tune's (same names, no peft keys).

Adapter (--adapter): peft's own save_pretrained of the base talker with the adapters (adapter_config.json,
adapter_model.safetensors), to be applied with PeftModel.from_pretrained to the base model's talker, plus what
a custom voice changes outside the adapters: CUSTOM_VOICE_FILE (the model type and speaker names) and
TALKER_UPDATES_FILE (the speakers' codec-embedding rows and, with lora.train_heads, the trained heads and
embeddings). `add_custom_voice` applies those to a loaded base model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from training.checkpoint.step_folders import MODEL_KEY
from training.config import LoraConfig
from training.model.lora import (ADAPTER, HEAD_PARAMETERS, ROWS_DELTA, SPEAKER_EMBEDDING, base_fingerprint, import_peft,
                           is_adapter, matches_any, peft_config, read_meta)

CUSTOM_VOICE_FILE = "custom_voice.json"
TALKER_UPDATES_FILE = "talker_updates.safetensors"
_ROW_PREFIX = "speaker_row."  # TALKER_UPDATES_FILE key of a speaker's codec-embedding row: speaker_row.<row>


class LoraExportError(ValueError):
    """A LoRA checkpoint that cannot be exported as asked; the message says what to do instead."""


def load_adapters(checkpoint: Path, model, base: Path, scale: float = 1.0):
    """For a LoRA checkpoint: inject its adapters into `model.talker`, load them (and trained heads, and trained
    speaker rows straight into the codec embedding) and scale them by `scale` (lora_B is multiplied: the same as
    scaling alpha); returns the PeftModel around the talker
    (None for a full fine-tuning checkpoint). Refuses other base weights."""
    meta = read_meta(checkpoint)
    if meta is None:
        return None
    fingerprint = base_fingerprint(base)
    if fingerprint != meta["base_fingerprint"]:
        raise LoraExportError(f"{checkpoint} holds adapters trained on the weights of {meta['base_model']} "
                              f"({meta['base_fingerprint'][:19]}); {base} holds different weights "
                              f"({fingerprint[:19]}): pass that base model with --model")
    lora = LoraConfig(rank=meta["rank"], alpha=meta["alpha"], dropout=meta["dropout"], train_heads=meta["train_heads"])
    peft_model = import_peft().get_peft_model(model.talker, peft_config(lora, meta["targets"]), adapter_name=ADAPTER)
    # The checkpoint's names are the training module's: "talker." + the talker's own (peft-named) parameters.
    wanted = {f"talker.{name}": param.detach() for name, param in model.talker.named_parameters()
              if is_adapter(name) or (lora.train_heads and matches_any(name, HEAD_PARAMETERS))}
    rows = meta.get("speaker_rows") or []  # trained as peft trainable tokens: written into their rows below
    embedding = model.talker.get_input_embeddings().weight
    trained_rows = embedding.new_empty(len(rows), embedding.shape[1])
    if rows:
        wanted[f"talker.{SPEAKER_EMBEDDING}{ROWS_DELTA}"] = trained_rows
    dcp.load({MODEL_KEY: wanted}, checkpoint_id=str(checkpoint))
    with torch.no_grad():
        for name, param in model.talker.named_parameters():
            if ".lora_B." in name:
                param.mul_(scale)
        embedding[rows] = trained_rows  # the rows themselves, not a delta: --lora-scale leaves them as trained
    return peft_model


def load_trained_weights(checkpoint: Path, model, base: Path, scale: float = 1.0, keep_adapters: bool = False):
    """Any run's checkpoint into the unsharded `model`: a full fine-tune's weights, or a LoRA run's adapters
    merged into the base weights (`keep_adapters`: left unmerged, for the adapter directory). Returns the
    PeftModel of a LoRA run kept unmerged, else None."""
    from training.checkpoint.step_folders import load_model_weights
    from training.model.talker import TalkerForTraining

    adapters = load_adapters(checkpoint, model, base, scale)
    if adapters is None:
        if keep_adapters or scale != 1.0:
            raise LoraExportError(f"{checkpoint} is a full fine-tuning checkpoint: --adapter and --lora-scale apply "
                                  "to LoRA runs (lora.rank > 0) only")
        load_model_weights(checkpoint, TalkerForTraining(model.talker))
        return None
    if keep_adapters:
        return adapters
    merge(adapters)  # plain names from here on: the export is a full fine-tune's
    return None


def merge(peft_model) -> None:
    """Fold the adapters into the base weights, in place in the talker (plain Linear modules again)."""
    peft_model.merge_and_unload()


def write_adapter(peft_model, model, output: Path, rows: dict[str, int], meta: dict) -> None:
    """The peft adapter directory and the custom-voice changes beside it (see the module docstring)."""
    from safetensors.torch import save_file

    output.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(output))
    talker = peft_model.base_model.model
    updates = {}
    if meta["train_heads"]:
        updates = {name: param.detach().float().contiguous() for name, param in talker.named_parameters()
                   if matches_any(name, HEAD_PARAMETERS)}
    embedding = talker.get_input_embeddings().weight
    for row in rows.values():
        updates[f"{_ROW_PREFIX}{row}"] = embedding[row].detach().float().clone()
    if updates:
        save_file(updates, output / TALKER_UPDATES_FILE)
    if rows:
        voice = {"tts_model_type": "custom_voice", "spk_id": dict(rows),
                 "spk_is_dialect": dict(model.config.talker_config.spk_is_dialect)}
        (output / CUSTOM_VOICE_FILE).write_text(json.dumps(voice, indent=1))


def add_custom_voice(model, adapter_dir: str | Path) -> None:
    """Apply an adapter directory's non-adapter changes to a loaded base Qwen3TTSForConditionalGeneration:
    trained heads, speaker rows of the codec embedding, and the custom-voice config (speaker names)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    updates_path = adapter_dir / TALKER_UPDATES_FILE
    updates = load_file(str(updates_path)) if updates_path.is_file() else {}
    talker = model.talker
    parameters = dict(talker.named_parameters())
    embedding = talker.get_input_embeddings().weight
    with torch.no_grad():
        for key, value in updates.items():
            if key.startswith(_ROW_PREFIX):
                embedding[int(key[len(_ROW_PREFIX):])] = value.to(embedding.dtype)
            else:
                parameters[key].copy_(value.to(parameters[key].dtype))
    voice_path = adapter_dir / CUSTOM_VOICE_FILE
    if voice_path.is_file():
        voice = json.loads(voice_path.read_text())
        model.config.tts_model_type = model.tts_model_type = voice["tts_model_type"]
        model.config.talker_config.spk_id = voice["spk_id"]
        model.config.talker_config.spk_is_dialect = voice["spk_is_dialect"]
