"""Publishing shards atomically: a reader sees a whole shard under its final name or nothing.

`output` is a plain path (written through the OS, fsynced before the rename) or a URI that pyarrow.fs opens
(written through it; see shared.storage). A shard that cannot be stored raises OutputWriteError, whose
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
from shared.storage import is_uri

TEMPORARY_GLOB = ".shard-*.tmp-*"
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
    def __init__(self, output: str | Path, filesystem: pafs.FileSystem | None = None):
        """`filesystem`: write through this pyarrow filesystem, `output` being a path inside it."""
        if filesystem is None and is_uri(output):
            filesystem, output = pafs.FileSystem.from_uri(output)
        self.filesystem = filesystem
        self.directory: Path | str = (Path(output) / SHARDS_DIR if filesystem is None
                                      else f"{str(output).rstrip('/')}/{SHARDS_DIR}")
        try:
            if filesystem is None:
                self.directory.mkdir(parents=True, exist_ok=True)
            else:
                filesystem.create_dir(self.directory, recursive=True)
        except OSError as exc:
            raise write_failure(self.directory, exc) from exc

    def path_of(self, shard_id: int) -> Path | str:
        if self.filesystem is None:
            return self.directory / shard_name(shard_id)
        return f"{self.directory}/{shard_name(shard_id)}"

    def publish(self, shard_id: int, rows: list[ShardRow], stats: ShardStats) -> Path | str:
        """Write under a hidden temporary name, then rename into place.

        A retried shard rewrites identical rows under the same name, so a shard can never hold a
        row twice and two shards never share a row. On failure the temporary file is removed and
        any previously published shard is left untouched.
        """
        table = build_table(sorted(rows, key=lambda r: r.index), stats)
        final = self.path_of(shard_id)
        temporary = f".{shard_name(shard_id)}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            if self.filesystem is None:
                self._publish_local(table, self.directory / temporary, final)
            else:
                self._publish_fs(table, f"{self.directory}/{temporary}", final)
        except OSError as exc:
            raise write_failure(self.directory, exc) from exc
        return final

    @staticmethod
    def _publish_local(table, tmp: Path, final: Path) -> None:
        try:
            with open(tmp, "wb") as f:
                pq.write_table(table, f, compression="zstd")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # read-only now: the driver removes it on the next run; report the first error
            raise

    def _publish_fs(self, table, tmp: str, final: str) -> None:
        # On an object store `move` is a copy then a delete: readers still only ever see a whole object
        # under the final name, because an object appears at once when its upload completes.
        try:
            with self.filesystem.open_output_stream(tmp) as f:
                pq.write_table(table, f, compression="zstd")
            self.filesystem.move(tmp, final)
        except BaseException:
            try:
                self.filesystem.delete_file(tmp)
            except OSError:
                pass
            raise

    def check_writable(self) -> None:
        """Create and delete a small file where shards go; raises OutputWriteError if that fails."""
        probe = f".shard-probe.tmp-{uuid.uuid4().hex[:8]}"
        try:
            if self.filesystem is None:
                (self.directory / probe).write_bytes(b"probe")
                (self.directory / probe).unlink()
            else:
                with self.filesystem.open_output_stream(f"{self.directory}/{probe}") as f:
                    f.write(b"probe")
                self.filesystem.delete_file(f"{self.directory}/{probe}")
        except OSError as exc:
            raise write_failure(self.directory, exc) from exc

    def remove_temporaries(self) -> list[str]:
        """Delete the temporaries of writers that were killed mid-shard. Only safe while no encoder writes
        to this output: the driver calls it holding the output's lock, before it starts any encoder."""
        if self.filesystem is None:
            names = [p.name for p in self.directory.glob(TEMPORARY_GLOB)]
            for name in names:
                (self.directory / name).unlink(missing_ok=True)
            return names
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.directory, allow_not_found=True))
        names = [i.base_name for i in infos if Path(i.base_name).match(TEMPORARY_GLOB)]
        for name in names:
            self.filesystem.delete_file(f"{self.directory}/{name}")
        return names
