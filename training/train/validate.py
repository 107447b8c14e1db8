"""Checks of a training command before the heavy start-up (process group, model load, FSDP), writing nothing.

A mistyped key, a missing model directory or an empty shards directory used to surface as a traceback per rank
under torchrun's failure box, after config.yaml and the run folder had been written. Here each becomes one line
naming the key, the path and the fix, printed once (by rank 0; every rank sees the same files), and exit code 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from pathlib import Path

import yaml

from shared import schema
from shared.store import is_s3_uri, open_store
from training.config import Config, load_config, parse_override

EXIT_CODE = 2
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class TrainingInputProblem(ValueError):
    """One line for the user."""


def known_keys(section=None, prefix: str = "") -> list[str]:
    """Every dotted key of the typed config: train.lr, data.shards, ..."""
    section = section if section is not None else Config()
    keys = []
    for name in typing.get_type_hints(type(section)):
        value = getattr(section, name)
        keys += known_keys(value, f"{prefix}{name}.") if dataclasses.is_dataclass(value) else [f"{prefix}{name}"]
    return keys


def dotted(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        if isinstance(value, dict) and value:
            keys += dotted(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def check_keys(values: dict, origin: str) -> None:
    """Every key of `values` must be a config key; the nearest known one is suggested (sections count too)."""
    known = known_keys()
    sections = {k.split(".")[0] for k in known}
    for key in dotted(values):
        if key in known or key in sections:
            continue
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        leaf = key.rsplit(".", 1)[-1]
        near = near or [k for k in known if k.rsplit(".", 1)[-1] == leaf][:1]
        hint = f"; did you mean {near[0]}?" if near else f"; known sections: {', '.join(sorted(sections))}"
        raise TrainingInputProblem(f"unknown config key {key} ({origin}){hint}")


def read_values(config_path: str | None, overrides: list[str]) -> None:
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise TrainingInputProblem(f"--config {path}: no such file; pass a YAML file such as "
                                       "training/configs/qwen3tts_1.7b.yaml")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise TrainingInputProblem(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if isinstance(values, dict):
            check_keys(values, str(path))
    for text in overrides:
        try:
            check_keys(parse_override(text), f"override {text!r}")
        except ValueError as exc:
            if isinstance(exc, TrainingInputProblem):
                raise
            raise TrainingInputProblem(f"{exc}; write overrides as section.key=value, e.g. train.lr=1e-5") from None


def check_model(path_text: str) -> None:
    fix = ("point model.path at a Qwen3-TTS Base model directory (config.json, model.safetensors, tokenizer files), "
           "e.g. a download of Qwen3-TTS-12Hz-1.7B-Base or `python -m shared.tiny --output DIR` then DIR/model")
    path = Path(path_text)
    if not path.is_dir():
        raise TrainingInputProblem(f"model.path={path}: {'is a file' if path.exists() else 'no such directory'}; {fix}")
    if not (path / "config.json").is_file():
        raise TrainingInputProblem(f"model.path={path}: no config.json there; {fix}")
    if not any((path / name).is_file() for name in WEIGHTS):
        raise TrainingInputProblem(f"model.path={path}: no weights (model.safetensors) next to config.json; {fix}")


def check_shards(shards_text: str, follow: bool) -> None:
    from training.data.stream import resolve_output_dir

    encode = ("run the encode service first (python -m services.encode ... --output DIR) and pass data.shards=DIR")
    if is_s3_uri(shards_text):
        return check_object_store_shards(shards_text, follow, encode)
    output = resolve_output_dir(shards_text)
    if not output.is_dir():
        what = "is a file" if output.exists() else "no such directory"
        raise TrainingInputProblem(f"data.shards={shards_text}: {what}; {encode}")
    if not ((output / schema.SHARDS_DIR).is_dir() or (output / schema.PLAN_FILE).is_file()):
        raise TrainingInputProblem(f"data.shards={shards_text}: not an encode output directory (no "
                                   f"{schema.SHARDS_DIR}/ and no {schema.PLAN_FILE}); {encode}")
    if not follow and not schema.published_shards(output):
        raise TrainingInputProblem(f"data.shards={shards_text}: no published shards yet; {encode}, or set "
                                   "data.follow=true to train while it encodes")


def check_object_store_shards(shards_text: str, follow: bool, encode: str) -> None:
    from training.data.stream import resolve_output_dir

    try:
        store = open_store(resolve_output_dir(shards_text))
        is_output = bool(store.listing(schema.SHARDS_DIR)) or store.exists(schema.PLAN_FILE)
    except OSError as exc:
        raise TrainingInputProblem(f"data.shards={shards_text}: cannot read the object store ({exc.strerror or exc}); "
                                   "check AWS_ENDPOINT_URL, the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                                   "or AWS_PROFILE) and the bucket") from None
    if not is_output:
        raise TrainingInputProblem(f"data.shards={shards_text}: not an encode output (no {schema.SHARDS_DIR}/ and no "
                                   f"{schema.PLAN_FILE}); {encode}")
    if not follow and not schema.published_shards(store):
        raise TrainingInputProblem(f"data.shards={shards_text}: no published shards yet; {encode}, or set "
                                   "data.follow=true to train while it encodes")


def check_run_dir(path_text: str) -> None:
    if is_s3_uri(path_text):
        return  # checked when the run starts writing there
    path = Path(path_text)
    if path.exists() and not path.is_dir():
        raise TrainingInputProblem(f"checkpoint.dir={path}: is a file; pass a directory (created if missing)")


def validate(config_path: str | None, overrides: list[str]) -> Config:
    """The typed config, or TrainingInputProblem for the first thing wrong with the command."""
    read_values(config_path, overrides)
    try:
        config = load_config(config_path, overrides)
    except (ValueError, TypeError) as exc:
        raise TrainingInputProblem(str(exc)) from None
    check_model(config.model.path)
    check_shards(config.data.shards, config.data.follow)
    check_run_dir(config.checkpoint.dir)
    check_attention(config)
    check_resume(config)
    check_lora(config)
    check_voices(config)
    return config


def check_attention(config: Config) -> None:
    """An attention implementation the device this command trains on cannot train with (flex_attention off CUDA)."""
    if config.model.attn_implementation != "flex_attention":
        return
    from shared.device import attention_for, resolve_kind

    try:
        kind = resolve_kind(config.train.device)
    except (ValueError, RuntimeError):  # a device that is missing: start-up reports it, naming the device
        return
    try:
        attention_for(config.model.attn_implementation, kind, config.fsdp.param_dtype)
    except ValueError as exc:
        raise TrainingInputProblem(str(exc)) from None


def check_resume(config: Config) -> None:
    """The newest checkpoint must be resumable by this command (same data-plan settings; an older-format one
    on the world size that wrote it)."""
    from training.checkpoint.resume import resume_problem  # reads checkpoint metadata only, but imports torch

    problem = resume_problem(config, int(os.environ.get("WORLD_SIZE", "1")))
    if problem:
        raise TrainingInputProblem(problem)


def check_lora(config: Config) -> None:
    """Target patterns against the model's module names, and a resumed run against its base weights."""
    from training.model import lora

    problem = (config.lora.enabled and lora.target_problem(config)) or lora.resume_problem(config)
    if problem:
        raise TrainingInputProblem(problem)


def check_voices(config: Config) -> None:
    """Speakers against the model: built-in name clashes, dialect rows, model.speaker_encoder's size."""
    from training.speakers.custom_voice import VoiceProblem, check_run

    try:
        check_run(config)
    except VoiceProblem as exc:
        raise TrainingInputProblem(str(exc)) from None


def validate_or_exit(config_path: str | None, overrides: list[str]) -> Config:
    """validate(); on a problem, rank 0 prints it as one line and every rank exits with EXIT_CODE."""
    try:
        return validate(config_path, overrides)
    except TrainingInputProblem as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CODE)
