"""Turn a training checkpoint into a model directory Qwen3TTSModel.from_pretrained loads.

    python -m training.export --checkpoint runs/x/step-000500 --output out/my_voice --speaker-name my_voice

With --speaker-name: the single-speaker custom-voice form (tts_model_type custom_voice, spk_id {name: 3000},
the reference's x-vector in codec-embedding row 3000, no speaker_encoder weights); use it with
generate_custom_voice(text, speaker=name). Without: a Base model directory (generate_voice_clone).
Tokenizer files, generation_config.json and speech_tokenizer/ are copied from the base model.
"""
from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

import torch
import yaml

from shared import schema
from shared.audio import AudioLimits, load_audio
from shared.qwen import load_tts_model, save_model_dir, speaker_mel
from training.checkpoint import load_model_weights, resolve_checkpoint
from training.data import resolve_output_dir
from training.model import TalkerForTraining, speaker_embedding

SPEAKER_ROW = 3000  # the codec-embedding row upstream's custom-voice fine-tunes use
_NOT_COPIED = {"config.json", "model.safetensors.index.json"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_config(checkpoint: Path) -> dict:
    path = checkpoint.parent / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def most_common_reference(shards: str) -> str:
    """The reference the training data used most (upstream recommends one reference for every line)."""
    counts: Counter[str] = Counter()
    for path in schema.published_shards(resolve_output_dir(shards)).values():
        counts.update(row.ref_audio for row in schema.read_rows(path, ["ref_audio", "error"])
                      if row.ok and row.ref_audio)
    if not counts:
        raise ValueError(f"no good rows under {shards}; pass --ref-audio")
    return counts.most_common(1)[0][0]


def copy_base_files(base: Path, out: Path) -> None:
    for entry in base.iterdir():
        if entry.name in _NOT_COPIED or entry.suffix in (".safetensors", ".bin"):
            continue
        target = out / entry.name
        if entry.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(entry, target)
        else:
            shutil.copy2(entry, target)


def export(checkpoint: Path, output: Path, model_path: str | None = None, speaker_name: str | None = None,
           ref_audio: str | None = None, dtype: str = "auto") -> Path:
    checkpoint = resolve_checkpoint(checkpoint)  # RUN/best -> the step with the lowest eval loss
    config = run_config(checkpoint)
    base = Path(model_path or config.get("model", {}).get("path", ""))
    model = load_tts_model(base, "cpu", torch.float32)
    # The whole checkpoint (sharded over any number of ranks) is read into one unsharded model here.
    load_model_weights(checkpoint, TalkerForTraining(model.talker))
    output.mkdir(parents=True, exist_ok=True)
    copy_base_files(base, output)

    state = None
    if speaker_name:
        ref = ref_audio or most_common_reference(config["data"]["shards"])
        mel = speaker_mel(load_audio(ref, AudioLimits(max_seconds=600.0)).samples)
        xvector = speaker_embedding(model.speaker_encoder, mel)
        name = speaker_name.lower()  # inference looks speakers up lower-cased
        with torch.no_grad():
            model.talker.get_input_embeddings().weight[SPEAKER_ROW] = xvector
        model.config.tts_model_type = "custom_voice"
        model.config.talker_config.spk_id = {name: SPEAKER_ROW}
        model.config.talker_config.spk_is_dialect = {name: False}
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("speaker_encoder.")}
    target_dtype = _target_dtype(base, dtype)
    if target_dtype != torch.float32:
        model = model.to(target_dtype)
        state = {k: v.to(target_dtype) for k, v in state.items()} if state is not None else None
    save_model_dir(model, output, state_dict=state)
    return output


def _target_dtype(base: Path, dtype: str) -> torch.dtype:
    """'auto' keeps the base checkpoint's stored dtype (training master weights are fp32)."""
    if dtype != "auto":
        return DTYPES[dtype]
    stored = json.loads((base / "config.json").read_text())
    return DTYPES.get(stored.get("dtype") or stored.get("torch_dtype") or "float32", torch.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a step-NNNNNN/ folder of a run, or RUN/best (the lowest eval loss)")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--speaker-name", help="export the single-speaker custom-voice form under this name")
    parser.add_argument("--ref-audio", help="reference wav for the speaker x-vector (default: the run's most "
                                            "used reference)")
    parser.add_argument("--model", help="base model directory (default: model.path of the run's config.yaml)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights dtype to write")
    args = parser.parse_args(argv)
    out = export(args.checkpoint, args.output, args.model, args.speaker_name, args.ref_audio, args.dtype)
    kind = f" (custom voice {args.speaker_name!r})" if args.speaker_name else " (Base model)"
    print(f"exported {resolve_checkpoint(args.checkpoint)} to {out}{kind}")


if __name__ == "__main__":
    main()
