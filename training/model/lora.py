"""LoRA fine-tuning of the talker with peft, on the official classes, under FSDP2.

Order matters: adapters are injected into the unsharded talker *before* `fully_shard`, so every lora_A/lora_B
is a full-size parameter that FSDP shards in the same unit as the frozen projection it belongs to (injected
after sharding, peft would size lora_B from a rank's local shard and mix plain tensors into DTensor modules).

Memory is the point: frozen weights are held in the compute dtype only (fsdp.param_dtype: no fp32 master copy,
no gradient, no AdamW state), while adapters (and, with lora.train_heads, the heads and codec embeddings) keep
fp32 master weights and AdamW state. With param_dtype bf16, FSDP's all-gather casts the fp32 adapters to bf16
beside their bf16 frozen layer, so a unit computes in one dtype; gradients reduce in fsdp.reduce_dtype.

Parameter names change under peft (`q_proj.weight` becomes `q_proj.base_layer.weight` plus
`q_proj.lora_A.default.weight`); `inference_name` and `merge_adapters` map them back for anything that loads
the plain model (eval samples; export goes through peft's own merge).
A LoRA checkpoint holds the trainable tensors only and names the base weights it needs (`checkpoint_meta`).

On a CustomVoice model without model.speaker_encoder the new speakers' codec-embedding rows must train while every
other row (built-in speakers, control and language ids) stays frozen: peft's trainable tokens (TrainableTokensLayer)
wrap the talker's codec embedding, keeping the frozen matrix as `model.codec_embedding.base_layer.weight` and the
trained rows as `model.codec_embedding.trainable_tokens_delta.default` (len(rows) x hidden), which the forward
writes over the frozen rows. They are injected through peft's TrainableTokensConfig with a full-match regex on the
module name, not LoraConfig(trainable_token_indices=...): that option matches names by suffix, and
"model.codec_embedding" is also the tail of code_predictor.model.codec_embedding (a ModuleList, which peft then
fails to wrap). Like the adapters they go in before fully_shard: the delta is then one more full-size parameter
of the root unit, gathered with the frozen matrix before the forward (after sharding, peft would index a DTensor
with a plain tensor).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import struct
import warnings
from pathlib import Path

import torch
from torch import nn

from training.config import Config, LoraConfig

ADAPTER = "default"  # peft's adapter name; one adapter per run
META_FILE = "lora.json"  # in every step folder of a LoRA run: base model, its fingerprint, the adapter shape
# Parameters (not modules) lora.train_heads unfreezes; the text embedding (151936 rows) stays frozen.
HEAD_PARAMETERS = ["codec_head.*", "code_predictor.lm_head.*", "model.codec_embedding.*",
                   "code_predictor.model.codec_embedding.*"]
_SAMPLE_BYTES = 4096  # bytes read at the start and at the end of every tensor for the base fingerprint
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPEAKER_EMBEDDING = "model.codec_embedding"  # the talker's codec input embedding, holding the speaker rows
ROWS_DELTA = f".trainable_tokens_delta.{ADAPTER}"  # suffix of the trained rows' parameter (peft's name)


def import_peft():
    # peft 0.22 warns on every import that transformers 4.57 (pinned by qwen-tts) will stop being supported.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        import peft
    return peft


# ----------------------------------------------------------------------------------------------- targets
def linear_names(talker: nn.Module) -> list[str]:
    return [name for name, module in talker.named_modules() if isinstance(module, nn.Linear)]


def talker_linear_names(model_path: str) -> list[str]:
    """The talker's Linear module names for the model directory's config, built on the meta device (no weights,
    no memory), so the target patterns can be checked before anything is loaded or written."""
    from shared.qwen import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    config = Qwen3TTSConfig.from_pretrained(model_path)
    with torch.device("meta"):
        talker = Qwen3TTSForConditionalGeneration(config).talker
    return linear_names(talker)


def resolve_targets(patterns: list[str], names: list[str]) -> tuple[list[str], list[str]]:
    """(the module names the patterns select, in model order; the patterns that select nothing)."""
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)], unmatched


def target_problem(config: Config) -> str | None:
    """One line for a target pattern that selects no Linear module of this model, else None."""
    names = talker_linear_names(config.model.path)
    _, unmatched = resolve_targets(config.lora.targets, names)
    if not unmatched:
        return None
    layers = sorted({n.split(".layers.")[-1].split(".", 1)[-1] for n in names if ".layers." in n})
    return (f"lora.targets pattern {unmatched[0]!r} matches no Linear module of the talker in {config.model.path}; "
            f"patterns are globs on names such as model.layers.0.{layers[0] if layers else 'mlp.up_proj'} "
            f"(layer modules: {', '.join(layers)}; others: {', '.join(n for n in names if '.layers.' not in n)[:200]})")


def peft_config(lora: LoraConfig, targets: list[str]):
    return import_peft().LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(targets), bias="none")


# ------------------------------------------------------------------------------------------------ training
def speaker_rows(config: Config, voices) -> list[int]:
    """The codec-embedding rows a LoRA run trains as peft trainable tokens: the run's speaker rows on a CustomVoice
    model.path without model.speaker_encoder (`voices.learned`); none otherwise, and none with lora.train_heads
    (the whole embedding trains then, and the export puts the built-in rows back as after a full fine-tune)."""
    if not config.lora.enabled or config.lora.train_heads or voices is None or not voices.learned:
        return []
    return sorted(voices.rows.values())


def inject_speaker_rows(talker: nn.Module, rows: list[int]) -> None:
    """Wrap the talker's codec embedding so that only `rows` train (see the module docstring)."""
    peft = import_peft()
    pattern = SPEAKER_EMBEDDING.replace(".", r"\.")  # a full match: not code_predictor's codec embeddings
    with warnings.catch_warnings():  # the LoRA adapters are there already, on other modules: intended
        warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
        peft.inject_adapter_in_model(peft.TrainableTokensConfig(target_modules=pattern, token_indices=list(rows)),
                                     talker, adapter_name=ADAPTER)


def apply(module: nn.Module, config: Config, rows: list[int] = ()) -> str | None:
    """Inject the adapters into `module.talker` (unsharded, before parallelize), and `rows` of the codec
    embedding as trainable tokens (`speaker_rows`), freeze the rest, and hold the frozen weights in the compute
    dtype. Returns the log line of trainable parameters (None: full fine-tuning)."""
    lora = config.lora
    if not lora.enabled:
        return None
    talker = module.talker
    targets, _ = resolve_targets(lora.targets, linear_names(talker))
    import_peft().inject_adapter_in_model(peft_config(lora, targets), talker, adapter_name=ADAPTER)
    if rows:
        inject_speaker_rows(talker, rows)
    compute = _DTYPES[config.fsdp.param_dtype]
    for name, param in talker.named_parameters():
        trainable = is_adapter(name) or (lora.train_heads and matches_any(name, HEAD_PARAMETERS))
        param.requires_grad_(trainable)
        if trainable:
            param.data = param.data.float()
        else:
            param.data = param.data.to(compute)
    total = sum(p.numel() for p in module.parameters())
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return (f"LoRA rank {lora.rank}, alpha {lora.alpha:g} on {len(targets)} modules"
            f"{' + heads' if lora.train_heads else ''}{f' + {len(rows)} speaker rows' if rows else ''}: trainable parameters {trained:,} of {total:,} "
            f"({100 * trained / total:.2f} %), frozen weights held in {config.fsdp.param_dtype}")


def is_adapter(name: str) -> bool:
    """A parameter training adds beside the base weights: lora_A/lora_B, or trained speaker rows."""
    return ".lora_A." in name or ".lora_B." in name or name.endswith(ROWS_DELTA)


def matches_any(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_sharded(module: nn.Module, config: Config) -> None:
    """After parallelize: every parameter is a DTensor (no plain tensor beside DTensors in a module), trainable
    ones are fp32 masters, frozen ones are in the compute dtype, and each lora_B has its full (out, rank) shape
    (not one sized from a rank's local shard)."""
    from torch.distributed.tensor import DTensor

    compute = _DTYPES[config.fsdp.param_dtype] if config.lora.enabled else torch.float32
    for name, param in module.named_parameters():
        problem = None
        if not isinstance(param, DTensor):
            problem = "is not sharded (a plain tensor among DTensors)"
        elif param.requires_grad and param.dtype != torch.float32:
            problem = f"is trainable but {param.dtype} (master weights must be float32)"
        elif not param.requires_grad and param.dtype != compute:
            problem = f"is frozen but {param.dtype} (expected {compute})"
        elif ".lora_B." in name and param.shape[1] != config.lora.rank:
            problem = f"has shape {tuple(param.shape)}, not (out_features, {config.lora.rank})"
        elif ".lora_A." in name and param.shape[0] != config.lora.rank:
            problem = f"has shape {tuple(param.shape)}, not ({config.lora.rank}, in_features)"
        if problem:
            raise RuntimeError(f"parameter {name} {problem}")


def inference_name(name: str) -> str | None:
    """The plain model's name of a training parameter (peft's `.base_layer.` dropped); None for an adapter, which
    `merge_adapters` folds into its layer's weight instead."""
    return None if is_adapter(name) else name.replace(".base_layer.", ".")


@torch.no_grad()
def merge_adapters(targets: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], module: nn.Module) -> None:
    """targets[X.weight] += scaling x B @ A for every adapted layer X of `module` (full adapter tensors by their
    training names; the scaling is the one peft's layer applies: alpha / rank), computed in fp32; trained speaker
    rows replace their rows of the embedding's weight, as peft's trainable tokens do in the forward."""
    for name, a in adapters.items():
        if name.endswith(ROWS_DELTA):
            prefix = name.removesuffix(ROWS_DELTA)
            weight = targets[f"{prefix}.weight"]
            weight[module.get_submodule(prefix).token_indices[ADAPTER]] = a.to(weight.dtype)
            continue
        if ".lora_A." not in name:
            continue
        prefix = name.split(".lora_A.")[0]
        b = adapters[f"{prefix}.lora_B.{ADAPTER}.weight"]
        weight = targets[f"{prefix}.weight"]
        scaling = module.get_submodule(prefix).scaling[ADAPTER]
        weight.copy_((weight.float() + scaling * (b.float() @ a.float())).to(weight.dtype))


# --------------------------------------------------------------------------------------------- checkpoints
def base_fingerprint(model_path: str | Path) -> str:
    """A cheap, deterministic fingerprint of a model directory's weights (model.safetensors or its shards):
    sha256 over each file's size, its safetensors header (every tensor's name, dtype, shape and offsets) and the
    first and last 4 KiB of every tensor's bytes. Reading all 3.9 GB of the 1.7B model would cost seconds at
    every start; this reads ~6 MB. Any retraining of the base moves every tensor, so its samples change; an
    edit confined to the middle of a tensor (one embedding row) is not seen."""
    path = Path(model_path)
    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    digest = hashlib.sha256()
    for name in files:
        with open(path / name, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = f.read(header_size)
            digest.update(f"{name}:{size}:".encode() + header)
            entries = json.loads(header)
            for key in sorted(k for k in entries if k != "__metadata__"):
                start, end = entries[key]["data_offsets"]
                start, end = start + 8 + header_size, end + 8 + header_size
                for offset in sorted({start, max(start, end - _SAMPLE_BYTES)}):
                    f.seek(offset)
                    digest.update(f.read(min(_SAMPLE_BYTES, end - offset)))
    return "sha256:" + digest.hexdigest()


def checkpoint_meta(config: Config, rows: list[int] = ()) -> dict:
    """What a LoRA checkpoint needs beside its tensors: the base it adapts, the adapter's shape and the
    codec-embedding rows it trains (`speaker_rows`)."""
    lora = config.lora
    targets, _ = resolve_targets(lora.targets, talker_linear_names(config.model.path))
    return {"base_model": str(Path(config.model.path).resolve()), "base_fingerprint": base_fingerprint(config.model.path),
            "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "train_heads": lora.train_heads,
            "targets": targets, "speaker_rows": list(rows)}


def checkpoint_files(config: Config, rows: list[int] = ()) -> dict[str, str]:
    """Files every step folder of the run gets (training.checkpoint.step_folders.save writes them into the folder)."""
    return {META_FILE: json.dumps(checkpoint_meta(config, rows), indent=1)} if config.lora.enabled else {}


def read_meta(step_dir: Path) -> dict | None:
    path = Path(step_dir) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def resume_problem(config: Config) -> str | None:
    """One line when the run directory's newest checkpoint cannot be resumed with this config's LoRA settings or
    base weights (a resume must see the weights the adapters were trained on), else None."""
    from training.checkpoint.step_folders import complete_checkpoints

    run_dir = Path(config.checkpoint.dir)
    found = complete_checkpoints(run_dir)
    if not found:
        return None
    latest = found[max(found)]
    meta = read_meta(latest)
    where = f"checkpoint.dir={run_dir} (newest {latest.name})"
    if meta is None:
        return (f"{where} holds a full fine-tuning run; it cannot resume with lora.rank={config.lora.rank}: "
                "use a new checkpoint.dir" if config.lora.enabled else None)
    if not config.lora.enabled:
        return (f"{where} holds a LoRA run (rank {meta['rank']}); set lora.rank={meta['rank']} (and its other "
                "lora.* values) to resume it, or use a new checkpoint.dir for full fine-tuning")
    current = checkpoint_meta(config)
    if current["base_fingerprint"] != meta["base_fingerprint"]:
        return (f"{where} was trained on the base weights of {meta['base_model']} ({meta['base_fingerprint'][:19]}), "
                f"but model.path={config.model.path} holds different weights ({current['base_fingerprint'][:19]}); "
                "resume with that base model, or use a new checkpoint.dir")
    for key in ("rank", "alpha", "train_heads", "targets"):
        if current[key] != meta[key]:
            shown = "the targeted modules" if key == "targets" else f"{meta[key]} -> {current[key]}"
            return (f"{where} has lora.{key} different from this config ({shown}); resume with the run's lora "
                    "values (its config.yaml), or use a new checkpoint.dir")
    return None
