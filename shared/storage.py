"""Where shard files live: a plain path (the OS, on a filesystem every node mounts) or a URI that pyarrow.fs
opens (file://, s3://, gs://, hdfs://, ...).

Only the shard files go through URIs: ShardWriter writes them and shared.schema.published_shards lists them.
The encode driver needs a path for the rest of the output directory (the fcntl lock, plan, manifest and
heartbeats), so its --output takes a path or a file:// URI (see docs/design.md, "Storage").
"""
from __future__ import annotations

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
