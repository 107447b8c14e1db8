"""Rehearsal on a CustomVoice model (training.rehearsal, data.rehearsal_fraction): the tiny CustomVoice model is
fine-tuned hard on one new speaker, with and without the base model's own speech for its built-in speakers (ryan
and the dialect speaker eric) mixed in; with it, the built-in speakers' greedy generation stays closer to the base
model's (keep/<speaker> in metrics.jsonl). The set is cached next to the run, reused by a later start and rebuilt
when its inputs change; the `encoded` targets go through the real encode service. Bad settings stop before
anything is written."""
import json
import re

import pytest
import soundfile as sf
import torch

from shared import schema
from training.train.metrics import read_metrics
from training.train.validate import TrainingInputProblem, validate

from tests.test_custom_voice import run, torchrun, write_speakers
from tests.test_training_distributed import REPO

NOVA = {"nova": ("English", "hello world", 31)}
CONFIG = str(REPO / "training/configs/tiny.yaml")
# Hard enough that the built-in speakers drift all the way without rehearsal. Measured codebook-0 agreement, off vs
# rehearsal 0.5: here (50 steps, 6 frames) 0.0 vs 0.5, 1.0, 0.5 for train.seed 0, 1, 2; at 100 steps and 12 frames
# 0.0 vs 1.0 for all three. Eval only at the end, keep generation bounded.
HARD = ["train.steps=50", "train.lr=5e-3", "train.lr_schedule=constant", "train.warmup_steps=0",
        "checkpoint.interval=1000", "eval.fraction=0.3", "eval.interval=50", "eval.max_new_tokens=6",
        "eval.sentences=[hello world]"]


def keep_codebook0(out) -> float:
    """Codebook-0 agreement with the base model at the last eval, averaged over the built-in speakers."""
    keep = read_metrics(out, kind="eval")[-1]["keep"]
    assert sorted(keep) == ["eric", "ryan"], keep
    return sum(score["codebook0"] for score in keep.values()) / len(keep)


def test_rehearsal_keeps_the_built_in_speakers_closer_to_the_base(tiny_dir, tiny_custom_voice_dir, tmp_path):
    data = write_speakers(tmp_path, tiny_dir / "codec", NOVA, takes=8)
    agreement = {}
    for fraction in (0.5, 0.0):
        out = tmp_path / f"run-{fraction}"
        result = torchrun(tiny_dir, tiny_custom_voice_dir, data, out, *HARD, f"data.rehearsal_fraction={fraction}")
        assert result.returncode == 0, result.stderr[-3000:]
        agreement[fraction] = keep_codebook0(out)
    print(f"keep codebook0: rehearsal 0.5 {agreement[0.5]:.3f}, off {agreement[0.0]:.3f}")
    assert agreement[0.5] > agreement[0.0], agreement

    out = tmp_path / "run-0.5"
    lines = [r for r in read_metrics(out) if r.get("kind") != "eval"]
    trained = sum(r["utterances"] - r["repeated"] for r in lines)
    assert abs(sum(r["rehearsal"] for r in lines) / trained - 0.5) < 0.05, lines[:3]
    assert all("rehearsal" not in r for r in read_metrics(tmp_path / "run-0.0") if r.get("kind") != "eval")

    # The cache: wavs a user can listen to, their manifest, shards in the shard schema, the inputs it was made from.
    cache = out / "rehearsal"
    entries = [json.loads(line) for line in (cache / schema.MANIFEST_FILE).read_text().splitlines()]
    assert {(e["speaker"], e["language"]) for e in entries} == {("ryan", "english"), ("ryan", "chinese"),
                                                                ("eric", "sichuan_dialect")}
    for entry in entries:
        wav, rate = sf.read(entry["audio"])
        assert rate == 24000 and len(wav) > 0 and entry["audio"].startswith(str(cache / "audio"))
    rows = schema.read_rows(schema.published_shards(cache)[0])
    assert [r.id for r in rows] == [e["id"] for e in entries] and all(r.trainable for r in rows)
    # Not a new speaker: the export holds the built-in speakers as the base had them, and nova.
    voices = json.loads((out / "voices.json").read_text())
    assert set(voices["rows"]) == {"nova"}

    # A later start reuses it (nothing rewritten); another frame bound rebuilds it and says why.
    prepare = ["-m", "training.rehearsal", "--config", CONFIG, f"model.path={tiny_custom_voice_dir}",
               f"data.shards={data}", f"checkpoint.dir={out}", *HARD, "data.rehearsal_fraction=0.5"]
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    result = run(*prepare)
    assert result.returncode == 0 and "reusing" in result.stderr, result.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == before
    result = run(*prepare, "eval.max_new_tokens=5")
    assert result.returncode == 0 and "changed: max_new_tokens" in result.stderr, result.stderr[-2000:]
    assert max(r.num_frames for r in schema.read_rows(schema.published_shards(cache)[0])) <= 5


def test_encoded_targets_go_through_the_encode_service_and_load(tiny_dir, tiny_custom_voice_dir, tmp_path):
    """data.rehearsal_targets=encoded: the clips are encoded by `python -m services.encode`; its shards are the
    rows the training stream plans and reads, each speaking from its built-in row."""
    from shared.qwen import load_tts_model
    from training.speakers.custom_voice import check_run
    from training.data.stream import RoundCodes, ShardStream
    from training.data.rehearsal import load, rehearsal_dir
    from training.data.samples import SampleBuilder

    data = write_speakers(tmp_path, tiny_dir / "codec", NOVA, takes=6)
    overrides = [f"model.path={tiny_custom_voice_dir}", f"data.shards={data}", f"checkpoint.dir={tmp_path / 'run'}",
                 "data.rehearsal_fraction=0.25", "data.rehearsal_targets=encoded", "eval.max_new_tokens=6"]
    result = run("-m", "training.rehearsal", "--config", CONFIG, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    config = validate(CONFIG, overrides)
    directory = rehearsal_dir(config)
    assert (directory / schema.COMPLETE_MARKER).is_file() and (directory / schema.PLAN_FILE).is_file()  # the service's

    voices = check_run(config)
    model = load_tts_model(tiny_custom_voice_dir)
    builder = SampleBuilder.for_model(tiny_custom_voice_dir, model, None, None, voices)
    found = load(directory, builder, voices, config.data.rehearsal_fraction)
    assert len(found.rows) == 9 and all(p.rehearsal for p in found.rows)
    chosen = found.rows_for(27, seed=0, epoch=0, round_shards=[0])  # 0.25 of 36 rows: 9, each row once
    assert len(chosen) == 9 and sorted(p.row.id for p in chosen) == sorted(p.row.id for p in found.rows)
    assert [p.row.id for p in chosen] == [p.row.id for p in found.rows_for(27, 0, 0, [0])]  # deterministic
    RoundCodes(found.paths, chosen).load(chosen)
    batch = builder.collate([[p] for p in chosen])
    ryan = next(i for i, p in enumerate(chosen) if p.row.speaker == "ryan")
    row, position = batch.speaker_index[ryan].tolist()
    assert batch.codec_ids[row, position, 0] == 3000 and bool(batch.speaker_learned[ryan])
    first = torch.as_tensor(chosen[0].row.codes)
    assert batch.frames.shape[0] == sum(p.frames for p in chosen) and torch.equal(batch.frames[:len(first)], first)

    # In the stream: the round plans its 6 rows with round(6 x 0.25 / 0.75) = 2 rehearsal rows, the same plan on
    # any world size (a resume on another layout replans it exactly), every row trained once.
    digests = []
    for world in (1, 2):
        stream = ShardStream(config.data, builder, config.train.seed, 0, world, 1)
        stream.rehearsal = found
        steps = list(stream.epoch_steps())
        assert sum(step.rehearsal_rows for step in steps) == 2
        digests.append(stream._last_plan[1].digest())
    assert digests[0] == digests[1]


@pytest.mark.parametrize("model, overrides, words", [
    ("model", ["data.rehearsal_fraction=0.2"], "applies to a CustomVoice model.path only"),
    ("custom_voice", ["data.rehearsal_fraction=1.0"], "data.rehearsal_fraction=1 must be in [0, 1)"),
    ("custom_voice", ["data.rehearsal_fraction=0.2", "data.rehearsal_targets=decoded"],
     "data.rehearsal_targets=decoded must be one of generated, encoded"),
    ("custom_voice", ["data.rehearsal_fraction=0.2", "model.retrain_speakers=[ryan]", "eval.keep_speakers=[ryan]"],
     "none is left to rehearse"),
])
def test_bad_rehearsal_settings_are_one_line_before_anything_is_written(tiny_dir, tiny_custom_voice_dir, tmp_path,
                                                                        model, overrides, words):
    data = write_speakers(tmp_path, tiny_dir / "codec", {**NOVA, "ryan": ("English", "one two three", 33)})
    args = [f"model.path={tiny_dir / model}", f"data.shards={data}", f"checkpoint.dir={tmp_path / 'run'}", *overrides]
    with pytest.raises(TrainingInputProblem, match=re.escape(words)):
        validate(CONFIG, args)
    if model == "model":  # the whole command once: one line, exit 2, no run folder
        result = run("-m", "training.train", "--config", CONFIG, *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and words in lines[0], result.stderr[-2000:]
        assert not (tmp_path / "run").exists()


def _start_with_a_failing_build(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from training.data import rehearsal
    from training.config import Config

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def broken(*_):
        raise OSError("disk full")

    rehearsal.prepare = broken
    config = Config()
    config.data.rehearsal_fraction, config.checkpoint.dir = 0.5, out
    try:
        rehearsal.start(config, voices=object(), builder=None, rank=rank, device=torch.device("cpu"))
    except Exception as error:  # what each rank saw, for the parent to read
        with open(f"{out}/rank{rank}.txt", "w") as f:
            f.write(f"{type(error).__name__}: {error}")
    dist.destroy_process_group()


def test_a_failed_build_on_rank_0_stops_the_other_ranks_at_once(tmp_path):
    """Without the broadcast, rank 1 waited at the barrier until train.timeout_minutes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_start_with_a_failing_build, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    assert (tmp_path / "rank0.txt").read_text() == "OSError: disk full"
    seen = (tmp_path / "rank1.txt").read_text()
    assert seen.startswith("RuntimeError: rank 0 could not build") and "OSError: disk full" in seen, seen
