"""LoRA fine-tuning (training.model.lora, training.export.lora) with real peft on the official classes, under real
torchrun on CPU (gloo): adapter-only checkpoints naming their base, 2 ranks = 1 rank, exact kill/resume, a resume
against other base weights refused, and an overfit LoRA-only run whose merged export generates the trained codes
and whose peft adapter export, applied with PeftModel.from_pretrained, gives the merged export's logits."""
import json
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from shared import schema
from shared.qwen import load_inference_model, load_tts_model
from tests.test_training_distributed import ENV, REPO, kill_after_step, losses_by_step, torchrun, train_command
from training.checkpoint.step_folders import complete_checkpoints
from training.model.lora import META_FILE, base_fingerprint, is_adapter, linear_names, resolve_targets
from training.train.metrics import read_metrics
from training.data.synthetic import write_encoded
from training.train.validate import TrainingInputProblem, validate

STEPS = 8
# Eval at the end only (the same held-out rows on every run, so the runs stay comparable); samples in lora_run.
LORA = ["lora.rank=8", "lora.alpha=16", "train.lr=1e-2", f"train.steps={STEPS}", "checkpoint.interval=2",
        "eval.fraction=0.3", "eval.samples=false"]
TINY = str(REPO / "training/configs/tiny.yaml")


@pytest.fixture(scope="module")
def lora_run(tiny_dir, synthetic_encoded, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora") / "run"
    result = torchrun(tiny_dir, synthetic_encoded / "shards", run, *LORA, "eval.samples=true")
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result.stderr


def test_checkpoints_hold_the_adapters_and_name_their_base(lora_run, tiny_dir):
    run, log = lora_run
    model = load_tts_model(tiny_dir / "model")
    targets, _ = resolve_targets(["model.layers.*", "code_predictor.model.layers.*"], linear_names(model.talker))
    modules = dict(model.talker.named_modules())
    adapter_size = sum(8 * (modules[t].in_features + modules[t].out_features) for t in targets)
    total = sum(p.numel() for p in model.talker.parameters()) + adapter_size
    assert f"trainable parameters {adapter_size:,} of {total:,} ({100 * adapter_size / total:.2f} %)" in log

    losses = [r["loss"] for r in read_metrics(run)]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    final = run / f"step-{STEPS:06d}"
    stored = dcp.FileSystemReader(str(final)).read_metadata().state_dict_metadata
    model_keys = [k for k in stored if k.startswith("model.")]
    state_keys = [k for k in stored if k.startswith("optim.state.")]
    # Only lora_A/lora_B of every targeted projection, and AdamW state for them only: no frozen base weight.
    assert len(model_keys) == 2 * len(targets) and all(is_adapter(k) for k in model_keys)
    assert state_keys and all(is_adapter(k) for k in state_keys)
    # Eval loss and samples with the adapters merged into rank 0's inference copy.
    (evaluation,) = read_metrics(run, "eval")
    assert evaluation["step"] == STEPS and evaluation["eval_loss"] < losses[0] + 1 and evaluation["samples"]
    assert len(list((run / "samples" / f"step-{STEPS:06d}").glob("*.wav"))) == len(evaluation["samples"])
    meta = json.loads((final / META_FILE).read_text())
    assert meta["base_model"] == str((tiny_dir / "model").resolve()) and meta["rank"] == 8
    assert meta["base_fingerprint"] == base_fingerprint(tiny_dir / "model") and meta["targets"] == targets


def test_two_ranks_equal_one_rank_accumulating_the_same_micro_batches(lora_run, tiny_dir, synthetic_encoded,
                                                                       tmp_path):
    run = tmp_path / "one_rank"
    subprocess.run([sys.executable, *train_command(tiny_dir, synthetic_encoded / "shards", run), *LORA,
                    "train.grad_accum=2"], cwd=REPO, env=ENV, check=True, timeout=240, capture_output=True)
    one, two = read_metrics(run), read_metrics(lora_run[0])
    assert [r["frames"] for r in one] == [r["frames"] for r in two]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_killed_lora_run_resumes_exactly_and_another_base_is_refused(lora_run, tiny_dir, synthetic_encoded, tmp_path):
    run = tmp_path / "killed"
    command = [sys.executable, *train_command(tiny_dir, synthetic_encoded / "shards", run, nproc=2), *LORA]
    assert 3 <= kill_after_step(command, run, 3) < STEPS and STEPS not in complete_checkpoints(run)

    # Other base weights: a copy of the base with one tensor changed. Refused before anything is written.
    other = tmp_path / "other_base"
    shutil.copytree(tiny_dir / "model", other)
    weights = load_file(other / "model.safetensors")
    weights["talker.codec_head.weight"] += 0.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())
    refused = subprocess.run([sys.executable, *train_command(tiny_dir, synthetic_encoded / "shards", run), *LORA,
                              f"model.path={other}"], cwd=REPO, env=ENV, timeout=120, capture_output=True, text=True)
    assert refused.returncode == 2
    line = refused.stderr.strip()
    assert "\n" not in line and f"model.path={other} holds different weights" in line, refused.stderr[-2000:]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir()) == before

    result = subprocess.run(command, cwd=REPO, env=ENV, timeout=240, capture_output=True, text=True)
    assert result.returncode == 0 and "resumed from" in result.stderr, result.stderr[-3000:]
    assert losses_by_step(run) == losses_by_step(lora_run[0])  # bit-exact: fp32 on CPU


def test_bad_lora_values_are_one_line_before_anything_is_written(tiny_dir, synthetic_encoded, tmp_path):
    run = tmp_path / "run"
    good = [f"model.path={tiny_dir / 'model'}", f"data.shards={synthetic_encoded}", f"checkpoint.dir={run}"]
    for override, expected in [("lora.rank=-1", "lora.rank=-1 must be >= 0"),
                               ("lora.alpha=0", "lora.alpha=0 must be > 0"),
                               ("lora.targets=['model.layers.*.attn.q_proj']",
                                "lora.targets pattern 'model.layers.*.attn.q_proj' matches no Linear module")]:
        with pytest.raises(TrainingInputProblem) as caught:
            validate(TINY, [*good, "lora.rank=8", override])
        assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert not run.exists()
    assert validate(TINY, [*good, "lora.rank=8"]).lora.enabled


def run_export(checkpoint, output, *extra):
    subprocess.run([sys.executable, "-m", "training.export", "--checkpoint", str(checkpoint), "--output", str(output),
                    "--speaker-name", "Lora_Voice", *extra], cwd=REPO, env=ENV, check=True, timeout=120,
                   capture_output=True)


def talker_logits(model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Codec-head logits of the talker and the code predictor's logits on fixed random inputs."""
    talker, generator = model.talker, torch.Generator().manual_seed(seed)
    hidden = talker.model(inputs_embeds=torch.randn(2, 12, talker.config.hidden_size, generator=generator),
                          position_ids=torch.arange(12).expand(3, 2, 12)).last_hidden_state
    sub = torch.randn(5, 16, talker.config.hidden_size, generator=generator)
    return talker.codec_head(hidden), talker.code_predictor.forward_finetune(inputs_embeds=sub).logits


@torch.no_grad()
def test_overfit_lora_only_merged_export_generates_the_codes_and_the_adapter_matches_it(tiny_dir, tmp_path):
    data = write_encoded(tmp_path / "one", tiny_dir / "codec", num_shards=1, rows_per_shard=2)  # 1 good, 1 error
    table = pq.read_table(schema.published_shards(data)[0])
    good = [i for i, e in enumerate(table.column("error").to_pylist()) if e is None]
    codes = torch.from_numpy(schema.codes_of(table.column("audio_codes"), good[0]))
    text = table.column("text")[good[0]].as_py()

    # LoRA only: every weight of the tiny random model frozen. Its heads are random and frozen behind a frozen
    # RMSNorm, which bounds their logits; adapters on the heads too let it fit one utterance exactly.
    run = tmp_path / "run"
    subprocess.run([sys.executable, *train_command(tiny_dir, data, run), "lora.rank=16", "lora.alpha=32",
                    'lora.targets=["*_proj","codec_head","code_predictor.lm_head.*"]', "train.steps=60",
                    "train.lr=1e-2", "train.lr_schedule=constant", "train.warmup_steps=0", "train.weight_decay=0",
                    "checkpoint.interval=1000"], cwd=REPO, env=ENV, check=True, timeout=300, capture_output=True)
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    run_export(run / "step-000060", merged_dir)
    run_export(run / "step-000060", adapter_dir, "--adapter")

    tts = load_inference_model(merged_dir)  # upstream's wrapper, unchanged
    greedy = dict(do_sample=False, subtalker_dosample=False, repetition_penalty=1.0, max_new_tokens=len(codes) + 8)
    input_ids = tts._tokenize_texts([tts._build_assistant_text(text)])
    generated, _ = tts.model.generate(input_ids=input_ids, languages=["auto"], speakers=["lora_voice"],
                                      non_streaming_mode=True, **greedy)
    assert torch.equal(generated[0].cpu(), codes)

    merged = load_tts_model(merged_dir)
    merged_state = merged.state_dict()
    assert not [k for k in merged_state if "lora" in k or "base_layer" in k]
    # Frozen weights untouched: merged minus the adapter's B @ A is the base; everything else is bit-identical.
    base_state = load_tts_model(tiny_dir / "model").state_dict()
    adapters = {k.removeprefix("base_model.model."): v for k, v in
                load_file(adapter_dir / "adapter_model.safetensors").items()}
    targeted = {k.removesuffix(".lora_A.weight") for k in adapters if k.endswith(".lora_A.weight")}
    assert len(targeted) == 44
    for key, value in merged_state.items():
        module = key.removeprefix("talker.").removesuffix(".weight")
        if module in targeted and key.endswith(".weight"):
            delta = 2.0 * adapters[f"{module}.lora_B.weight"] @ adapters[f"{module}.lora_A.weight"]
            torch.testing.assert_close(value - base_state[key], delta, atol=1e-5, rtol=0)
        elif key == "talker.model.codec_embedding.weight":  # only the speaker's row was written
            assert torch.equal(value[:3000], base_state[key][:3000]) and torch.equal(value[3001:], base_state[key][3001:])
        else:
            assert torch.equal(value, base_state[key]), key

    # The adapter directory, applied with peft's own loader to the base model's talker (in place).
    from peft import PeftModel

    from training.export.lora import add_custom_voice

    base = load_tts_model(tiny_dir / "model")
    PeftModel.from_pretrained(base.talker, str(adapter_dir))
    add_custom_voice(base, adapter_dir)
    assert base.config.talker_config.spk_id == {"lora_voice": 3000} and base.tts_model_type == "custom_voice"
    for ours, theirs in zip(talker_logits(base), talker_logits(merged)):  # fp32: x@W + x@A@B vs x@(W + BA)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert torch.equal(base.talker.get_input_embeddings().weight[3000], merged.talker.get_input_embeddings().weight[3000])


def test_shipped_lora_configs_target_every_layer_projection_of_the_1p7b_shape():
    """The LoRA configs, Base and CustomVoice (LoRA is the CustomVoice default)."""
    from benchmarks.model_1p7b import config_1p7b
    from shared.qwen import Qwen3TTSForConditionalGeneration
    from training.config import load_config

    with torch.device("meta"):
        talker = Qwen3TTSForConditionalGeneration(config_1p7b()).talker
    for size, kind in [(size, kind) for size in ("1.7b", "0.6b") for kind in ("lora", "customvoice")]:
        config = load_config(REPO / f"training/configs/qwen3tts_{size}_{kind}.yaml")
        assert config.lora.rank == 16 and config.train.lr == 1e-4 and config.fsdp.activation_checkpointing
        assert config.model.path.endswith({"lora": "-Base", "customvoice": "-CustomVoice"}[kind])
        targets, unmatched = resolve_targets(config.lora.targets, linear_names(talker))
        assert not unmatched and len(targets) == 7 * (28 + 5)
    modules = dict(talker.named_modules())
    adapters = sum(16 * (modules[t].in_features + modules[t].out_features) for t in targets)
    share = adapters / (adapters + sum(p.numel() for p in talker.parameters()))
    assert 0.005 < share < 0.015, share  # docs/lora.md: 19.2 M, 0.99 % of the talker
    print(f"1.7B LoRA adapters: {adapters:,} parameters, {100 * share:.2f} %")


def test_adapters_injected_after_sharding_are_caught(tiny_dir, tmp_path):
    """The trap the trainer's order avoids: peft run on an already sharded talker leaves plain-tensor adapters
    beside DTensors (and sizes lora_B from a local shard on several ranks); check_sharded refuses it."""
    import torch.distributed as dist

    from shared.device import select_device
    from training.model import lora
    from training.config import load_config
    from training.model.talker import TalkerForTraining
    from training.model.parallelize import build_mesh, parallelize

    config = load_config(TINY, [f"model.path={tiny_dir / 'model'}", "data.shards=unused", "lora.rank=4"])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        module = TalkerForTraining(load_tts_model(tiny_dir / "model").talker)
        parallelize(module, config.fsdp, build_mesh(select_device("cpu", 0)))
        lora.apply(module, config)
        with pytest.raises(RuntimeError, match=r"lora_A\.default\.weight is not sharded"):
            lora.check_sharded(module, config)
    finally:
        dist.destroy_process_group()
