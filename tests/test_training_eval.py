"""Held-out evaluation (issue 10) with real parts: torchrun ranks on CPU (gloo), real shards, the tiny random
model generating samples, a tiny random Whisper transcribing them, TensorBoard's own event reader.

Two runs over the same shards: a 2-rank run killed after its first eval and resumed (samples, ASR, keep=1),
and an uninterrupted 1-rank run accumulating the same micro-batches (eval loss only)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from shared.audio import load_audio
from shared.qwen import load_tts_model, speaker_mel
from training.checkpoint import step_folders as checkpoint
from training.eval.asr import cer, wer
from training.config import DataConfig
from training.data.stream import ShardStream, read_planned
from training.train.metrics import read_metrics
from training.model.talker import speaker_embedding
from training.data.split import HeldOut, eval_rows, is_held_out, read_split, training_rows
from tests.conftest import kill_tree

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
STEPS = 4
SENTENCES = "eval.sentences=[hello world, one two three]"


def command(tiny_dir: Path, data: Path, run: Path, nproc: int, *overrides: str) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    return [sys.executable, *launcher, "-m", "training.train", "--config", str(REPO / "training/configs/tiny.yaml"),
            f"model.path={tiny_dir / 'model'}", f"data.shards={data}", f"checkpoint.dir={run}",
            f"train.steps={STEPS}", "eval.fraction=0.3", "eval.interval=2", *overrides]


def eval_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run, kind="eval")}


@pytest.fixture(scope="module")
def speaker_encoded(synthetic_encoded, tmp_path_factory) -> Path:
    """The synthetic shards with a speaker per row (alice: the rows on ref_a, bob: those on ref_b), as schema v2
    stores it; fraction 0.3 at seed 0 holds out 3 of alice's 5 good rows and 2 of bob's 5."""
    from dataclasses import replace

    from shared import schema
    from training.data.synthetic import write_shard

    out = tmp_path_factory.mktemp("speakers")
    for sid, path in schema.published_shards(synthetic_encoded).items():
        rows = schema.read_rows(path)
        speakers = ["alice" if r.ref_audio and r.ref_audio.endswith("ref_a.wav") else "bob" for r in rows]
        write_shard(out, sid, [replace(r, speaker=name) for r, name in zip(rows, speakers)])
    (out / schema.COMPLETE_MARKER).write_text("")
    return out


@pytest.fixture(scope="module")
def asr_dir(tmp_path_factory) -> Path:
    from shared.tiny_asr import write_tiny_asr

    return write_tiny_asr(tmp_path_factory.mktemp("asr") / "whisper")


@pytest.fixture(scope="module")
def resumed(tiny_dir, speaker_encoded, asr_dir, tmp_path_factory):
    """2 ranks, killed once its first eval's checkpoint exists, then restarted to the end."""
    run = tmp_path_factory.mktemp("eval") / "two_ranks"
    cmd = command(tiny_dir, speaker_encoded, run, 2, SENTENCES, f"eval.asr_model={asr_dir}",
                  "eval.max_new_tokens=8", "checkpoint.interval=3", "checkpoint.keep=1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (run / checkpoint.BEST_FILE).exists():
            time.sleep(0.02)
    finally:
        kill_tree(proc)
    assert (run / "step-000002").is_dir(), "the first eval (a new best) must checkpoint step 2"
    assert STEPS not in checkpoint.complete_checkpoints(run), "the run must be killed part-way through"
    split_before = read_split(run)
    result = subprocess.run(cmd, cwd=REPO, env=ENV, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    return run, split_before, result.stderr + result.stdout  # the whole log, as a person running it reads it


@pytest.fixture(scope="module")
def one_rank(tiny_dir, speaker_encoded, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "one_rank"
    result = subprocess.run(command(tiny_dir, speaker_encoded, run, 1, "train.grad_accum=2", "eval.samples=false"),
                            cwd=REPO, env=ENV, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_split_rule_is_a_pure_function_per_speaker():
    ids = [f"utt{i}" for i in range(4000)]
    for speaker in ("alice", None):
        held = [i for i in ids if is_held_out(i, speaker, 0, 0.1)]
        assert 0.08 < len(held) / len(ids) < 0.12
        assert held == [i for i in ids if is_held_out(i, speaker, 0, 0.1)]  # same answer every time
    # The speaker enters the hash: two speakers do not hold out the same ids; another seed is another split.
    assert {i for i in ids if is_held_out(i, "alice", 0, 0.1)} != {i for i in ids if is_held_out(i, "bob", 0, 0.1)}
    assert {i for i in ids if is_held_out(i, "alice", 0, 0.1)} != {i for i in ids if is_held_out(i, "alice", 1, 0.1)}
    assert not any(is_held_out(i, "alice", 0, 0.0) for i in ids)
    assert HeldOut(shards=frozenset({3})).contains(3, "anything", None)


@pytest.fixture(scope="module")
def builder(tiny_dir):
    from training.model.layout import SpecialIds, load_text_tokenizer
    from training.data.samples import SampleBuilder

    model = load_tts_model(tiny_dir / "model")
    return SampleBuilder(load_text_tokenizer(tiny_dir / "model"), SpecialIds.from_config(model.config))


def test_training_stream_never_sees_held_out_rows(speaker_encoded, builder):
    """The shard reader's filter on the real stream: the two sides are disjoint and together are every good row."""
    from shared import schema

    held_out = HeldOut(fraction=0.3, seed=0)
    shards = schema.published_shards(speaker_encoded)
    every = {p.row.id for sid, path in shards.items() for p in read_planned(path, sid, builder)}
    held = {p.row.id for sid, path in shards.items() for p in read_planned(path, sid, builder, eval_rows(held_out))}
    config = DataConfig(shards=str(speaker_encoded), frame_budget=256, shards_per_round=2)
    stream = ShardStream(config, builder, 0, 0, 1, 1)
    stream.row_filter = training_rows(held_out)
    trained = {p.row.id for step in stream.epoch_steps() for mb in step.micro_batches for seq in mb for p in seq}
    assert held and trained and not held & trained
    assert held | trained == every
    assert held == {"utt00000", "utt00006", "utt00008", "utt00001", "utt00007"}  # per speaker: see speaker_encoded


def test_a_shard_held_out_whole_is_never_trained_on(speaker_encoded, builder):
    config = DataConfig(shards=str(speaker_encoded), frame_budget=256, shards_per_round=2)
    stream = ShardStream(config, builder, 0, 0, 1, 1)
    stream.row_filter = training_rows(HeldOut(shards=frozenset({0})))
    trained = {p.shard for step in stream.epoch_steps() for mb in step.micro_batches for seq in mb for p in seq}
    assert trained == {1}


def test_rows_without_a_speaker_form_one_speaker(synthetic_encoded, builder):
    from training.eval.evaluator import collect_eval_rows

    speakers = collect_eval_rows(str(synthetic_encoded), HeldOut(fraction=0.3), builder, 256, [0, 1])
    assert list(speakers) == ["default"]
    assert [r.id for r in speakers["default"].rows] == ["utt00004", "utt00006"]
    assert all(r.codes is not None and len(r.codes) == r.num_frames for r in speakers["default"].rows)


def test_samples_speak_the_language_their_rows_train_with():
    from shared.schema import ShardRow
    from training.eval.voice_check import generation_language

    def rows(*languages):
        return [ShardRow(i, f"u{i}", None, "t", "r.wav", language=lang) for i, lang in enumerate(languages)]

    assert generation_language(rows("Chinese", "chinese")) == "chinese"
    assert generation_language(rows("chinese", "english")) == "Auto"  # no one prefix to match
    assert generation_language(rows("chinese", None)) == "Auto"
    assert generation_language(rows(None, "auto")) == "Auto"


def test_error_rates():
    assert cer("The quick, brown fox!", "the quick brown fox") == 0.0
    assert wer("the quick brown fox", "the quack brown") == 0.5  # one substitution, one deletion, 4 words
    assert cer("今天天气很好", "今天天很好") == pytest.approx(1 / 6)
    assert cer("ab", "") == 1.0


def test_split_is_identical_after_resume_and_restart_with_another_rule_is_refused(resumed, one_rank, tiny_dir,
                                                                                    speaker_encoded):
    run, split_before, _ = resumed
    after = read_split(run)
    assert after == split_before == read_split(one_rank)
    assert after["rule"] == {"fraction": 0.3, "shards": [], "seed": 0}
    assert after["rows"] == {"alice": ["utt00000", "utt00006", "utt00008"], "bob": ["utt00001", "utt00007"]}
    result = subprocess.run(command(tiny_dir, speaker_encoded, run, 1, "eval.fraction=0.5", "train.steps=8"),
                            cwd=REPO, env=ENV, timeout=120, capture_output=True, text=True)
    assert result.returncode != 0
    assert "eval_split.json records the eval split" in result.stderr and "start a new checkpoint.dir" in result.stderr


def test_eval_loss_is_equal_on_one_and_two_ranks(resumed, one_rank):
    two, one = eval_records(resumed[0]), eval_records(one_rank)
    assert sorted(one) == sorted(two) == [2, STEPS]
    for step in one:
        for key in ("eval_loss", "eval_talker_loss", "eval_sub_talker_loss"):
            assert one[step][key] == pytest.approx(two[step][key], rel=1e-5)
        assert one[step]["eval_rows"] == two[step]["eval_rows"] == 5
        assert sorted(one[step]["eval_loss_by_speaker"]) == ["alice", "bob"]
        for speaker, loss in one[step]["eval_loss_by_speaker"].items():
            assert loss == pytest.approx(two[step]["eval_loss_by_speaker"][speaker], rel=1e-5)
        assert one[step]["eval_loss_by_speaker"]["alice"] != one[step]["eval_loss_by_speaker"]["bob"]
        assert one[step]["eval_loss"] == pytest.approx(one[step]["eval_talker_loss"]
                                                       + 0.3 * one[step]["eval_sub_talker_loss"])
    assert "eval loss" in resumed[2]  # the log line


def test_samples_are_written_and_scored(resumed, tiny_dir):
    run = resumed[0]
    records = eval_records(run)
    model = load_tts_model(tiny_dir / "model")
    for step in (2, STEPS):
        folder = run / "samples" / f"step-{step:06d}"
        assert sorted(p.name for p in folder.glob("*.wav")) == ["alice-0.wav", "alice-1.wav", "bob-0.wav", "bob-1.wav"]
        scores = json.loads((folder / "scores.json").read_text())
        assert [(s["speaker"], s["sentence"]) for s in scores] == [
            (speaker, sentence) for speaker in ("alice", "bob") for sentence in ("hello world", "one two three")]
        assert {s["speaker"]: Path(s["reference"]).name for s in scores} == {"alice": "ref_a.wav", "bob": "ref_b.wav"}
        assert records[step]["samples"] == scores
        for score in scores:
            wav, rate = sf.read(score["path"], dtype="float32")
            assert rate == 24000 and len(wav) / rate == pytest.approx(score["seconds"])
            # The recorded similarity is the cosine of the model's own x-vectors of sample and reference.
            reference = speaker_embedding(model.speaker_encoder, speaker_mel(load_audio(score["reference"]).samples))
            sample = speaker_embedding(model.speaker_encoder, speaker_mel(wav))
            expected = float(torch.nn.functional.cosine_similarity(sample, reference, dim=0))
            if score["similarity"] is not None:
                assert score["similarity"] == pytest.approx(expected, abs=1e-4)
            # The tiny Whisper's transcript is random text; its error rates are computed against the sentence.
            assert isinstance(score["transcript"], str)
            assert score["cer"] == pytest.approx(cer(score["sentence"], score["transcript"]))
            assert score["wer"] == pytest.approx(wer(score["sentence"], score["transcript"]))
        assert records[step]["sample_cer"] == pytest.approx(np.mean([s["cer"] for s in scores]))


def test_samples_are_the_weights_of_their_step_speaking(resumed, tmp_path):
    """Re-synthesising a last-step sample from the exported last checkpoint, same x-vector and seed,
    gives the saved file back: rank 0 synthesised with the gathered training weights of that step."""
    from shared.qwen import load_inference_model
    from training.export.model_dir import export

    run = resumed[0]
    export(run / f"step-{STEPS:06d}", tmp_path / "base")
    tts = load_inference_model(tmp_path / "base")
    score = json.loads((run / "samples" / f"step-{STEPS:06d}" / "scores.json").read_text())[1]
    xvector = speaker_embedding(tts.model.speaker_encoder, speaker_mel(load_audio(score["reference"]).samples))
    prompt = dict(ref_code=[None], ref_spk_embedding=[xvector], x_vector_only_mode=[True], icl_mode=[False])
    torch.manual_seed(0 + score["index"])  # train.seed + k
    wavs, rate = tts.generate_voice_clone(text=score["sentence"], language="Auto", voice_clone_prompt=prompt,
                                          non_streaming_mode=True, max_new_tokens=8)
    saved, saved_rate = sf.read(score["path"], dtype="float32")
    assert rate == saved_rate and len(wavs[0]) == len(saved)
    assert np.abs(np.clip(wavs[0], -1, 1) - saved).max() <= 1.5 / 32768  # the file is 16-bit PCM
    earlier, _ = sf.read(run / "samples" / "step-000002" / Path(score["path"]).name, dtype="float32")
    assert len(earlier) != len(saved) or not np.array_equal(earlier, saved)  # other weights, other audio


def test_tensorboard_event_files_read_back(resumed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = resumed[0]
    board = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "audio": 0})
    board.Reload()
    tags = board.Tags()
    for tag in ("train/loss", "train/talker_loss", "train/sub_talker_loss", "train/lr", "train/grad_norm",
                "train/frames_per_s", "eval/loss", "eval/talker_loss", "eval/sub_talker_loss", "eval/loss/alice",
                "eval/loss/bob", "samples/similarity", "samples/cer", "samples/wer"):
        assert tag in tags["scalars"], tag
    train = read_metrics(run)
    # The resumed run purged what the killed run logged after its checkpoint: each step once, as metrics.jsonl.
    losses = {r["step"]: r["loss"] for r in train}
    events = board.Scalars("train/loss")
    assert [e.step for e in events] == sorted(losses)
    assert [e.value for e in events] == pytest.approx([losses[s] for s in sorted(losses)])
    evals = eval_records(run)
    assert {e.step: e.value for e in board.Scalars("eval/loss")} == pytest.approx(
        {s: r["eval_loss"] for s, r in evals.items()})
    assert {"samples/alice-0", "samples/alice-1", "samples/bob-0", "samples/bob-1"} <= set(tags["audio"])
    audio = board.Audio("samples/bob-1")
    assert [a.step for a in audio] == [2, STEPS] and audio[0].sample_rate == 24000
    assert audio[0].encoded_audio_string[:4] == b"RIFF"


def test_best_checkpoint_survives_retention_and_export_picks_it(resumed, tmp_path):
    run = resumed[0]
    evals = eval_records(run)
    lowest = min(evals, key=lambda s: evals[s]["eval_loss"])
    assert checkpoint.read_best(run) == {"step": lowest, "eval_loss": evals[lowest]["eval_loss"]}
    assert checkpoint.resolve_checkpoint(run / "best") == run / f"step-{lowest:06d}"
    assert (run / "best").resolve() == (run / f"step-{lowest:06d}").resolve()
    assert STEPS in checkpoint.complete_checkpoints(run)  # keep=1 keeps the last, and the best besides
    out = subprocess.run([sys.executable, "-m", "training.export", "--checkpoint", str(run / "best"), "--output",
                          str(tmp_path / "voice"), "--speaker-name", "alice"], cwd=REPO, env=ENV, timeout=180,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"exported {run / f'step-{lowest:06d}'}" in out.stdout
    assert_no_library_noise(out.stderr + out.stdout)


# What libraries print that a person running the pipeline has nothing to do about: transformers' pad-token
# warning on every generate, DCP's single-process warning on export, gloo's connection line per rank, and
# qwen_tts' import-time flash-attn banner and SoX notice.
LIBRARY_NOISE = ("Setting `pad_token_id`", "torch.distributed is disabled", "[Gloo]", "flash-attn", "SoX")


def assert_no_library_noise(log: str) -> None:
    noisy = [line for line in log.splitlines() if any(noise in line for noise in LIBRARY_NOISE)]
    assert not noisy, "\n".join(noisy[:10])


def test_a_training_run_with_samples_logs_no_library_noise(resumed):
    log = resumed[2]
    assert "eval loss" in log and "samples:" in log  # it did evaluate and generate samples
    assert_no_library_noise(log)


def test_export_leaves_out_a_speaker_whose_rows_were_all_held_out(one_rank, speaker_encoded, tmp_path, caplog,
                                                                  capsys):
    """The trained run's data gains a shard that eval.shards holds out whole (as a shard published later in
    follow mode would be): its speaker, carol, never trained, so --all-speakers leaves her out with a warning and
    a single-speaker export of her is refused. The run is a copy of one_rank's last step and config.yaml."""
    import shutil
    from dataclasses import replace

    import yaml

    from shared import schema
    from training.export.model_dir import main
    from training.data.synthetic import write_shard

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(speaker_encoded, data)
    rows = schema.read_rows(schema.published_shards(speaker_encoded)[0])
    write_shard(data, 2, [replace(r, id=f"carol-{r.id}", speaker="carol") for r in rows])
    step = checkpoint.step_dir_name(STEPS)
    shutil.copytree(one_rank / step, run / step)
    config = yaml.safe_load((one_rank / "config.yaml").read_text())
    config["data"]["shards"], config["eval"]["shards"] = str(data), [2]
    (run / "config.yaml").write_text(yaml.safe_dump(config))

    with caplog.at_level("WARNING", logger="training.export"):
        main(["--checkpoint", str(run / step), "--output", str(tmp_path / "voices"), "--all-speakers"])
    assert "leaving out 'carol': every row held out for eval" in caplog.text
    spk_id = json.loads((tmp_path / "voices" / "config.json").read_text())["talker_config"]["spk_id"]
    assert spk_id == {"alice": 3000, "bob": 3001}
    with pytest.raises(SystemExit) as exited:
        main(["--checkpoint", str(run / step), "--output", str(tmp_path / "carol"), "--speaker-name", "Carol"])
    assert exited.value.code == 2
    assert "'carol' never trained: every row of it is held out for eval" in capsys.readouterr().err
    assert not (tmp_path / "carol").exists()


def test_retention_never_deletes_the_best_checkpoint(tmp_path):
    """checkpoint.save with keep=1 in a real (one-rank gloo) process group: the best step outlives newer saves."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        module = torch.nn.Linear(2, 2)
        optimizer = torch.optim.AdamW(module.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        run = tmp_path / "run"
        run.mkdir()
        for step in (1, 2, 3, 4):
            checkpoint.save(run, step, module, optimizer, scheduler, {}, keep=1)
            if step == 2:
                checkpoint.record_best(run, 2, 0.5)
        assert sorted(checkpoint.complete_checkpoints(run)) == [2, 4]
        assert checkpoint.resolve_checkpoint(run / "best") == run / "step-000002"
    finally:
        dist.destroy_process_group()
    with pytest.raises(FileNotFoundError, match="has no eval loss yet"):
        checkpoint.resolve_checkpoint(tmp_path / "elsewhere" / "best")
