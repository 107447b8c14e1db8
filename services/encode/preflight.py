"""Checks of the encode job's local inputs, run by the driver before Ray starts and before anything is written.

A bad --codec used to surface only inside the Ray actor, after Ray's start-up, as tracebacks, with plan.json
already written for the bad codec. Each check here returns one line naming the flag, the path, what is wrong
and the fix; the driver prints it and exits 2. Cheap checks only: headers and sizes, never a full read.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
from pathlib import Path

CODEC_MODEL_TYPE = "qwen3_tts_tokenizer_12hz"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
CODEC_FIX = ("pass the Qwen3-TTS-Tokenizer-12Hz directory (config.json, model.safetensors, preprocessor_config.json), "
             "e.g. a download of Qwen/Qwen3-TTS-Tokenizer-12Hz or one written by `python -m shared.tiny --output DIR`")


class InputProblem(ValueError):
    """One line for the user: flag, path, cause, fix."""


def check_readable_file(flag: str, path: Path, what: str) -> None:
    if not path.exists():
        raise InputProblem(f"{flag} {path}: no such file; {what}")
    if path.is_dir():
        raise InputProblem(f"{flag} {path}: is a directory, not a file; {what}")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise InputProblem(f"{flag} {path}: cannot be read ({exc.strerror}); {what}") from None


def check_manifest(path: Path) -> None:
    fix = "pass a JSONL manifest (one {\"audio\", \"text\", \"ref_audio\"} object a line) or a directory of audio files"
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise InputProblem(f"--manifest {path}: the directory cannot be read; {fix}")
        return
    check_readable_file("--manifest", path, fix)
    if path.stat().st_size == 0:
        raise InputProblem(f"--manifest {path}: the file is empty; {fix}")


def check_safetensors(flag: str, path: Path) -> None:
    """The header a safetensors file starts with (8-byte length, then JSON): catches a truncated download or
    a file of another kind without reading the weights."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            ok = 2 <= size <= min(100 << 20, path.stat().st_size - 8)
            header = json.loads(f.read(size)) if ok else None
    except (OSError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise InputProblem(f"{flag} {path}: not a safetensors file (truncated or another format); "
                           "download it again")


def check_codec(path: Path) -> None:
    flag = "--codec"
    if not path.exists():
        raise InputProblem(f"{flag} {path}: no such directory; {CODEC_FIX}")
    if not path.is_dir():
        raise InputProblem(f"{flag} {path}: is a file, not a directory; {CODEC_FIX}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InputProblem(f"{flag} {path}: no config.json there, so it is not a model directory; {CODEC_FIX}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputProblem(f"{flag} {config_path}: not readable JSON ({exc}); download it again") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != CODEC_MODEL_TYPE:
        raise InputProblem(f"{flag} {path}: config.json says model_type {model_type!r}, not {CODEC_MODEL_TYPE!r} "
                           f"(a TTS model directory? its codec is the speech_tokenizer/ folder inside); {CODEC_FIX}")
    weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise InputProblem(f"{flag} {path}: no weights (model.safetensors) next to config.json; {CODEC_FIX}")
    if weights.suffix == ".safetensors":
        check_safetensors(flag, weights)
    if not (path / "preprocessor_config.json").is_file():
        raise InputProblem(f"{flag} {path}: no preprocessor_config.json (the feature extractor); {CODEC_FIX}")


def check_reference_audio(path: Path) -> None:
    import soundfile as sf

    fix = "pass a readable WAV/FLAC file (the speaker reference for entries that have none)"
    check_readable_file("--ref-audio", path, fix)
    try:
        sf.info(str(path))
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputProblem(f"--ref-audio {path}: not a readable audio file ({detail}); {fix}") from None


def check_numbers(args: argparse.Namespace) -> None:
    if args.shard_size < 1:
        raise InputProblem(f"--shard-size {args.shard_size}: must be at least 1")
    if args.max_batch_items < 1:
        raise InputProblem(f"--max-batch-items {args.max_batch_items}: must be at least 1")
    if args.num_encoders < 0:
        raise InputProblem(f"--num-encoders {args.num_encoders}: must be 0 (one per accelerator) or more")
    if args.max_retries < 0:
        raise InputProblem(f"--max-retries {args.max_retries}: must be 0 or more")
    if not 0 <= args.min_seconds < args.max_seconds:
        raise InputProblem(f"--min-seconds {args.min_seconds} / --max-seconds {args.max_seconds}: need "
                           "0 <= min < max")


def check_output(output: str | Path) -> None:
    if isinstance(output, str) and output.lower().startswith("s3://"):
        from services.encode.store_preflight import check_s3_output

        return check_s3_output(output)
    from shared.shard_writer import local_output_problem

    problem = local_output_problem(Path(output))
    if problem:
        raise InputProblem(f"--output {output}: {problem}")


def check_inputs(args: argparse.Namespace) -> None:
    """Raises InputProblem for the first bad input, in the order of the command line."""
    check_manifest(args.manifest)
    check_codec(args.codec)
    check_output(args.output)
    if args.ref_audio:
        check_reference_audio(Path(args.ref_audio))
    check_numbers(args)
