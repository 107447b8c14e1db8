"""End of a run: the summary, the error report and the completion marker (written last), and the
upstream-format JSONL export for tools that expect `train_with_codes.jsonl`."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

from services.encode.plan import Plan
from shared.audio import CODEC_SAMPLE_RATE, REFERENCE_MAX_SECONDS, AudioError, AudioLimits, load_audio
from shared.schema import (COMPLETE_MARKER, ERRORS_FILE, SHARDS_DIR, SUMMARY_FILE, published_shards, read_rows,
                           read_stats, shard_name)
from shared.storage import is_uri
from shared.store import Store, open_store


REFS_24K_DIR = "refs_24k"


def iter_rows(output: str | Path | Store, columns: list[str]):
    """Every row of every published shard, in shard order, with the asked ShardRow fields read."""
    for _, path in published_shards(open_store(output)).items():
        yield from read_rows(path, columns)


def write_summary(output: str | Path | Store, plan: Plan, elapsed: float) -> dict:
    """Totals over the published shards plus errors.jsonl; _COMPLETE, written last, only if every shard is there.

    _COMPLETE lists every shard with its size, row count and sha256, so a reader can trust it alone (a listing
    of an object store may lag; _COMPLETE names exactly what the job published)."""
    store = open_store(output)
    listing = store.listing(SHARDS_DIR)
    shards = published_shards(store)
    stats = {sid: read_stats(p) for sid, p in shards.items()}
    reasons: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix=".summary-", dir=store.scratch_directory()) as scratch:
        errors_path = Path(scratch) / ERRORS_FILE
        with open(errors_path, "w", encoding="utf-8") as f:
            for row in iter_rows(store, ["index", "id", "audio", "error"]):
                if not row.ok:
                    reasons[row.reason] = reasons.get(row.reason, 0) + 1
                    f.write(json.dumps({"index": row.index, "id": row.id, "audio": row.audio, "error": row.error},
                                       ensure_ascii=False) + "\n")
        store.publish_file(ERRORS_FILE, errors_path)
    complete = len(shards) == len(plan.shards)
    summary = {
        "complete": complete, "shards_total": len(plan.shards), "shards_done": len(shards),
        "rows_planned": plan.num_rows, "rows_ok": sum(s.rows_ok for s in stats.values()),
        "rows_error": sum(s.rows_error for s in stats.values()), "errors_by_reason": reasons,
        "audio_hours": sum(s.audio_seconds for s in stats.values()) / 3600,
        "frames": sum(s.frames for s in stats.values()), "elapsed_seconds": elapsed, "finished": time.time(),
    }
    store.write_json(SUMMARY_FILE, summary)
    if complete:
        listed = []
        for sid in shards:
            name = shard_name(sid)
            listed.append({"name": f"{SHARDS_DIR}/{name}", "size": listing[name].size, "rows": stats[sid].rows,
                           "sha256": store.sha256(f"{SHARDS_DIR}/{name}")})
        store.write_json(COMPLETE_MARKER, {"finished": summary["finished"], "rows": plan.num_rows,
                                           "shards": listed})
    return summary


@dataclass
class JsonlExport:
    rows: int
    resampled: dict[str, str] = field(default_factory=dict)  # reference -> its 24 kHz copy under refs_24k/
    unreadable: list[str] = field(default_factory=list)  # references whose rate could not be read (kept as is)

    def describe(self, destination: str | Path) -> list[str]:
        lines = [f"exported {self.rows} rows to {destination}"]
        if self.resampled:
            refs = f"{str(destination).rpartition('/')[0] or '.'}/{REFS_24K_DIR}"
            lines.append(f"{len(self.resampled)} reference(s) not at 24 kHz (upstream's dataset.py asserts 24 kHz): "
                         f"ref_audio points at their 24 kHz copies in {refs}")
        if self.unreadable:
            lines.append(f"{len(self.unreadable)} reference(s) could not be read and were kept as they are: "
                         f"{', '.join(self.unreadable[:5])}")
        return lines


def export_jsonl(output: str | Path | Store, destination: str | Path) -> JsonlExport:
    """Good rows as upstream's train_with_codes.jsonl: every key of the manifest line (audio, text, ref_audio,
    speaker, language and any other) plus audio_codes (frames x 16). Upstream's dataset.py asserts 24 kHz
    references, so a reference at another rate is written once, resampled, to refs_24k/ next to the export,
    and the line's ref_audio points at that copy. `destination`: a path, or a URI of a store (shared.store):
    the file and its refs_24k/ are built locally, then published there, ref_audio naming the copies' URIs."""
    if not is_uri(str(destination)):
        return _export_to(output, Path(destination), lambda copy: str(copy))
    parent, _, name = str(destination).partition("?")[0].rpartition("/")
    target = open_store(parent)
    with tempfile.TemporaryDirectory(prefix="export-") as scratch:
        local = Path(scratch) / name
        export = _export_to(output, local, lambda copy: str(target.location(f"{REFS_24K_DIR}/{copy.name}")))
        for copy in sorted((local.parent / REFS_24K_DIR).glob("*.wav")):
            target.publish_file(f"{REFS_24K_DIR}/{copy.name}", copy)
        target.publish_file(name, local)
    return export


def _export_to(output, destination: Path, name_of_copy) -> JsonlExport:
    export = JsonlExport(0)
    rates: dict[str, int | None] = {}
    tmp = destination.with_name(destination.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in iter_rows(output, ["audio", "text", "ref_audio", "speaker", "language", "extra", "codes",
                                      "error"]):
            if not row.ok:
                continue
            line = row.manifest_line()
            if row.ref_audio:
                line["ref_audio"] = _reference_at_24k(row.ref_audio, destination.parent / REFS_24K_DIR, rates, export,
                                                      name_of_copy)
            line["audio_codes"] = row.codes.tolist()
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            export.rows += 1
    os.replace(tmp, destination)
    return export


def _reference_at_24k(ref: str, refs_dir: Path, rates: dict, export: JsonlExport, name_of_copy) -> str:
    """The path to write for `ref`: itself at 24 kHz, else its copy under refs_dir (written on first use), as
    `name_of_copy` names it where the export is read."""
    if ref not in rates:
        try:
            rates[ref] = sf.info(ref).samplerate
            if rates[ref] != CODEC_SAMPLE_RATE:
                export.resampled[ref] = name_of_copy(_write_24k_copy(ref, refs_dir))
        except (OSError, RuntimeError, AudioError) as exc:
            rates[ref] = None
            export.unreadable.append(f"{ref} ({exc})")
    return export.resampled.get(ref, ref)


def _write_24k_copy(ref: str, refs_dir: Path) -> Path:
    """Mono 24 kHz float wav (the resampling the encoder uses), named by stem + a hash of the source path."""
    refs_dir.mkdir(parents=True, exist_ok=True)
    target = refs_dir / f"{Path(ref).stem}-{hashlib.sha1(ref.encode()).hexdigest()[:10]}.wav"
    samples = load_audio(ref, AudioLimits(min_seconds=0.0, max_seconds=REFERENCE_MAX_SECONDS)).samples
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    sf.write(tmp, samples, CODEC_SAMPLE_RATE, subtype="FLOAT", format="WAV")
    os.replace(tmp, target)
    return target
