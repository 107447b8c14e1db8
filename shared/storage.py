"""Where shard files live: a plain path (the OS, on a filesystem every node mounts) or a URI that pyarrow.fs
opens (file://, s3://, gs://, hdfs://, ...).

Only the shard files go through URIs: ShardWriter writes them and shared.schema.published_shards lists them.
The encode driver needs a path for the rest of the output directory (the fcntl lock, plan, manifest and
heartbeats), so its --output takes a path or a file:// URI (see docs/design.md, "Storage").
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(output) -> bool:
    return isinstance(output, str) and "://" in output


def local_path(output: str | Path) -> Path | None:
    """The local path a plain path or file:// URI names; None for a URI of any other filesystem."""
    if not is_uri(output):
        return Path(output)
    filesystem, path = pafs.FileSystem.from_uri(output)  # also undoes %-escapes
    return Path(path) if isinstance(filesystem, pafs.LocalFileSystem) else None


def child_uri(output: str, *names: str) -> str:
    """The URI of a file under the directory URI `output` (a query such as ?region=... stays at the end)."""
    base, separator, query = output.partition("?")
    return "/".join([base.rstrip("/"), *names]) + separator + query


def child(output: str | Path, *names: str) -> str | Path:
    """A file under the output directory, a path or a URI as `output` is."""
    return child_uri(output, *names) if is_uri(output) else Path(output).joinpath(*names)


def read_bytes(location: str | Path) -> bytes | None:
    """A small file's content; None when it does not exist."""
    try:
        if is_uri(location):
            filesystem, path = pafs.FileSystem.from_uri(location)
            with filesystem.open_input_stream(path) as f:
                return f.read()
        return Path(location).read_bytes()
    except FileNotFoundError:
        return None


def write_atomic(location: str | Path, data: bytes) -> None:
    """Replace a small file whole: written under a temporary name beside it, then renamed over it, so a reader
    sees the old content or the new, never a part. (On an object store the move is a copy: an object still
    appears whole.)"""
    temporary_name = f".{_base_name(location)}.tmp-{uuid.uuid4().hex[:8]}"
    if is_uri(location):
        filesystem, path = pafs.FileSystem.from_uri(location)
        temporary = f"{path.rsplit('/', 1)[0]}/{temporary_name}"
        with filesystem.open_output_stream(temporary) as f:
            f.write(data)
        filesystem.move(temporary, path)
        return
    target = Path(location)
    temporary = target.with_name(temporary_name)
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _base_name(location: str | Path) -> str:
    return location.partition("?")[0].rstrip("/").rsplit("/", 1)[-1] if is_uri(location) else Path(location).name
