"""Rehearsal on a CustomVoice model.path: the base model's own speech for its built-in speakers, mixed into the
training rows (data.rehearsal_fraction) so that a fine-tune on new speakers keeps the old ones.

    python -m training.rehearsal --config CONFIG [key=value ...]   # prepare RUN/rehearsal/ ahead of training

The set is made once, on rank 0 before step 1 (the other ranks wait at a barrier), and cached next to the run:

    RUN/rehearsal/audio/<speaker>-<k>.wav   each built-in speaker saying each sentence, greedy, decoded to 24 kHz
    RUN/rehearsal/manifest.jsonl            those clips as an encode-service manifest
    RUN/rehearsal/shards/shard-*.parquet    the rows, in the shard schema
    RUN/rehearsal/inputs.json               what the set was made from, written last; a start whose inputs differ
                                            (base model, speakers, sentences, seed, targets, frame bound) rebuilds

Targets (data.rehearsal_targets):
- generated (the default): the codes the base model generated, as they are. The codec's decode->encode round trip
  is not the identity (it can change most codes), so these are the only targets equal to what the base model does.
- encoded: the clips encoded by the encode service (`python -m services.encode`, a private local Ray), the path
  real data takes: for a user who listens to or edits the audio.

Each speaker says SENTENCES (not the keep check's, so keep/<speaker> measures what rehearsal kept on sentences it
never trained): a dialect speaker the Chinese ones, asked for in chinese as upstream generation reaches it (its
rows carry its dialect key, the id that generation used), every other speaker each family the model has a
language id for, in that language.

Each round of the training stream plans round(f / (1 - f) x its rows) rehearsal rows with its own rows, so they
make up the fraction f of the rows trained. They are taken by cycling through the set in an order the seed fixes,
from an offset that the seed, the epoch and the round's shards fix: a round's plan stays a function of its shards,
the seed and the epoch, and a resume on any world size replans it exactly. Rehearsal rows are never held out,
are no new speakers (each speaks from its built-in codec-embedding row) and are not exported.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from shared import schema
from shared.shard_writer import ShardWriter
from training.speakers.custom_voice import Voices
from training.eval.keep_check import greedy_codes, kept_speakers
from training.speakers.reference import speaker_key
from training.data.samples import PlannedRow, SampleBuilder
from training.train.validate import WEIGHTS

log = logging.getLogger(__name__)

REHEARSAL_DIR = "rehearsal"
INPUTS_FILE = "inputs.json"
AUDIO_DIR = "audio"
# Per language family; none is a sentence of training.eval.keep_check.SENTENCES.
SENTENCES = {
    "english": ["She sells sea shells by the sea shore.", "A good book is the best of friends.",
                "The train leaves the station at nine."],
    "chinese": ["春天来了，花园里的花都开了。", "他每天早上七点起床去跑步。", "这家饭店的菜又便宜又好吃。"],
}


def rehearsal_dir(config) -> Path:
    """RUN/rehearsal: next to the run's voices.json (the local run directory)."""
    return config.checkpoint.logs() / REHEARSAL_DIR


def model_fingerprint(path: str | Path) -> str:
    """Cheap identity of a model directory: its config.json and its weight files' sizes and times."""
    h = hashlib.sha256((Path(path) / "config.json").read_bytes())
    for name in WEIGHTS:
        weights = Path(path) / name
        if weights.is_file():
            h.update(f"{name}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def prompts(dialect: str | bool, languages: set[str]) -> list[tuple[str, str, str]]:
    """(text, language generation is asked for, the row's language) of one built-in speaker."""
    if dialect:
        return [(text, "chinese", dialect) for text in SENTENCES["chinese"]]
    families = [family for family in SENTENCES if family in languages]
    if not families:  # a model without these language ids: the English sentences, without a language id
        return [(text, "auto", "auto") for text in SENTENCES["english"]]
    return [(text, family, family) for family in families for text in SENTENCES[family]]


def speakers_of(config, voices: Voices) -> dict[str, str | bool]:
    """The built-in speakers the run rehearses: the ones the keep check measures."""
    return kept_speakers(config.eval.keep_speakers, voices)


def wanted_inputs(config, speakers: dict[str, str | bool], languages: set[str]) -> dict:
    """What the set is made from, as inputs.json holds it (JSON types: tuples become lists)."""
    inputs = {"model": str(Path(config.model.path).resolve()), "fingerprint": model_fingerprint(config.model.path),
              "speakers": speakers, "prompts": {name: prompts(d, languages) for name, d in speakers.items()},
              "seed": config.train.seed, "targets": config.data.rehearsal_targets,
              "max_new_tokens": config.eval.max_new_tokens or "sentence bound"}
    return json.loads(json.dumps(inputs))


def read_inputs(directory: Path) -> dict | None:
    path = directory / INPUTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def prepare(config, voices: Voices, device: torch.device) -> Path:
    """RUN/rehearsal/, reused when its recorded inputs are this run's, else (re)built."""
    from shared.qwen import load_inference_model
    from training.eval.inference_copy import release_device_cache

    directory = rehearsal_dir(config)
    speakers = speakers_of(config, voices)
    base = json.loads((Path(config.model.path) / "config.json").read_text())["talker_config"]
    languages = {k.lower() for k in base.get("codec_language_id") or {}}
    wanted = wanted_inputs(config, speakers, languages)
    recorded = read_inputs(directory)
    if recorded == wanted and schema.published_shards(directory):
        log.info("rehearsal: reusing %s (%s)", directory, ", ".join(speakers))
        return directory
    if recorded is not None or directory.exists():
        changed = sorted(k for k in wanted if (recorded or {}).get(k) != wanted[k])
        log.info("rehearsal: rebuilding %s (%s)", directory,
                 f"changed: {', '.join(changed)}" if recorded else "unfinished")
        shutil.rmtree(directory)
    (directory / AUDIO_DIR).mkdir(parents=True)
    attention = "eager" if config.model.attn_implementation == "eager" else "sdpa"
    dtype = getattr(torch, config.fsdp.param_dtype) if device.type != "cpu" else torch.float32
    tts = load_inference_model(config.model.path, device, dtype, attention)
    entries, codes = synthesise(tts, config, speakers, languages, directory)
    del tts
    release_device_cache(device)  # the training model moves to the device next
    (directory / schema.MANIFEST_FILE).write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    if config.data.rehearsal_targets == "generated":
        write_generated(directory, entries, codes)
    else:
        encode(directory, Path(config.model.path) / "speech_tokenizer", config.train.device)
    (directory / INPUTS_FILE).write_text(json.dumps(wanted, indent=1, ensure_ascii=False))  # last: the set is whole
    log.info("rehearsal: %d clips of %s in %s (targets %s)", len(entries), ", ".join(speakers), directory,
             config.data.rehearsal_targets)
    return directory


def synthesise(tts, config, speakers: dict, languages: set[str], directory: Path) -> tuple[list[dict], list]:
    """Each speaker's prompts, generated greedily (seeded) and decoded; the manifest entries and their codes."""
    from training.eval.voice_check import generation_bound

    torch.manual_seed(config.train.seed)
    entries, all_codes = [], []
    for name, dialect in speakers.items():
        asked = prompts(dialect, languages)
        texts = [text for text, _, _ in asked]
        generated = greedy_codes(tts, name, texts, [language for _, language, _ in asked],
                                 max(generation_bound(config, tts, t) for t in texts))
        for k, ((text, _, row_language), codes) in enumerate(zip(asked, generated)):
            if len(codes) == 0:
                log.warning("rehearsal: %s said nothing for %r (left out)", name, text)
                continue
            wavs, rate = tts.model.speech_tokenizer.decode([{"audio_codes": codes}])
            audio = directory / AUDIO_DIR / f"{name}-{k:02d}.wav"
            sf.write(audio, np.asarray(wavs[0], dtype=np.float32), rate)
            # the clip is its own reference: a row without one is never trained
            entries.append({"id": f"rehearsal-{name}-{k:02d}", "audio": str(audio), "text": text,
                            "ref_audio": str(audio), "speaker": name, "language": row_language})
            all_codes.append((codes.numpy(), len(wavs[0]) / rate, rate))
    return entries, all_codes


def write_generated(directory: Path, entries: list[dict], codes: list) -> None:
    rows = [schema.ShardRow.from_entry(i, entry, codes=c, duration=seconds, sample_rate=rate)
            for i, (entry, (c, seconds, rate)) in enumerate(zip(entries, codes))]
    stats = schema.ShardStats(rows=len(rows), rows_ok=len(rows), rows_error=0,
                              audio_seconds=sum(r.duration for r in rows), frames=sum(r.num_frames for r in rows),
                              encode_seconds=0.0, worker="rehearsal")
    ShardWriter(directory).publish(0, rows, stats)


def encode(directory: Path, codec: Path, device: str) -> None:
    """The encode service on the manifest (its own private local Ray), writing the shards into `directory`."""
    command = [sys.executable, "-m", "services.encode", "--manifest", str(directory / schema.MANIFEST_FILE),
               "--codec", str(codec), "--output", str(directory), "--device", "cpu" if device == "cpu" else "auto",
               "--status-port", "-1"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"rehearsal: the encode service failed on {directory / schema.MANIFEST_FILE} (exit "
                           f"{result.returncode}): {last}")


@dataclass
class RehearsalSet:
    """The planned rehearsal rows (metadata; codes read by the rank that trains them) and where they are read."""
    rows: list[PlannedRow]
    paths: dict[int, object]  # the set's own shard ids (negative, never a published shard's) -> file
    fraction: float

    @property
    def mean_frames(self) -> float:
        return sum(r.frames for r in self.rows) / len(self.rows)

    def count(self, rows: float) -> int:
        """Rehearsal rows that join `rows` new training rows: the fraction f of the sum."""
        return round(self.fraction / (1 - self.fraction) * rows)

    def rows_for(self, rows: int, seed: int, epoch: int, round_shards: list[int]) -> list[PlannedRow]:
        """The rehearsal rows of one round (fresh objects: codes unread)."""
        count = self.count(rows)
        if not count:
            return []
        order = random.Random(f"{seed}/rehearsal").sample(range(len(self.rows)), len(self.rows))
        start = random.Random(f"{seed}/rehearsal/{epoch}/{','.join(map(str, round_shards))}").randrange(len(order))
        chosen = [self.rows[order[(start + k) % len(order)]] for k in range(count)]
        return [dataclasses.replace(r, row=dataclasses.replace(r.row)) for r in chosen]


def load(directory: Path, builder: SampleBuilder, voices: Voices, fraction: float) -> RehearsalSet:
    rows, paths = [], {}
    for shard, path in sorted(schema.published_shards(directory).items()):
        own = -1 - shard
        paths[own] = path
        good = [(i, r) for i, r in enumerate(schema.read_rows(path, ["id", "text", "ref_audio", "speaker",
                                                                     "language", "num_frames", "error"]))
                if r.trainable]
        stray = sorted({speaker_key(r.speaker) for _, r in good} - set(voices.builtin))
        if stray:
            raise ValueError(f"{path}: speakers {', '.join(map(str, stray))} are no built-in speaker of model.path; "
                             f"delete {directory} so that the run rebuilds it")
        planned = builder.plan_rows(own, [i for i, _ in good], [r for _, r in good])
        rows += [dataclasses.replace(p, rehearsal=True) for p in planned]
    if not rows:
        raise ValueError(f"{directory} holds no trainable rehearsal row; delete it so that the run rebuilds it")
    return RehearsalSet(rows, paths, fraction)


def start(config, voices: Voices | None, builder: SampleBuilder, rank: int, device: torch.device
          ) -> RehearsalSet | None:
    """Every rank, before step 1: rank 0 builds or reuses RUN/rehearsal while the others wait (within
    train.timeout_minutes), then each plans its rows. None when the run does not rehearse."""
    import torch.distributed as dist

    if not config.data.rehearsal_fraction or voices is None:
        return None
    failure = [None]
    if rank == 0:
        try:
            prepare(config, voices, device)
        except Exception as error:  # the other ranks must not sit at a barrier until the timeout
            failure = [f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(failure, src=0)
            raise
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise RuntimeError(f"rank 0 could not build {rehearsal_dir(config)} ({failure[0]}); "
                           "its log has the traceback")
    found = load(rehearsal_dir(config), builder, voices, config.data.rehearsal_fraction)
    log.info("rehearsal: %d rows of %s, %.0f%% of each round's rows", len(found.rows),
             ", ".join(sorted({speaker_key(r.row.speaker) for r in found.rows})), 100 * found.fraction)
    return found


def build_parser() -> argparse.ArgumentParser:
    """training.train's arguments: the same config and overrides prepare the run's set."""
    from training.train.loop import build_parser as training_parser

    parser = training_parser()
    parser.prog, parser.description = "python -m training.rehearsal", __doc__
    return parser


def main(argv: list[str] | None = None) -> None:
    from shared.device import select_device
    from training.speakers.custom_voice import check_run
    from training.train.validate import EXIT_CODE, validate_or_exit

    args = build_parser().parse_args(argv)
    config = validate_or_exit(args.config, args.overrides)
    if not config.data.rehearsal_fraction:
        print("error: data.rehearsal_fraction is 0, so the run rehearses nothing; set it (e.g. "
              "data.rehearsal_fraction=0.1) to prepare RUN/rehearsal", file=sys.stderr)
        sys.exit(EXIT_CODE)
    handler = logging.StreamHandler()  # this module's lines only (transformers' config chatter stays out)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    config.checkpoint.logs().mkdir(parents=True, exist_ok=True)
    print(prepare(config, check_run(config), select_device(config.train.device, 0).torch_device))
