"""The on-disk contract between the encode service and the training job.

Output directory layout (all names live here, nowhere else):

    OUTPUT/plan.json                  the shard plan, written once (see services.encode.plan)
    OUTPUT/manifest.jsonl             the normalised manifest the plan indexes (byte ranges per shard)
    OUTPUT/shards/shard-00000.parquet a published shard: written under a temporary name, then renamed
    OUTPUT/shard_index.json           per published shard, what training needs before its first step (a cache:
                                      see shared.shard_index; the driver updates it as shards publish)
    OUTPUT/workers/<name>.json        live heartbeat of one encoder (status only; never needed for truth)
    OUTPUT/summary.json + _COMPLETE   written once every planned shard is published
    OUTPUT/errors.jsonl               one line per error row, written with the summary
    OUTPUT/.lock or OUTPUT/lease.json the single driver's fcntl lock (a path) or lease (an object store)

A shard holds every manifest line of its range exactly once: good rows carry codes, bad rows carry
`error` and no codes. Readers must only open names matching SHARD_RE; temporaries never match.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from shared.storage import child_uri, is_uri
from shared.store import Store

SCHEMA_VERSION = 2  # 2 added speaker, language and extra
READABLE_VERSIONS = (1, 2)
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
LEASE_FILE = "lease.json"  # the driver's lease on an object store (services.encode.lease)
INDEX_FILE = "shard_index.json"

SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")

SHARD_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64(), nullable=False),  # line number in manifest.jsonl (0-based)
        pa.field("id", pa.string(), nullable=False),
        pa.field("audio", pa.string()),
        pa.field("text", pa.string()),
        pa.field("ref_audio", pa.string()),
        pa.field("speaker", pa.string()),  # null: the run's single unnamed speaker
        pa.field("language", pa.string()),  # null: no language given (the model's "auto" prefix)
        pa.field("extra", pa.string()),  # JSON object: every other key of the manifest line, kept as is
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


# Manifest keys with a column of their own; every other key of a manifest line travels in `extra`.
MANIFEST_KEYS = ("id", "audio", "text", "ref_audio", "speaker", "language")


def _text_or_none(value: object) -> str | None:
    """A manifest value for a string column: kept when a string, JSON text otherwise (a number, a list)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def row_id(index: int, entry: dict) -> str:
    """The one id rule: the entry's `id`, else its audio file's stem, else its manifest line number."""
    given = entry.get("id")
    if given is not None and str(given) != "":
        return str(given)
    audio = entry.get("audio")
    if isinstance(audio, str) and audio:
        return Path(audio).stem
    return f"line-{index + 1}"


@dataclass
class ShardRow:
    """One manifest line as stored in a shard: a good row carries codes, an error row carries `error`."""
    index: int  # line number in manifest.jsonl (0-based)
    id: str
    audio: str | None
    text: str | None
    ref_audio: str | None
    speaker: str | None = None
    language: str | None = None
    extra: dict = field(default_factory=dict)
    codes: np.ndarray | None = None  # (frames, 16) int64; None on an error row or when not read
    num_frames: int | None = None
    duration: float | None = None  # seconds of source audio
    sample_rate: int | None = None  # source sample rate
    error: str | None = None  # "<reason>: <detail>"

    @classmethod
    def from_entry(cls, index: int, entry: dict, *, codes: np.ndarray | None = None, duration: float | None = None,
                   sample_rate: int | None = None, error: str | None = None) -> "ShardRow":
        """The row for manifest entry `index`: good when `codes` are given, an error row when `error` is."""
        if (codes is None) == (error is None):
            raise ValueError(f"row {index}: give either codes or an error")
        extra = {k: v for k, v in entry.items() if k not in MANIFEST_KEYS}
        codes = None if codes is None else np.asarray(codes, dtype=np.int64)
        return cls(index, row_id(index, entry), _text_or_none(entry.get("audio")), _text_or_none(entry.get("text")),
                   _text_or_none(entry.get("ref_audio")), _text_or_none(entry.get("speaker")),
                   _text_or_none(entry.get("language")), extra, codes, None if codes is None else len(codes),
                   duration, sample_rate, error)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def trainable(self) -> bool:
        """A good row with a reference and frames: the rows training uses (and the shard index counts)."""
        return self.trains(needs_reference=True)

    def trains(self, needs_reference: bool) -> bool:
        """A good row with frames, and with a reference unless the run needs none (a run whose speaker slot holds
        a trained codec-embedding row instead of an x-vector)."""
        return self.ok and bool(self.num_frames) and (bool(self.ref_audio) or not needs_reference)

    @property
    def reason(self) -> str | None:
        """The error's reason code (the part before the first colon)."""
        return None if self.error is None else self.error.split(":", 1)[0]

    def manifest_line(self) -> dict:
        """The manifest keys this row was made from (absent ones left out), `extra` keys included."""
        line = {k: getattr(self, k) for k in MANIFEST_KEYS if getattr(self, k) is not None}
        line.update(self.extra)
        return line

    def column_value(self, name: str) -> object:
        if name == "extra":
            return json.dumps(self.extra, ensure_ascii=False) if self.extra else None
        return getattr(self, name)


_FIELD_NAMES = [f.name for f in fields(ShardRow)]
_COLUMN_OF = {"codes": "audio_codes"}


def build_table(rows: Sequence["ShardRow"], stats: ShardStats) -> pa.Table:
    columns = {f.name: [] for f in SHARD_SCHEMA if f.name != "audio_codes"}
    for row in rows:
        for name, values in columns.items():
            values.append(row.column_value(name))
    arrays = {n: pa.array(v, type=SHARD_SCHEMA.field(n).type) for n, v in columns.items()}
    arrays["audio_codes"] = codes_to_arrow([row.codes for row in rows])
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


def check_schema(path: str | Path) -> int:
    """The shard's schema version; raises if this code cannot read it."""
    meta = pq.read_schema(path).metadata or {}
    version = meta.get(b"qwen3tts_shard_schema", b"").decode() or None
    if version not in {str(v) for v in READABLE_VERSIONS}:
        raise ValueError(f"{path}: shard schema version {version!r}, this code reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}; re-encode with the matching version of "
                         "services.encode")
    return int(version)


@dataclass(frozen=True)
class ShardFile:
    """A published shard as listed: what identifies this publication of it (a re-published shard differs in
    size or modification time)."""
    shard_id: int
    name: str  # the file's name under shards/
    path: Path | str
    size: int
    mtime_ns: int


def _listed_uri(output: str) -> dict[int, pafs.FileInfo]:
    filesystem, path = pafs.FileSystem.from_uri(output)
    infos = filesystem.get_file_info(pafs.FileSelector(f"{path.rstrip('/')}/{SHARDS_DIR}", allow_not_found=True))
    found = {shard_id_of(info.base_name): info for info in infos}
    found.pop(None, None)
    return dict(sorted(found.items()))


def published_shards(output: "str | Path | Store") -> dict[int, Path | str]:
    """Shard id -> path of every published shard (a URI when `output` is one, see shared.storage; the store's
    locations for a shared.store.Store). Temporary files never match SHARD_RE."""
    if isinstance(output, Store):
        names = {shard_id_of(name): name for name in output.listing(SHARDS_DIR)}
        names.pop(None, None)
        return {sid: output.location(f"{SHARDS_DIR}/{names[sid]}") for sid in sorted(names)}
    if is_uri(output):
        return {sid: child_uri(output, SHARDS_DIR, info.base_name) for sid, info in _listed_uri(output).items()}
    shards_dir = Path(output) / SHARDS_DIR
    if not shards_dir.is_dir():
        return {}
    found = {}
    for entry in shards_dir.iterdir():
        sid = shard_id_of(entry.name)
        if sid is not None:
            found[sid] = entry
    return dict(sorted(found.items()))


def published_shard_files(output: str | Path) -> dict[int, ShardFile]:
    """published_shards with each file's size and modification time (from the listing itself where the
    filesystem gives them, one stat per shard on a local directory)."""
    if is_uri(output):
        return {sid: ShardFile(sid, info.base_name, child_uri(output, SHARDS_DIR, info.base_name), info.size,
                               info.mtime_ns or 0) for sid, info in _listed_uri(output).items()}
    shards_dir = Path(output) / SHARDS_DIR
    if not shards_dir.is_dir():
        return {}
    found = {}
    with os.scandir(shards_dir) as entries:
        for entry in entries:
            sid = shard_id_of(entry.name)
            if sid is not None:
                stat = entry.stat()
                found[sid] = ShardFile(sid, entry.name, Path(entry.path), stat.st_size, stat.st_mtime_ns)
    return dict(sorted(found.items()))


def published_shard_file(output: str | Path, shard_id: int) -> ShardFile:
    """One published shard's ShardFile (raises FileNotFoundError when it is not published)."""
    if is_uri(output):
        filesystem, path = pafs.FileSystem.from_uri(output)
        info = filesystem.get_file_info(f"{path.rstrip('/')}/{SHARDS_DIR}/{shard_name(shard_id)}")
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{output}: shard {shard_id} is not published")
        name = shard_name(shard_id)
        return ShardFile(shard_id, name, child_uri(output, SHARDS_DIR, name), info.size, info.mtime_ns or 0)
    path = Path(output) / SHARDS_DIR / shard_name(shard_id)
    stat = path.stat()
    return ShardFile(shard_id, path.name, path, stat.st_size, stat.st_mtime_ns)


def read_rows(path: str | Path, columns: Sequence[str] | None = None,
              positions: Sequence[int] | None = None) -> list[ShardRow]:
    """Rows of one published shard, in file order (or in `positions` order).

    `columns`: the ShardRow fields to read (default all; "codes" is the audio_codes column, the heavy one);
    fields not read keep their defaults. `positions`: read only these rows of the file. Version 1 shards read
    with no speaker, language or extra.
    """
    version = check_schema(path)
    wanted = list(_FIELD_NAMES if columns is None else columns)
    unknown = sorted(set(wanted) - set(_FIELD_NAMES))
    if unknown:
        raise ValueError(f"read_rows: no shard field {unknown}; fields are {_FIELD_NAMES}")
    for required in ("index", "id"):
        if required not in wanted:
            wanted.append(required)
    present = [n for n in wanted if not (version == 1 and n in ("speaker", "language", "extra"))]
    table = pq.read_table(path, columns=[_COLUMN_OF.get(n, n) for n in present])
    if positions is not None:
        table = table.take(pa.array(positions, type=pa.int64()))
    values = {n: table.column(_COLUMN_OF.get(n, n)) for n in present}
    plain = {n: col.to_pylist() for n, col in values.items() if n != "codes"}
    codes = _codes_column(values["codes"]) if "codes" in values else None
    rows = []
    for i in range(table.num_rows):
        kwargs = {n: plain[n][i] for n in plain}
        if "extra" in kwargs:
            kwargs["extra"] = json.loads(kwargs["extra"]) if kwargs["extra"] else {}
        if codes is not None:
            kwargs["codes"] = codes[i]
        kwargs.setdefault("audio", None)
        kwargs.setdefault("text", None)
        kwargs.setdefault("ref_audio", None)
        rows.append(ShardRow(**kwargs))
    return rows


def _codes_column(column: pa.ChunkedArray) -> list[np.ndarray | None]:
    """Every row of an audio_codes column as (frames, 16) int64 arrays, from one flat buffer."""
    array = column.combine_chunks()
    if len(array) == 0:
        return []
    offsets = array.offsets.to_numpy()
    # offsets index the list's whole `values` (also when the array is a slice of a larger one)
    flat = array.values.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, NUM_CODEBOOKS)
    nulls = array.is_null().to_numpy(zero_copy_only=False)
    return [None if nulls[i] else flat[offsets[i]:offsets[i + 1]] for i in range(len(array))]
