"""Typed training configuration: a YAML file, validated against dataclasses, with dotted key=value overrides.

    torchrun ... -m training.train --config training/configs/qwen3tts_1.7b.yaml data.shards=/data/out train.lr=1e-5

Unknown keys and wrongly typed values are errors (a typo must not silently train with a default).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "constant")
# generated: the base model's own codes; encoded: its speech decoded to wav and encoded again by the encode service
REHEARSAL_TARGETS = ("generated", "encoded")


@dataclass
class ModelConfig:
    path: str = ""  # a Base or CustomVoice model directory (config.json, model.safetensors, tokenizer, speech_tokenizer/)
    # CustomVoice model.path only (training.speakers.custom_voice): a Base model of the same size whose speaker encoder
    # gives new speakers their x-vectors; empty = each new speaker's codec-embedding row trains instead
    speaker_encoder: str = ""
    retrain_speakers: list[str] = field(default_factory=list)  # built-in speakers the shards may retrain
    # auto | eager | sdpa | flex_attention | flash_attention_2; auto: on an NPU with bf16/fp16 compute
    # flash_attention_2 (npu_fusion_attention), on CUDA flash_attention_2 when flash-attn is installed (half
    # precision) else flex_attention, sdpa elsewhere (shared.device.attention_for)
    attn_implementation: str = "sdpa"


@dataclass
class DataConfig:
    shards: str = ""  # the encode output directory, or its shards/ subdirectory
    follow: bool = False  # train while the encode service publishes; stop when its plan is complete
    frame_budget: int = 8192  # max computed positions (text + frames + padding) per micro-batch
    packing: bool = True  # several utterances per sequence, each attending only to itself
    pack_length: int = 0  # packed: max positions per sequence (0 = frame_budget: one sequence per micro-batch)
    max_batch_size: int = 64  # unpacked: rows per micro-batch at most, whatever the budget
    shards_per_round: int = 8  # shards shuffled and batched together (bounds memory; the unit of follow mode)
    bucket_size: int = 512  # unpacked: rows sorted by length together before batching (length bucketing)
    poll_seconds: float = 10.0  # follow mode: wait between looks for new shards
    prefetch_steps: int = 2  # steps of input prepared in the background (0: prepared inline)
    trace_rows: bool = False  # record the row ids each step trained, per rank (RUN/trained_rows/)
    # CustomVoice model.path only (training.rehearsal): share of each round's training rows that are the base
    # model's own speech for its built-in speakers, and where their targets come from (generated | encoded)
    rehearsal_fraction: float = 0.0
    rehearsal_targets: str = "generated"


@dataclass
class TrainConfig:
    steps: int = 0  # optimizer steps; 0 = run `epochs` epochs
    epochs: int = 1  # used when steps is 0; follow mode always stops at the end of the data
    lr: float = 1e-5
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine (to min_lr_ratio x lr) or constant, after linear warmup
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    grad_accum: int = 1
    seed: int = 0
    sub_talker_weight: float = 0.3  # loss = talker + weight x sub-talker
    device: str = "auto"  # auto | npu | cuda | cpu
    log_interval: int = 1  # steps between metrics lines (the only device->host sync of the loop)
    peak_tflops: float = 0.0  # device peak for mfu (0: from training.train.flops's table by device name)
    timeout_minutes: float = 30.0  # a collective waiting longer than this fails the run (process group timeout)


@dataclass
class FsdpConfig:
    param_dtype: str = "bfloat16"  # compute dtype; master weights and optimizer state stay fp32
    reduce_dtype: str = "float32"
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False


@dataclass
class CheckpointConfig:
    dir: str = "runs/qwen3tts"  # the run directory: step-NNNNNN/ folders, metrics.jsonl, config.yaml
    interval: int = 500  # steps between checkpoints (a final one is always written)
    keep: int = 3  # most recent complete checkpoints kept
    log_dir: str = ""  # metrics.jsonl, TensorBoard, config.yaml, samples: "" = dir (a path) or runs/<bucket>/<prefix>

    def location(self):
        """Where checkpoints go: a Path, or the s3:// URI as given."""
        return self.dir if "://" in self.dir and not self.dir.startswith("file://") else Path(self.dir)

    def logs(self) -> Path:
        """The local directory of the run's logs (checkpoint.dir itself unless that is an object store)."""
        location = self.location()
        if self.log_dir:
            return Path(self.log_dir)
        return location if isinstance(location, Path) else Path("runs", *location.split("://", 1)[1].split("/"))


@dataclass
class EvalConfig:
    """Held-out data, eval loss, samples and their scores; off unless fraction > 0 or shards are named."""
    fraction: float = 0.0  # share of each speaker's rows held out (a hash of row id, speaker and seed decides)
    shards: list[int] = field(default_factory=list)  # shard ids held out whole (e.g. a recording session)
    seed: int = 0  # the split's seed; changing it (or fraction/shards) mid-run is refused
    interval: int = 0  # steps between evals; 0 = at the end of training only
    max_rows: int = 256  # held-out rows per speaker scored for the eval loss (the rest stay unused)
    sentences: list[str] = field(default_factory=list)  # synthesised per speaker; empty = defaults per language
    samples: bool = True  # synthesise and score sentences at each eval (rank 0)
    max_new_tokens: int = 0  # codec frames per sample at most; 0 = a slow reading of the sentence (voice_check)
    budget_seconds: float = 300.0  # synthesis time per eval; samples not started by then are skipped (logged)
    asr_model: str = ""  # a local speech-recognition model directory (transformers ASR pipeline) for CER/WER
    # CustomVoice model.path: the built-in speakers whose forgetting is measured (keep/<speaker>); empty = all
    keep_speakers: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.fraction > 0 or bool(self.shards)


# Module-name globs (fnmatch, relative to the talker; only Linear modules count): the attention and MLP projections
# of the talker's decoder layers and of the code predictor's layers.
LORA_TARGETS = ["model.layers.*.self_attn.[qkvo]_proj", "model.layers.*.mlp.*_proj",
                "code_predictor.model.layers.*.self_attn.[qkvo]_proj", "code_predictor.model.layers.*.mlp.*_proj"]


@dataclass
class LoraConfig:
    """Low-rank adapters (training.model.lora); rank 0 trains every weight (full fine-tuning)."""
    rank: int = 0
    alpha: float = 32.0  # adapter output scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    train_heads: bool = False  # also train the codec head, the code predictor's heads and the codec embeddings

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def problems(self) -> list[str]:
        found = []
        if self.rank < 0:
            found.append(f"lora.rank={self.rank} must be >= 0 (0 = full fine-tuning, e.g. 16 for LoRA)")
        if self.alpha <= 0:
            found.append(f"lora.alpha={self.alpha:g} must be > 0 (the adapter is scaled by alpha/rank; e.g. 2 x rank)")
        if not 0.0 <= self.dropout < 1.0:
            found.append(f"lora.dropout={self.dropout:g} must be in [0, 1)")
        if self.enabled and not self.targets:
            found.append("lora.targets is empty; list module-name patterns (default: the layers' projections)")
        return found


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> "Config":
        problems = []
        if not self.model.path:
            problems.append("model.path is required")
        if not self.data.shards:
            problems.append("data.shards is required")
        if self.train.steps < 0 or self.train.epochs < 0 or (self.train.steps == 0 and self.train.epochs == 0):
            problems.append("set train.steps > 0 or train.epochs > 0")
        if self.train.lr_schedule not in SCHEDULES:
            problems.append(f"train.lr_schedule must be one of {SCHEDULES}")
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self.fsdp, name) not in DTYPES:
                problems.append(f"fsdp.{name} must be one of {DTYPES}")
        from shared.device import ATTENTION_CHOICES

        if self.model.attn_implementation not in ATTENTION_CHOICES:
            problems.append(f"model.attn_implementation must be one of {ATTENTION_CHOICES}")
        for name, value in (("train.grad_accum", self.train.grad_accum), ("data.frame_budget", self.data.frame_budget),
                            ("checkpoint.interval", self.checkpoint.interval), ("checkpoint.keep", self.checkpoint.keep),
                            ("data.max_batch_size", self.data.max_batch_size),
                            ("data.shards_per_round", self.data.shards_per_round)):
            if value < 1:
                problems.append(f"{name} must be >= 1")
        if self.data.pack_length < 0 or self.data.prefetch_steps < 0 or self.train.log_interval < 1:
            problems.append("data.pack_length and data.prefetch_steps must be >= 0, train.log_interval >= 1")
        if self.data.pack_length > self.data.frame_budget:
            problems.append("data.pack_length must not exceed data.frame_budget (a micro-batch holds whole sequences)")
        if not 0.0 <= self.data.rehearsal_fraction < 1.0:
            problems.append(f"data.rehearsal_fraction={self.data.rehearsal_fraction:g} must be in [0, 1): the share of "
                            "training rows that rehearse the built-in speakers (e.g. 0.1; 0 = off)")
        if self.data.rehearsal_targets not in REHEARSAL_TARGETS:
            problems.append(f"data.rehearsal_targets={self.data.rehearsal_targets} must be one of "
                            f"{', '.join(REHEARSAL_TARGETS)}")
        if not 0.0 <= self.eval.fraction < 1.0:
            problems.append("eval.fraction must be in [0, 1): the share of each speaker's rows held out")
        if self.eval.interval < 0 or self.eval.max_rows < 1 or self.eval.max_new_tokens < 0:
            problems.append("eval.interval and eval.max_new_tokens must be >= 0, eval.max_rows >= 1")
        if self.train.timeout_minutes <= 0 or not 0 < self.eval.budget_seconds < self.train.timeout_minutes * 60:
            problems.append("eval.budget_seconds must be > 0 and below train.timeout_minutes x 60 (the other ranks "
                            "wait for the samples that long at most); lower the budget or raise the timeout")
        if self.eval.asr_model and not Path(self.eval.asr_model, "config.json").is_file():
            problems.append(f"eval.asr_model {self.eval.asr_model} has no config.json; give a local "
                            f"speech-recognition model directory (e.g. a Whisper checkpoint) or leave it empty")
        problems += self.lora.problems()
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def for_chip(self, device) -> str:
        """Check this config against the chip `device` (a shared.device.DeviceInfo) before anything is loaded,
        failing with the fix when it lacks a dtype asked for (910A: no bf16); returns the attention
        implementation to load the model with (`auto` resolved for this device and compute dtype)."""
        from shared.device import attention_for, check_training_precision

        check_training_precision(device, {"fsdp.param_dtype": self.fsdp.param_dtype,
                                          "fsdp.reduce_dtype": self.fsdp.reduce_dtype})
        return attention_for(self.model.attn_implementation, device.kind, self.fsdp.param_dtype)


def _coerce(value, annotation, key: str):
    """Check/convert one value against a dataclass field type (bool, int, float, str, tuple, list)."""
    origin = typing.get_origin(annotation)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        item = typing.get_args(annotation)[0]
        return [_coerce(v, item, key) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        return str(value)
    raise TypeError(f"{key}: unsupported field type {annotation}")


def _apply(section, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        if key not in hints:
            raise ValueError(f"unknown config key {prefix}{key}; known: {', '.join(sorted(hints))}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{key} is a section; give it a mapping")
            _apply(current, value, f"{prefix}{key}.")
        else:
            setattr(section, key, _coerce(value, hints[key], f"{prefix}{key}"))


def parse_override(text: str) -> dict:
    """'train.lr=1e-5' -> {'train': {'lr': 1e-05}}. Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    if isinstance(value, str) and raw.strip():
        value = _number_or_text(raw.strip())
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def _number_or_text(raw: str):
    """YAML reads '2e-5' as a string; accept it as the number a user meant."""
    try:
        return float(raw) if any(c in raw for c in ".eE") else int(raw)
    except ValueError:
        return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    config = Config()
    if path:
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        _apply(config, values, "")
    for text in overrides:
        _apply(config, parse_override(text), "")
    return config.validate()


def dump_config(config: Config, path: Path) -> None:
    values = config.to_dict()
    values["train"]["betas"] = list(values["train"]["betas"])
    path.write_text(yaml.safe_dump(values, sort_keys=False))
