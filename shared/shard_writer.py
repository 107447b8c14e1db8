"""Publishing shards atomically: a reader sees a whole shard under its final name or nothing.

`output` is a plain path (written through the OS, fsynced before the rename), an s3:// URI (one multipart upload)
or another URI that pyarrow.fs opens (written, then moved); see shared.store. A shard that cannot be stored raises OutputWriteError, whose
message names the directory and the fix.
"""
from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from shared.schema import SHARDS_DIR, ShardRow, ShardStats, build_table, shard_name
from shared.store import Store, open_store

# What to do about the storage errors a writer meets; anything else gets the generic fix.
FIX_FOR_ERRNO = {
    errno.EROFS: "make it writable", errno.EACCES: "make it writable", errno.EPERM: "make it writable",
    errno.ENOSPC: "free space there (or use another --output)", errno.EDQUOT: "free space there (or raise the quota)",
    errno.EFBIG: "raise the file size limit (ulimit -f)",
}


class OutputWriteError(OSError):
    """A shard could not be stored. The storage is at fault, not the shard: retrying elsewhere cannot help,
    and re-running the same command once the storage is fixed finishes the job (published shards are kept)."""


def write_failure(target: str | Path, exc: OSError) -> OutputWriteError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc).strip().splitlines()[0]
    fix = FIX_FOR_ERRNO.get(exc.errno, "fix the storage")
    return OutputWriteError(f"cannot write {target}: {reason}; {fix} and re-run the same command")


def is_own_file(filename, store: Store) -> bool:
    """Whether an OSError's file is under the output (a path, or a location of the object store)."""
    if not filename:
        return False
    if "://" in str(filename):
        return str(filename).startswith(str(store.location()))
    return Path(filename).resolve().is_relative_to(Path(store.root))


OUTPUT_FIX = "pass a directory you can write to (it is created if missing)"


def local_output_problem(path: Path) -> str | None:
    """Why nothing can be written under the local directory `path`, as "cause; fix" (None when it can). Checked
    by doing it: create what is missing and a probe file in it, then remove both, so nothing is left behind
    (permission bits say little when the job runs as root, and /proc or /sys refuse whatever the bits say)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under {existing}, a file, not a directory"
        return f"{where}; {OUTPUT_FIX}"
    missing = []  # the directories to create, deepest first
    while path != existing and path not in missing:
        missing.append(path)
        path = path.parent
    step = ""
    try:
        for directory in reversed(missing):
            step = f"create a directory in {directory.parent}"
            directory.mkdir()
        step = "write a file in it"
        probe = (missing[0] if missing else existing) / f".output-probe.tmp-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as exc:
        fix = FIX_FOR_ERRNO.get(exc.errno)
        return f"cannot {step} ({exc.strerror or exc}); {f'{fix} or ' if fix else ''}{OUTPUT_FIX}"
    finally:
        for directory in missing:
            try:
                directory.rmdir()
            except OSError:
                pass
    return None


class ShardWriter:
    def __init__(self, output: str | Path | Store, filesystem: pafs.FileSystem | None = None):
        """`output`: a path, a URI (shared.store.open_store) or a Store; `filesystem`: write through this pyarrow
        filesystem, `output` being a path inside it."""
        self.store = open_store(output, filesystem)
        self.directory = self.store.location(SHARDS_DIR)

    def path_of(self, shard_id: int) -> Path | str:
        return self.store.location(f"{SHARDS_DIR}/{shard_name(shard_id)}")

    def publish(self, shard_id: int, rows: list[ShardRow], stats: ShardStats) -> Path | str:
        """Publish the shard whole: a hidden temporary renamed into place (a path), or one multipart upload
        completed only once every byte is in (an object store; aborted on failure).

        A retried shard rewrites identical rows under the same name, so a shard can never hold a
        row twice and two shards never share a row. On failure nothing appears and any previously
        published shard is left untouched.
        """
        table = build_table(sorted(rows, key=lambda r: r.index), stats)
        try:
            self.store.publish(f"{SHARDS_DIR}/{shard_name(shard_id)}",
                               lambda f: pq.write_table(table, f, compression="zstd"))
        except OSError as exc:
            raise write_failure(self.directory, exc) from exc
        return self.path_of(shard_id)

    def check_writable(self) -> None:
        """Create and delete a small file where shards go; raises OutputWriteError if that fails."""
        probe = f"{SHARDS_DIR}/.shard-probe.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.store.write_bytes(probe, b"probe")
            self.store.delete(probe)
        except OSError as exc:
            raise write_failure(self.directory, exc) from exc

    def remove_temporaries(self) -> list[str]:
        """Remove what writers killed mid-shard left (temporary files, unfinished uploads). Only safe while no
        encoder writes to this output: the driver calls it holding the output's lock or lease, before it starts
        any encoder and after they stop."""
        return self.store.discard_unfinished(SHARDS_DIR)
