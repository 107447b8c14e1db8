"""The shard plan: deterministic contiguous ranges of the normalised manifest, written once.

A resubmit with the same inputs reuses the plan (and so skips finished shards); a resubmit whose
manifest is the old one with lines appended extends it (services.encode.grow); a resubmit whose inputs or
codec differ otherwise is refused unless `replan=True`, which moves the old results aside rather
than deleting them.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from services.encode.manifest import input_fingerprint, write_normalised
from shared.device import CodecNumerics
from shared.schema import (COMPLETE_MARKER, ERRORS_FILE, INDEX_FILE, MANIFEST_FILE, PLAN_FILE, SHARDS_DIR,
                           SUMMARY_FILE, WORKERS_DIR)
from shared.store import LocalStore, Store, open_store

PLAN_VERSION = 1


class PlanMismatch(RuntimeError):
    pass


@dataclass(frozen=True)
class PlanInputs:
    """Everything that decides the codes in the shards; its hash is the plan's identity."""
    manifest: str
    manifest_sha256: str
    codec: str
    codec_sha256: str
    shard_size: int
    exact_tail: bool = False
    min_seconds: float = 0.1
    max_seconds: float = 60.0
    ref_audio: str | None = None

    def config_hash(self) -> str:
        # Paths are left out: moving the same manifest or codec elsewhere must not force a re-encode.
        identity = {k: v for k, v in asdict(self).items() if k not in ("manifest", "codec")}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ShardSpec:
    id: int
    start: int  # first manifest line (0-based)
    end: int  # one past the last line
    byte_start: int
    byte_end: int

    @property
    def rows(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class EncodeRun:
    """One run of the encoders on this plan: when, and with which device kind and codec numerics. Not part of
    the plan's identity (a resumed job may run on other hardware), but kept so that a mix is visible."""
    started: float
    numerics: CodecNumerics

    def to_json(self) -> dict:
        return {"started": self.started, **asdict(self.numerics)}

    @classmethod
    def from_json(cls, data: dict) -> "EncodeRun":
        return cls(data["started"], CodecNumerics(**{k: v for k, v in data.items() if k != "started"}))


@dataclass(frozen=True)
class CoveredManifest:
    """The part of manifest.jsonl the plan's shards cover: its first `bytes` bytes, whose hash is `sha256`.
    A new manifest that normalises to exactly these bytes followed by more lines is the same corpus grown.
    Kept outside PlanInputs: it is not an input, and adding it there would change every old plan's identity."""
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Growth:
    """One extension of the plan by appended manifest lines (services.encode.grow)."""
    time: float
    rows_before: int
    shards_before: int
    rows_added: int


@dataclass
class Plan:
    config_hash: str
    inputs: PlanInputs
    num_rows: int
    shards: list[ShardSpec]
    created: float = field(default_factory=time.time)
    version: int = PLAN_VERSION
    runs: list[EncodeRun] = field(default_factory=list)
    covered: CoveredManifest | None = None  # None only in plans written before growth was possible
    growths: list[Growth] = field(default_factory=list)

    def to_json(self) -> dict:
        data = {"version": self.version, "config_hash": self.config_hash, "created": self.created,
                "inputs": asdict(self.inputs), "num_rows": self.num_rows, "num_shards": len(self.shards),
                "encode_runs": [r.to_json() for r in self.runs], "grown": [asdict(g) for g in self.growths],
                "shards": [asdict(s) for s in self.shards]}
        if self.covered is not None:
            data["manifest_covered"] = asdict(self.covered)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        # Plans written before encode runs, growth or the covered manifest were recorded have none of them.
        covered = data.get("manifest_covered")
        return cls(config_hash=data["config_hash"], inputs=PlanInputs(**data["inputs"]), num_rows=data["num_rows"],
                   shards=[ShardSpec(**s) for s in data["shards"]], created=data["created"], version=data["version"],
                   runs=[EncodeRun.from_json(r) for r in data.get("encode_runs", [])],
                   covered=CoveredManifest(**covered) if covered else None,
                   growths=[Growth(**g) for g in data.get("grown", [])])


def hash_directory(path: Path) -> str:
    """Content hash of a model directory (config and weights), streamed."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + b"\0")
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()


def cut_shards(lines: Iterable[bytes], shard_size: int, first_id: int = 0, first_line: int = 0,
               first_byte: int = 0) -> tuple[int, list[ShardSpec]]:
    """Shards of `shard_size` lines over `lines` (which start at line `first_line`, byte `first_byte` of the
    manifest), numbered from `first_id`; returns the line count reached and the shards."""
    if shard_size < 1:
        raise ValueError("--shard-size must be at least 1")
    shards, line, offset, start_line, start_byte = [], first_line, first_byte, first_line, first_byte
    for raw in lines:
        line += 1
        offset += len(raw)
        if line - start_line == shard_size:
            shards.append(ShardSpec(first_id + len(shards), start_line, line, start_byte, offset))
            start_line, start_byte = line, offset
    if line > start_line:
        shards.append(ShardSpec(first_id + len(shards), start_line, line, start_byte, offset))
    return line, shards


def hashing(lines: Iterable[bytes], h) -> Iterator[bytes]:
    """`lines`, feeding each to the hash `h` on the way."""
    for raw in lines:
        h.update(raw)
        yield raw


def plan_shards(manifest: Path, shard_size: int) -> tuple[int, list[ShardSpec], CoveredManifest]:
    """One streaming pass over the normalised manifest recording byte offsets every `shard_size` lines."""
    h = hashlib.sha256()
    with open(manifest, "rb") as f:
        num_rows, shards = cut_shards(hashing(f, h), shard_size)
    return num_rows, shards, CoveredManifest(shards[-1].byte_end if shards else 0, h.hexdigest())


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def load_plan(store: Store | str | Path) -> Plan | None:
    store = open_store(store)
    data = store.read_json(PLAN_FILE) if store.exists(PLAN_FILE) else None
    if data is None:
        return None
    return Plan.from_json(data)


def _move_aside(store: Store) -> str:
    aside = f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    for name in (PLAN_FILE, MANIFEST_FILE, SHARDS_DIR, WORKERS_DIR, SUMMARY_FILE, ERRORS_FILE, COMPLETE_MARKER,
                 INDEX_FILE, "driver.json"):
        if store.exists(name) or store.listing(name):
            store.move(name, f"{aside}/{name}")
    return str(store.location(aside))


def prepare_plan(store: Store | str | Path, inputs_source: Path, codec: Path, shard_size: int, *, exact_tail: bool = False,
                 min_seconds: float = 0.1, max_seconds: float = 60.0, ref_audio: str | None = None,
                 replan: bool = False, log=print) -> Plan:
    """Reuse the plan in `store` if it matches these inputs; write a new one if there is none.

    The manifest copy is published first, then plan.json is created if absent (a conditional create on an
    object store): a plan never points at a manifest that is not there."""
    store = open_store(store)
    inputs = PlanInputs(manifest=str(inputs_source.resolve()), manifest_sha256=input_fingerprint(inputs_source, ref_audio),
                        codec=str(codec.resolve()), codec_sha256=hash_directory(codec), shard_size=shard_size,
                        exact_tail=exact_tail, min_seconds=min_seconds, max_seconds=max_seconds, ref_audio=ref_audio)
    existing = load_plan(store)
    if existing is not None:
        if existing.config_hash == inputs.config_hash():
            return existing
        changed = [k for k, v in asdict(inputs).items()
                   if k not in ("manifest", "codec") and asdict(existing.inputs).get(k) != v]
        if not replan:
            if changed == ["manifest_sha256"]:  # the manifest alone changed: appended lines extend the plan
                from services.encode.grow import grow_plan

                if not isinstance(store, LocalStore):
                    raise PlanMismatch(f"{store.root} holds a plan for another manifest; growing a corpus is "
                                       "supported on a path only so far: use --replan or a new --output")
                return grow_plan(store.path, existing, inputs, inputs_source, log)
            raise PlanMismatch(f"{store.root} already holds a plan for different inputs (changed: {', '.join(changed)}). "
                               "Use a new --output, or pass --replan to move the old results aside and start over.")
        log(f"--replan: moved the previous plan and shards to {_move_aside(store)}")
    with tempfile.TemporaryDirectory(prefix=".plan-", dir=store.scratch_directory()) as scratch:
        manifest = Path(scratch) / MANIFEST_FILE
        write_normalised(inputs_source, manifest, ref_audio)
        num_rows, shards, covered = plan_shards(manifest, shard_size)
        store.publish_file(MANIFEST_FILE, manifest)
    plan = Plan(inputs.config_hash(), inputs, num_rows, shards, covered=covered)
    if not store.create_new(PLAN_FILE, plan_bytes(plan)):
        raise PlanMismatch(f"{store.root}: plan.json appeared while this job planned (another driver?); re-run "
                           "the same command")
    return plan


def plan_bytes(plan: Plan) -> bytes:
    return json.dumps(plan.to_json(), indent=1, ensure_ascii=False).encode()


def record_encode_run(store: Store | str | Path, plan: Plan, numerics: CodecNumerics, log=print) -> list[str]:
    """Append this run's device kind and codec numerics to plan.json; returns (and logs as a warning) how they
    differ from earlier runs' on the same plan.

    A resubmit on other hardware is allowed, not refused: the shards already published stay valid codes, and
    the fp32 codec with HF32/TF32 off differs between devices only in the rounding of near-tie codebook choices.
    But the output is then no longer from one kind of machine, and plan.json says so.
    """
    store = open_store(store)
    differences = sorted({d for run in plan.runs for d in numerics.differs_from(run.numerics)})
    if differences:
        log(f"warning: {store.root} holds shards encoded with other codec numerics than this run's "
            f"({'; '.join(differences)}); codes of rare near-tie frames may differ between those shards. "
            f"For one kind of machine throughout, use a new --output (or --replan) on that hardware")
    plan.runs.append(EncodeRun(time.time(), numerics))
    store.write_bytes(PLAN_FILE, plan_bytes(plan))
    return differences


def amend_encode_run(store: Store | str | Path, plan: Plan, numerics: CodecNumerics, who: str, log=print) -> None:
    """An encoder of this run computes the codec otherwise than the run recorded (known only once it has seen its
    chip, e.g. fp16 inputs on an Ascend 910A): plan.json records what it really does, and the log says so."""
    if not plan.runs or plan.runs[-1].numerics == numerics:
        return
    log(f"WARNING: {who} encodes with other codec numerics than recorded "
        f"({'; '.join(numerics.differs_from(plan.runs[-1].numerics))}); plan.json records them")
    plan.runs[-1] = EncodeRun(plan.runs[-1].started, numerics)
    open_store(store).write_bytes(PLAN_FILE, plan_bytes(plan))
