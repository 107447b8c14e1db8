"""Turn a training checkpoint into a model directory Qwen3TTSModel.from_pretrained loads.

    python -m training.export --checkpoint runs/x/step-000500 --output out/voices --all-speakers
    python -m training.export --checkpoint runs/x/step-000500 --output out/my_voice --speaker-name my_voice

A custom-voice model (tts_model_type custom_voice, no speaker_encoder weights) holds each exported speaker's
x-vector in a row of the talker's codec embedding, from 3000 on, and names it in talker_config.spk_id
(lower-cased, as inference looks names up); use it with generate_custom_voice(text, speaker=name).
--all-speakers writes every speaker of the run (rows without `speaker` need --speaker-name for their name)
that trained: a speaker whose rows were all held out for eval is left out with a warning. --speaker-name alone
writes one: the speaker of that name, else the rows without `speaker` or the only speaker, when that choice is
not ambiguous. A speaker's x-vector is the mean of its references' x-vectors, the vector training used
(training.speakers.reference). Without either flag: a Base model directory (generate_voice_clone).
Tokenizer files, generation_config.json and speech_tokenizer/ are copied from the base model.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch
import yaml

from shared import schema
from shared.qwen import load_tts_model, save_model_dir
from shared.shard_index import current_index
from training.checkpoint import object_store as remote
from training.checkpoint.step_folders import resolve_checkpoint
from training.speakers.custom_voice import FIRST_SPEAKER_ROW, is_custom_voice, model_config
from training.export.custom_voice import export_custom_voice
from training.data.stream import resolve_output_dir
from training.model.lora import read_meta
from training.export.lora import LoraExportError, load_trained_weights, write_adapter
from training.speakers.reference import ReferenceCache, SpeakerTable, scan_speakers, speaker_key
from training.data.split import HeldOut

log = logging.getLogger(__name__)

_NOT_COPIED = {"config.json", "model.safetensors.index.json"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """A flag combination or run that cannot be exported; the message says what to pass instead."""


def checkpoint_argument(text: str) -> Path | str:
    return text if remote.is_remote(text) else Path(text)


def run_config(checkpoint: Path | str) -> dict:
    if remote.is_remote(str(checkpoint)):  # the run's config.yaml is copied next to its checkpoints
        text = remote.read_text(remote.join(str(checkpoint).rstrip("/").rpartition("/")[0], "config.yaml"))
        return yaml.safe_load(text) if text is not None else {}
    path = checkpoint.parent / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def run_held_out(config: dict) -> HeldOut:
    """The eval split the run trained with (its config.yaml's eval section; a restart may not change it)."""
    split = config.get("eval") or {}
    return HeldOut(float(split.get("fraction") or 0), frozenset(int(s) for s in split.get("shards") or ()),
                   int(split.get("seed") or 0))


def trained_speakers(output: Path, held_out: HeldOut, needs_reference: bool = True) -> set[str | None]:
    """Speaker keys with at least one row the run trained on: good, with frames (and a reference if the run
    needed one), not held out. The shard index says which speakers have such rows outside eval.shards; with
    eval.fraction a row's fate hangs on its id, so a shard is read only while one of its speakers has no row
    yet known to have trained (usually a few shards, not all)."""
    trained: set[str | None] = set()
    for name, entry in sorted(current_index(output).entries.items()):
        shard = schema.shard_id_of(name)
        if shard in held_out.shards:
            continue
        keys = {speaker_key(s.speaker) for s in entry.speakers
                if s.rows or (s.unreferenced_rows and not needs_reference)}
        if not held_out.fraction:
            trained |= keys
            continue
        if keys <= trained:
            continue
        path = schema.published_shard_file(output, shard).path
        for row in schema.read_rows(path, ["id", "speaker", "ref_audio", "num_frames", "error"]):
            if row.trains(needs_reference) and not held_out.contains(shard, row.id, row.speaker):
                trained.add(speaker_key(row.speaker))
    return trained


def speaker_label(key: str | None) -> str:
    return "the rows without `speaker`" if key is None else repr(key)


def choose_speakers(table: SpeakerTable, speaker_name: str | None, all_speakers: bool,
                    trained: set[str | None] | None = None) -> dict[str, str | None]:
    """Exported name -> speaker key of the run (None: the unnamed speaker), in row order (sorted names).
    `trained`: the speaker keys the run trained on (None: all of them)."""
    if not table.references:
        raise ExportError("the run's shards (data.shards of its config.yaml) hold no good row with a reference; "
                          "pass --ref-audio with --speaker-name")
    trained = set(table.references) if trained is None else trained
    chosen = (_every_speaker(table, speaker_name, trained) if all_speakers
              else _one_speaker(table, speaker_name, trained))
    return dict(sorted(chosen.items()))


def _every_speaker(table: SpeakerTable, speaker_name: str | None, trained: set[str | None]) -> dict[str, str | None]:
    named = table.named
    chosen = {name: name for name in named if name in trained}
    if None in table.references and None in trained:
        if not speaker_name:
            raise ExportError("some rows have no `speaker`: they form one speaker; name it with --speaker-name")
        if speaker_key(speaker_name) in named:
            raise ExportError(f"--speaker-name {speaker_name!r} is also a manifest speaker; pick another name")
        chosen[speaker_key(speaker_name)] = None
    untrained = [speaker_label(k) for k in (*named, None) if k in table.references and k not in trained]
    if untrained and not chosen:
        raise ExportError(f"no speaker of the run trained: every row of {', '.join(untrained)} is held out for "
                          "eval (eval.fraction/eval.shards of the run's config.yaml); train with fewer rows held out")
    if untrained:
        log.warning("export: leaving out %s: every row held out for eval (eval.fraction/eval.shards of the run's "
                    "config.yaml), so never trained", ", ".join(untrained))
    return chosen


def _one_speaker(table: SpeakerTable, speaker_name: str, trained: set[str | None]) -> dict[str, str | None]:
    """The speaker called `speaker_name`; else the rows without `speaker`, or the only named speaker, when the
    run has no other candidate: a name that matches no speaker of a run with both is refused, since it could
    name the unnamed rows or be a misspelt speaker."""
    key, named = speaker_key(speaker_name), table.named
    if key in named:
        source = key
    elif None in table.references and named:
        raise ExportError(f"--speaker-name {speaker_name!r} is none of the run's speakers ({', '.join(named)}) and "
                          "the run also has rows without `speaker`: pass --speaker-name with one of them, or "
                          f"--all-speakers --speaker-name {speaker_name} to export the rows without `speaker` as "
                          f"{key!r} beside them")
    elif None in table.references:
        source = None  # the rows without `speaker`, as a single-speaker run always was
    elif len(named) == 1:
        source = named[0]
    else:
        raise ExportError(f"the run has speakers {', '.join(named)}: pass --all-speakers, or --speaker-name "
                          "with one of them")
    if source not in trained:
        raise ExportError(f"{speaker_label(source)} never trained: every row of it is held out for eval "
                          "(eval.fraction/eval.shards of the run's config.yaml); export a speaker that trained")
    return {key: source}


def speaker_vectors(encoder: torch.nn.Module, shards: str, speaker_name: str | None, all_speakers: bool,
                    ref_audio: str | None, held_out: HeldOut = HeldOut()) -> dict[str, torch.Tensor]:
    """Exported name -> x-vector: the mean over the speaker's references (as in training), or --ref-audio's.
    Speakers whose rows `held_out` holds out, all of them, never trained and are not exported."""
    if ref_audio:
        if all_speakers:
            raise ExportError("--ref-audio names one reference; with --all-speakers each speaker's references "
                              "come from the shards")
        return {speaker_key(speaker_name): ReferenceCache(encoder).xvector(ref_audio)}
    output = resolve_output_dir(shards)
    table = scan_speakers(output)
    trained = trained_speakers(output, held_out) if held_out.enabled else None
    cache = ReferenceCache(encoder, table)
    return {name: cache.speaker_vector(key)
            for name, key in choose_speakers(table, speaker_name, all_speakers, trained).items()}


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
           ref_audio: str | None = None, dtype: str = "auto", all_speakers: bool = False, adapter: bool = False,
           lora_scale: float = 1.0) -> dict[str, int]:
    """Write the model directory (or, for a LoRA checkpoint with `adapter`, the peft adapter directory);
    returns the exported speakers (name -> codec-embedding row)."""
    checkpoint = resolve_checkpoint(checkpoint)  # RUN/best -> the step with the lowest eval loss
    config = run_config(checkpoint)
    base = Path(model_path or config.get("model", {}).get("path", ""))
    if is_custom_voice(model_config(base)):  # built-in speakers kept, new ones in the rows they trained with
        if adapter:
            raise ExportError(f"--adapter: {base} is a CustomVoice model, whose export carries its built-in "
                              "speakers next to the run's (rows, spk_id, spk_is_dialect), which a peft adapter "
                              "directory cannot; drop --adapter to write the CustomVoice model, adapters merged")
        return export_custom_voice(checkpoint, output, base, config, speaker_name, ref_audio, dtype, all_speakers,
                                   lora_scale)
    model = load_tts_model(base, "cpu", torch.float32)
    # The whole checkpoint (sharded over any number of ranks) is read into one unsharded model here.
    adapters = load_trained_weights(checkpoint, model, base, lora_scale, keep_adapters=adapter)

    state, rows = None, {}
    if speaker_name or all_speakers:
        vectors = speaker_vectors(model.speaker_encoder, config.get("data", {}).get("shards", ""), speaker_name,
                                  all_speakers, ref_audio, run_held_out(config))
        embedding = model.talker.get_input_embeddings().weight
        if FIRST_SPEAKER_ROW + len(vectors) > embedding.shape[0]:
            raise ExportError(f"{len(vectors)} speakers do not fit codec-embedding rows {FIRST_SPEAKER_ROW}.."
                              f"{embedding.shape[0] - 1}")
        rows = {name: FIRST_SPEAKER_ROW + i for i, name in enumerate(vectors)}
        with torch.no_grad():
            for name, vector in vectors.items():
                embedding[rows[name]] = vector
        model.config.tts_model_type = "custom_voice"
        model.config.talker_config.spk_id = dict(rows)
        model.config.talker_config.spk_is_dialect = {name: False for name in rows}
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("speaker_encoder.")}
    if adapter:
        write_adapter(adapters, model, output, rows, read_meta(checkpoint))
        return rows
    target_dtype = _target_dtype(base, dtype)
    if target_dtype != torch.float32:
        model = model.to(target_dtype)
        state = {k: v.to(target_dtype) for k, v in state.items()} if state is not None else None
    output.mkdir(parents=True, exist_ok=True)
    copy_base_files(base, output)
    save_model_dir(model, output, state_dict=state)
    return rows


def _target_dtype(base: Path, dtype: str) -> torch.dtype:
    """'auto' keeps the base checkpoint's stored dtype (training master weights are fp32)."""
    if dtype != "auto":
        return DTYPES[dtype]
    stored = json.loads((base / "config.json").read_text())
    return DTYPES.get(stored.get("dtype") or stored.get("torch_dtype") or "float32", torch.float32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=checkpoint_argument,
                        help="a step-NNNNNN/ folder of a run, or RUN/best (the lowest eval loss)")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--all-speakers", action="store_true",
                        help="export every speaker of the run as one custom-voice model")
    parser.add_argument("--speaker-name", help="the custom-voice name of the run's rows without `speaker` (or, "
                                               "alone, the one speaker to export)")
    parser.add_argument("--ref-audio", help="with --speaker-name: take the x-vector from this wav instead of the "
                                            "speaker's references in the shards")
    parser.add_argument("--model", help="base model directory (default: model.path of the run's config.yaml)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights dtype to write")
    parser.add_argument("--adapter", action="store_true",
                        help="LoRA run: write a peft adapter directory (plus custom-voice rows) instead of a merged "
                             "model")
    parser.add_argument("--lora-scale", type=float, default=1.0,
                        help="LoRA run: scale the adapter by this factor (default 1.0) before merging or writing it")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ref_audio and not args.speaker_name:
        parser.error("--ref-audio needs --speaker-name")
    try:
        rows = export(args.checkpoint, args.output, args.model, args.speaker_name, args.ref_audio, args.dtype,
                      args.all_speakers, args.adapter, args.lora_scale)
    except (ExportError, LoraExportError) as e:
        parser.exit(2, f"export: error: {e}\n")
    kind = "peft adapter, " if args.adapter else ""
    kind += (f"custom voice, speakers {', '.join(f'{n!r} (row {r})' for n, r in rows.items())}" if rows
             else "Base model")
    print(f"exported {resolve_checkpoint(args.checkpoint)} to {args.output} ({kind})")
