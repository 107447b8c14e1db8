"""The on-disk contract between the encode service and the training job.

Output directory layout (all names live here, nowhere else):

    OUTPUT/plan.json                  the shard plan, written once (see services.plan)
    OUTPUT/manifest.jsonl             the normalised manifest the plan indexes (byte ranges per shard)
    OUTPUT/shards/shard-00000.parquet a published shard: written under a temporary name, then renamed
    OUTPUT/workers/<name>.json        live heartbeat of one encoder (status only; never needed for truth)
    OUTPUT/summary.json + _COMPLETE   written once every planned shard is published
    OUTPUT/errors.jsonl               one line per error row, written with the summary

A shard holds every manifest line of its range exactly once: good rows carry codes, bad rows carry
`error` and no codes. Readers must only open names matching SHARD_RE; temporaries never match.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from shared.storage import child_uri, is_uri

SCHEMA_VERSION = 1
NUM_CODEBOOKS = 16
CODEBOOK_SIZE = 2048

PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.jsonl"
SHARDS_DIR = "shards"
WORKERS_DIR = "workers"
SUMMARY_FILE = "summary.json"
COMPLETE_MARKER = "_COMPLETE"
ERRORS_FILE = "errors.jsonl"
LOCK_FILE = ".lock"

SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")

SHARD_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64(), nullable=False),  # line number in manifest.jsonl (0-based)
        pa.field("id", pa.string(), nullable=False),
        pa.field("audio", pa.string()),
        pa.field("text", pa.string()),
        pa.field("ref_audio", pa.string()),
        pa.field("audio_codes", pa.list_(pa.list_(pa.int16(), NUM_CODEBOOKS))),  # frames x 16
        pa.field("num_frames", pa.int32()),
        pa.field("duration", pa.float64()),  # seconds of source audio
        pa.field("sample_rate", pa.int32()),  # source sample rate
        pa.field("error", pa.string()),  # null for a good row; "<reason>: <detail>" otherwise
    ],
    metadata={b"qwen3tts_shard_schema": str(SCHEMA_VERSION).encode()},
)

# Parquet key-value metadata with per-shard totals, so status can count without reading columns.
STATS_KEY = b"qwen3tts_shard_stats"


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}.parquet"


def shard_id_of(name: str) -> int | None:
    m = SHARD_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass
class ShardStats:
    rows: int
    rows_ok: int
    rows_error: int
    audio_seconds: float  # of good rows
    frames: int
    encode_seconds: float  # wall time the encoder spent on the shard
    worker: str

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def build_table(rows: list[dict], stats: ShardStats) -> pa.Table:
    """Rows are dicts with SHARD_SCHEMA keys; audio_codes a (frames, 16) integer array or None."""
    columns = {f.name: [] for f in SHARD_SCHEMA}
    for row in rows:
        for name, values in columns.items():
            value = row.get(name)
            if name == "audio_codes" and value is not None:
                value = np.asarray(value, dtype=np.int16)
            values.append(value)
    codes = columns.pop("audio_codes")
    arrays = {n: pa.array(v, type=SHARD_SCHEMA.field(n).type) for n, v in columns.items()}
    arrays["audio_codes"] = codes_to_arrow(codes)
    meta = dict(SHARD_SCHEMA.metadata)
    meta[STATS_KEY] = stats.to_json().encode()
    return pa.Table.from_arrays([arrays[f.name] for f in SHARD_SCHEMA], schema=SHARD_SCHEMA.with_metadata(meta))


def codes_to_arrow(codes: list[np.ndarray | None]) -> pa.Array:
    """Build list<fixed_size_list<int16,16>> straight from numpy buffers (no per-value Python objects)."""
    lengths = np.array([0 if c is None else len(c) for c in codes], dtype=np.int32)
    offsets = np.zeros(len(codes) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = [c.reshape(-1) for c in codes if c is not None and len(c)]
    values = np.concatenate(flat).astype(np.int16) if flat else np.zeros(0, dtype=np.int16)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values, type=pa.int16()), NUM_CODEBOOKS)
    mask = pa.array([c is None for c in codes], type=pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), inner, mask=mask)


def codes_of(column: pa.ChunkedArray | pa.Array, i: int) -> np.ndarray | None:
    """Row i of an audio_codes column as a (frames, 16) int64 array (None for an error row)."""
    value = column[i]
    if not value.is_valid:
        return None
    flat = value.values.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, NUM_CODEBOOKS).astype(np.int64)


def read_stats(path: str | Path) -> ShardStats:
    meta = pq.read_schema(path).metadata or {}
    return ShardStats(**json.loads(meta[STATS_KEY]))


def check_schema(path: str | Path) -> None:
    meta = pq.read_schema(path).metadata or {}
    version = meta.get(b"qwen3tts_shard_schema")
    if version != str(SCHEMA_VERSION).encode():
        raise ValueError(f"{path}: shard schema version {version!r}, this code reads {SCHEMA_VERSION}; "
                         "re-encode with the matching version of services.encode")


def published_shards(output: str | Path) -> dict[int, Path | str]:
    """Shard id -> path of every published shard (a URI when `output` is one, see shared.storage).
    Temporary files never match SHARD_RE."""
    if is_uri(output):
        filesystem, path = pafs.FileSystem.from_uri(output)
        infos = filesystem.get_file_info(pafs.FileSelector(f"{path.rstrip('/')}/{SHARDS_DIR}", allow_not_found=True))
        names = {shard_id_of(info.base_name): info.base_name for info in infos}
        names.pop(None, None)
        return {sid: child_uri(output, SHARDS_DIR, names[sid]) for sid in sorted(names)}
    shards_dir = Path(output) / SHARDS_DIR
    if not shards_dir.is_dir():
        return {}
    found = {}
    for entry in shards_dir.iterdir():
        sid = shard_id_of(entry.name)
        if sid is not None:
            found[sid] = entry
    return dict(sorted(found.items()))
