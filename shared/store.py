"""Every file operation on an encode output goes through a Store: a local directory (LocalStore), a prefix of an
S3-compatible bucket (shared.s3_store.S3Store), or any other pyarrow filesystem (PyarrowStore, shards only).

Names are relative to the output root and use "/" (e.g. "shards/shard-00000.parquet"). What each store
guarantees, and the commit protocol built on them, is in docs/design.md ("Storage").
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import pyarrow.fs as pafs

from shared.storage import child_uri, is_uri

HASH_BLOCK = 8 << 20


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    mtime: float  # seconds since the epoch: when the file or object was last written
    tag: str  # changes whenever the content is replaced (an ETag, or mtime and size)


class Store:
    """The operations the encode driver, its encoders and the status readers need; subclasses implement them."""

    root: str  # for messages: the path or URI of the output

    # --- subclass API -------------------------------------------------------------------------------------------
    def location(self, name: str = "") -> str | Path:
        """What a reader opens (a local Path, or a URI pyarrow.fs opens)."""
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        """Raises FileNotFoundError when absent."""
        raise NotImplementedError

    def read_range(self, name: str, start: int, end: int) -> bytes:
        raise NotImplementedError

    def info(self, name: str) -> ObjectInfo | None:
        raise NotImplementedError

    def listing(self, directory: str) -> dict[str, ObjectInfo]:
        """Base name -> info of the files directly under `directory` ({} when there is none)."""
        raise NotImplementedError

    def write_bytes(self, name: str, data: bytes) -> None:
        """Replace `name` whole: a reader sees the old content or the new, never a mix."""
        raise NotImplementedError

    def create_new(self, name: str, data: bytes) -> bool:
        """Create `name` only if it does not exist; False (nothing written) when it does."""
        raise NotImplementedError

    def publish(self, name: str, fill: Callable[[BinaryIO], None]) -> ObjectInfo:
        """`fill` writes the file; it appears under `name` only once complete, and not at all if `fill` or the
        upload fails. A file that was there before stays until the new one replaces it whole."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Delete a file (absent is fine)."""
        raise NotImplementedError

    def discard_unfinished(self, directory: str) -> list[str]:
        """Remove what writers killed mid-publish left under `directory`; returns what was removed."""
        raise NotImplementedError

    def move(self, name: str, new_name: str) -> None:
        """Move a file or a whole directory (all names under it) to `new_name`."""
        raise NotImplementedError

    # --- shared helpers -----------------------------------------------------------------------------------------
    def scratch_directory(self) -> str | None:
        """Where to build a file before publish_file (None: the system's temporary directory)."""
        return None

    def publish_file(self, name: str, path: Path) -> ObjectInfo:
        """Publish a local file built beforehand under `name` (see publish)."""
        def copy(target: BinaryIO) -> None:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(HASH_BLOCK), b""):
                    target.write(block)
        return self.publish(name, copy)

    def exists(self, name: str) -> bool:
        return self.info(name) is not None

    def read_json(self, name: str) -> dict | None:
        """The JSON object in `name`, or None when it is absent, half-written or not an object."""
        try:
            value = json.loads(self.read_bytes(name).decode("utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def write_json(self, name: str, data: dict) -> None:
        self.write_bytes(name, json.dumps(data, indent=1, ensure_ascii=False).encode())

    def sha256(self, name: str) -> str:
        """Checksum of a file's bytes, read in blocks (a whole shard is never held in memory)."""
        info = self.info(name)
        if info is None:
            raise FileNotFoundError(f"{self.location(name)}: no such file")
        digest = hashlib.sha256()
        for start in range(0, info.size, HASH_BLOCK):
            digest.update(self.read_range(name, start, min(info.size, start + HASH_BLOCK)))
        return digest.hexdigest()


class LocalStore(Store):
    """A directory on a filesystem every node mounts: atomic renames, fsync before publishing, O_EXCL links."""

    def __init__(self, root: str | Path):
        self.path = Path(root).resolve()
        self.root = str(self.path)

    def location(self, name: str = "") -> Path:
        return self.path / name if name else self.path

    def read_bytes(self, name: str) -> bytes:
        return self.location(name).read_bytes()

    def scratch_directory(self) -> str:
        self.path.mkdir(parents=True, exist_ok=True)
        return str(self.path)  # the same filesystem: publish_file is then a rename

    def publish_file(self, name: str, path: Path) -> ObjectInfo:
        try:
            os.replace(path, self.location(name))
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            return super().publish_file(name, path)
        return self.info(name)

    def read_range(self, name: str, start: int, end: int) -> bytes:
        with open(self.location(name), "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def info(self, name: str) -> ObjectInfo | None:
        try:
            st = self.location(name).stat()
        except OSError:
            return None
        return ObjectInfo(st.st_size, st.st_mtime, f"{st.st_mtime_ns}-{st.st_size}")

    def listing(self, directory: str) -> dict[str, ObjectInfo]:
        found = {}
        try:
            entries = list(os.scandir(self.location(directory)))
        except OSError:
            return {}
        for entry in entries:
            try:
                if entry.is_file():
                    st = entry.stat()
                    found[entry.name] = ObjectInfo(st.st_size, st.st_mtime, f"{st.st_mtime_ns}-{st.st_size}")
            except OSError:
                continue  # vanished between the scan and the stat
        return found

    def _temporary(self, name: str) -> Path:
        final = self.location(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")

    def write_bytes(self, name: str, data: bytes) -> None:
        tmp = self._temporary(name)
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.location(name))
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def create_new(self, name: str, data: bytes) -> bool:
        tmp = self._temporary(name)
        try:
            tmp.write_bytes(data)
            os.link(tmp, self.location(name))  # fails if the name exists: create-if-absent, whole
            return True
        except FileExistsError:
            return False
        finally:
            _unlink_quietly(tmp)

    def publish(self, name: str, fill: Callable[[BinaryIO], None]) -> ObjectInfo:
        tmp = self._temporary(name)
        try:
            with open(tmp, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.location(name))
        except BaseException:
            _unlink_quietly(tmp)  # read-only now: discard_unfinished removes it on the next run
            raise
        return self.info(name)

    def delete(self, name: str) -> None:
        self.location(name).unlink(missing_ok=True)

    def discard_unfinished(self, directory: str) -> list[str]:
        names = [p.name for p in self.location(directory).glob(".*.tmp-*")]
        for name in names:
            (self.location(directory) / name).unlink(missing_ok=True)
        return names

    def move(self, name: str, new_name: str) -> None:
        self.location(new_name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.location(name), self.location(new_name))


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


class PyarrowStore(Store):
    """Shards through any pyarrow filesystem (gs://, hdfs://, ...): written under a temporary name, then moved.
    No conditional create or lease, so the driver does not run on one (see docs/design.md)."""

    def __init__(self, filesystem: pafs.FileSystem, path: str, uri: str | None = None):
        self.filesystem, self.path = filesystem, path.rstrip("/")
        self.uri = uri
        self.root = uri or self.path

    def _path(self, name: str) -> str:
        return f"{self.path}/{name}" if name else self.path

    def location(self, name: str = "") -> str:
        if self.uri is None:
            return self._path(name)
        return child_uri(self.uri, name) if name else self.uri

    def read_bytes(self, name: str) -> bytes:
        with self.filesystem.open_input_stream(self._path(name)) as f:
            return f.read()

    def read_range(self, name: str, start: int, end: int) -> bytes:
        with self.filesystem.open_input_file(self._path(name)) as f:
            return f.read_at(end - start, start)

    def info(self, name: str) -> ObjectInfo | None:
        entry = self.filesystem.get_file_info(self._path(name))
        return _pyarrow_info(entry) if entry.type == pafs.FileType.File else None

    def listing(self, directory: str) -> dict[str, ObjectInfo]:
        selector = pafs.FileSelector(self._path(directory), allow_not_found=True)
        return {e.base_name: _pyarrow_info(e) for e in self.filesystem.get_file_info(selector)
                if e.type == pafs.FileType.File}

    def write_bytes(self, name: str, data: bytes) -> None:
        self.publish(name, lambda f: f.write(data))

    def publish(self, name: str, fill: Callable[[BinaryIO], None]) -> ObjectInfo:
        directory, _, base = self._path(name).rpartition("/")
        self.filesystem.create_dir(directory, recursive=True)
        tmp = f"{directory}/.{base}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with self.filesystem.open_output_stream(tmp) as f:
                fill(f)
            self.filesystem.move(tmp, self._path(name))
        except BaseException:
            try:
                self.filesystem.delete_file(tmp)
            except OSError:
                pass
            raise
        return self.info(name)

    def delete(self, name: str) -> None:
        try:
            self.filesystem.delete_file(self._path(name))
        except FileNotFoundError:
            pass

    def discard_unfinished(self, directory: str) -> list[str]:
        names = [n for n in self.listing(directory) if n.startswith(".") and ".tmp-" in n]
        for name in names:
            self.delete(f"{directory}/{name}")
        return names

    def move(self, name: str, new_name: str) -> None:
        self.filesystem.move(self._path(name), self._path(new_name))


def _pyarrow_info(entry: pafs.FileInfo) -> ObjectInfo:
    mtime = entry.mtime.timestamp() if entry.mtime is not None else time.time()
    return ObjectInfo(entry.size or 0, mtime, f"{mtime}-{entry.size}")


def is_s3_uri(output) -> bool:
    return isinstance(output, str) and output.lower().startswith("s3://")


def open_store(output: str | Path, filesystem: pafs.FileSystem | None = None) -> Store:
    """The store for `output`: a path or file:// URI, an s3:// URI, or (shards only) any URI pyarrow.fs opens;
    with `filesystem`, `output` is a path inside that pyarrow filesystem."""
    if isinstance(output, Store):
        return output
    if filesystem is not None:
        return PyarrowStore(filesystem, str(output))
    if is_s3_uri(output):
        from shared.s3_store import S3Store

        return S3Store.from_uri(output)
    if is_uri(output):
        filesystem, path = pafs.FileSystem.from_uri(output)
        if isinstance(filesystem, pafs.LocalFileSystem):
            return LocalStore(path)
        return PyarrowStore(filesystem, path, output)
    return LocalStore(output)
