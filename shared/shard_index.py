"""OUTPUT/shard_index.json: per published shard, the figures training needs before its first step (its speakers
and their references, languages, trainable rows and frames), so that start-up reads one file, not every shard.

The index is a cache of what the shards hold, never the truth: each entry names the file it was read from by
name, size and modification time, and `reconcile` checks it against the published listing; a shard published
but missing from the index, or re-published since (another size or time), is read again, and entries of shards
no longer published are dropped. The encode driver (the directory's one writer while it runs) adds each shard's
entry as it is published and rewrites the file atomically; an output written before the index existed gets one
from the first reader that can write it (see training.data.corpus_index).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared import schema
from shared.schema import ShardFile, ShardRow
from shared.storage import child, read_bytes, write_atomic

# 2: rows without a reference counted apart (unreferenced_rows/frames); 3: each speaker's languages
INDEX_VERSION = 3
# The columns an entry is made from: all light (no codes).
LIGHT_COLUMNS = ["speaker", "language", "ref_audio", "num_frames", "error"]


@dataclass
class SpeakerFigures:
    """One `speaker` value's trainable rows in one shard; its good rows with frames but no ref_audio apart (only a
    run that needs no reference trains them)."""
    speaker: str | None  # as stored in the shard (null: the unnamed speaker)
    references: list[str]  # its distinct ref_audio values, sorted
    rows: int
    frames: int
    unreferenced_rows: int = 0
    unreferenced_frames: int = 0
    # the `language` values of all those rows, as stored (null: a row without one), so the dialect checks
    # (a dialect speaker's rows must all carry its dialect) need no shard read
    languages: list[str | None] = field(default_factory=list)


@dataclass
class IndexEntry:
    name: str  # the file's name under shards/
    size: int
    mtime_ns: int
    rows: int  # every row, error rows included
    speakers: list[SpeakerFigures] = field(default_factory=list)  # of good rows with frames, by speaker value
    languages: list[str] = field(default_factory=list)  # of good rows with frames, sorted

    @property
    def rows_trainable(self) -> int:
        return sum(s.rows for s in self.speakers)

    @property
    def frames_trainable(self) -> int:
        return sum(s.frames for s in self.speakers)

    def figures(self, needs_reference: bool = True) -> tuple[int, int]:
        """(rows, frames) a run trains on: with a reference, or with and without one when it needs none."""
        if needs_reference:
            return self.rows_trainable, self.frames_trainable
        return (self.rows_trainable + sum(s.unreferenced_rows for s in self.speakers),
                self.frames_trainable + sum(s.unreferenced_frames for s in self.speakers))

    def describes(self, file: ShardFile) -> bool:
        """True when this entry was read from this very publication of the file."""
        return (self.name, self.size, self.mtime_ns) == (file.name, file.size, file.mtime_ns)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "IndexEntry":
        return cls(d["name"], int(d["size"]), int(d["mtime_ns"]), int(d["rows"]),
                   [SpeakerFigures(s["speaker"], list(s["references"]), int(s["rows"]), int(s["frames"]),
                                   int(s["unreferenced_rows"]), int(s["unreferenced_frames"]),
                                   list(s["languages"]))
                    for s in d["speakers"]], list(d["languages"]))


def entry_of(file: ShardFile, rows: list[ShardRow]) -> IndexEntry:
    """The entry of a shard from its rows (the LIGHT_COLUMNS of them suffice)."""
    speakers: dict[str | None, SpeakerFigures] = {}
    languages, speaker_languages = set(), {}
    for row in rows:
        if not row.trains(needs_reference=False):
            continue
        figures = speakers.setdefault(row.speaker, SpeakerFigures(row.speaker, [], 0, 0))
        if row.ref_audio:
            figures.references.append(row.ref_audio)
            figures.rows += 1
            figures.frames += row.num_frames
        else:
            figures.unreferenced_rows += 1
            figures.unreferenced_frames += row.num_frames
        speaker_languages.setdefault(row.speaker, set()).add(row.language)
        if row.language:
            languages.add(row.language)
    for figures in speakers.values():
        figures.references = sorted(set(figures.references))
        figures.languages = sorted(speaker_languages[figures.speaker], key=lambda v: (v is not None, v or ""))
    ordered = sorted(speakers.values(), key=lambda s: (s.speaker is not None, s.speaker or ""))
    return IndexEntry(file.name, file.size, file.mtime_ns, len(rows), ordered, sorted(languages))


def read_entry(file: ShardFile) -> IndexEntry:
    return entry_of(file, schema.read_rows(file.path, LIGHT_COLUMNS))


class ShardIndex:
    """Entries by file name. `load` and `save` go through shared.storage, so the file may sit under a URI."""

    def __init__(self, entries: dict[str, IndexEntry] | None = None):
        self.entries: dict[str, IndexEntry] = dict(entries or {})

    @classmethod
    def load(cls, location: str | Path) -> "ShardIndex":
        """The index at `location`; empty when there is none or it cannot be used (another version, damaged):
        it is only a cache, so the shards are read instead."""
        try:
            data = read_bytes(location)
            if data is None:
                return cls()
            document = json.loads(data)
            if document.get("version") != INDEX_VERSION:
                return cls()
            return cls({e["name"]: IndexEntry.from_json(e) for e in document["shards"]})
        except (OSError, ValueError, KeyError, TypeError):
            return cls()

    def save(self, location: str | Path) -> None:
        document = {"version": INDEX_VERSION,
                    "shards": [self.entries[name].to_json() for name in sorted(self.entries)]}
        write_atomic(location, json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode())

    def add(self, entry: IndexEntry) -> None:
        self.entries[entry.name] = entry

    def entry(self, shard_id: int) -> IndexEntry | None:
        return self.entries.get(schema.shard_name(shard_id))

    def reconcile(self, files: dict[int, ShardFile], *fallbacks: "ShardIndex") -> list[str]:
        """Make the index describe exactly the published `files`: entries of other files are dropped, and a file
        without an entry that describes it takes one from the first fallback that has it, or is read. Returns
        the names of the files read."""
        current, read = {}, []
        for file in files.values():
            candidates = [self.entries.get(file.name)] + [f.entries.get(file.name) for f in fallbacks]
            entry = next((e for e in candidates if e is not None and e.describes(file)), None)
            if entry is None:
                entry = read_entry(file)
                read.append(file.name)
            current[file.name] = entry
        self.entries = current
        return read

    def __eq__(self, other) -> bool:
        return isinstance(other, ShardIndex) and self.entries == other.entries


def current_index(output: str | Path) -> ShardIndex:
    """The output's index checked against its published shards (those it lacks read), without writing it."""
    index = ShardIndex.load(index_location(output))
    index.reconcile(schema.published_shard_files(output))
    return index


def index_location(output: str | Path) -> str | Path:
    return child(output, schema.INDEX_FILE)
