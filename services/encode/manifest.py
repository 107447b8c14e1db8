"""Turn the user's input (a JSONL manifest or a directory of audio + transcripts) into the normalised
`manifest.jsonl` the plan indexes: one JSON object per line, absolute paths, and a line for every
input entry, broken ones included, so that a bad line becomes an error row instead of vanishing."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}
TRANSCRIPT_SUFFIXES = (".txt", ".lab")
# Key an entry carries when its input line could not be read; the encoder turns it into an error row.
LINE_ERROR = "line_error"
# Key an entry carries when the manifest as a whole rejects it: "reason: detail", the error row's text as is.
ENTRY_ERROR = "entry_error"


class ManifestError(ValueError):
    pass


def _absolute(path: object, base: Path) -> object:
    if not isinstance(path, str) or not path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def normalise_jsonl_line(raw: bytes, line_no: int, base: Path) -> dict:
    """One input line -> one entry. Never raises: unreadable lines become entries with LINE_ERROR."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return {LINE_ERROR: f"line {line_no + 1} of the manifest is not UTF-8 ({exc.reason} at byte {exc.start}); "
                            "re-save the manifest as UTF-8"}
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as exc:
        return {LINE_ERROR: f"line {line_no + 1} of the manifest is not valid JSON ({exc.msg}); fix or remove it"}
    if not isinstance(entry, dict):
        return {LINE_ERROR: f"line {line_no + 1} of the manifest is not a JSON object"}
    for key in ("audio", "ref_audio"):
        if key in entry:
            entry[key] = _absolute(entry[key], base)
    return entry


def iter_jsonl(path: Path):
    base = path.parent.resolve()
    with open(path, "rb") as f:
        n = 0
        for raw in f:
            if raw.strip():
                yield normalise_jsonl_line(raw.rstrip(b"\r\n"), n, base)
            n += 1


def iter_directory(root: Path, ref_audio: str | None):
    """Audio files with a same-stem .txt/.lab transcript, in sorted (deterministic) order."""
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
        entry = {"id": str(path.relative_to(root).with_suffix("")), "audio": str(path.resolve())}
        transcript = next((path.with_suffix(s) for s in TRANSCRIPT_SUFFIXES if path.with_suffix(s).is_file()), None)
        if transcript is None:
            entry[LINE_ERROR] = f"{path}: no transcript; add {path.with_suffix('.txt').name} next to it"
        else:
            try:
                entry["text"] = transcript.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                entry[LINE_ERROR] = f"{transcript}: transcript is not UTF-8; re-save it as UTF-8"
        entry["ref_audio"] = str(Path(ref_audio).resolve()) if ref_audio else None
        yield entry


def input_fingerprint(source: Path, ref_audio: str | None = None) -> str:
    """A hash of what decides the rows: the manifest bytes, or a directory's names, sizes and mtimes."""
    h = hashlib.sha256()
    if source.is_dir():
        for p in sorted(source.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(source)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(f"ref={ref_audio}".encode())
    else:
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def write_normalised(source: Path, destination: Path, ref_audio: str | None = None) -> int:
    """Write manifest.jsonl atomically; returns the number of entries."""
    if not source.exists():
        raise ManifestError(f"manifest {source} does not exist; pass a JSONL file or a directory of audio")
    entries = iter_directory(source, ref_audio) if source.is_dir() else iter_jsonl(source)
    tmp = destination.with_name(destination.name + ".tmp")
    count = 0
    first_line_of_id: dict[str, int] = {}
    with open(tmp, "w", encoding="utf-8") as out:
        for entry in entries:
            if ref_audio and not entry.get("ref_audio") and LINE_ERROR not in entry:
                entry["ref_audio"] = str(Path(ref_audio).resolve())
            mark_duplicate_id(entry, count, first_line_of_id)
            out.write(json.dumps(entry, ensure_ascii=False) + "\n")
            count += 1
    if count == 0:
        tmp.unlink()
        raise ManifestError(f"manifest {source} holds no entries; nothing to encode")
    os.replace(tmp, destination)
    return count


def mark_duplicate_id(entry: dict, line: int, first_line_of_id: dict[str, int]) -> None:
    """A second line with an id already used becomes an error row: ids name rows downstream (export, training
    logs), and a repeated id is usually a line pasted twice."""
    entry_id = entry.get("id")
    if entry_id is None or LINE_ERROR in entry:
        return
    key = str(entry_id)
    first = first_line_of_id.setdefault(key, line)
    if first != line:
        entry[ENTRY_ERROR] = (f"duplicate_id: id {key[:80]!r} is already used by manifest line {first + 1}; "
                              "give every line its own id (or remove the repeated line)")


def read_range(manifest: Path, byte_start: int, byte_end: int) -> list[dict]:
    """The entries in [byte_start, byte_end) of a normalised manifest (one shard's rows)."""
    with open(manifest, "rb") as f:
        f.seek(byte_start)
        return parse_entries(f.read(byte_end - byte_start))


def parse_entries(data: bytes) -> list[dict]:
    """The entries in a byte range of a normalised manifest, one JSON object a line."""
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]
