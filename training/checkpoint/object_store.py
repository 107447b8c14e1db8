"""Checkpoints on an object store (checkpoint.dir=s3://bucket/prefix): DCP through its fsspec writer and reader.

An object store has no rename, so "a step-NNNNNN/ name means a complete checkpoint" becomes "a step-NNNNNN/
prefix that holds COMMIT_MARKER": rank 0 writes the marker once every rank has finished its DCP files and its
extra-rank file (DCP's own .metadata is written by rank 0 at the end of dcp.save). Every object is uploaded whole
(fsspec completes a multipart upload on close), so a crash mid-save leaves an uncommitted prefix that readers
ignore and the next save of that step overwrites. Retention deletes whole prefixes; best.json names the best
step (there is no RUN/best link; resolve_checkpoint reads best.json). Credentials and endpoint: the standard AWS
chain (AWS_ENDPOINT_URL for a non-AWS store), as for the encode output.
"""
from __future__ import annotations

import io
import json

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

COMMIT_MARKER = ".complete"


def is_remote(run_dir) -> bool:
    return isinstance(run_dir, str) and "://" in run_dir and not run_dir.startswith("file://")


def join(uri: str, *names: str) -> str:
    return "/".join([uri.rstrip("/"), *names])


def _fs(uri: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def complete_checkpoints(run_dir: str, step_re) -> dict[int, str]:
    fs, root = _fs(run_dir)
    fs.invalidate_cache()
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return {}
    found = {}
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        match = step_re.match(name)
        if match and fs.exists(f"{entry.rstrip('/')}/{COMMIT_MARKER}"):
            found[int(match.group(1))] = join(run_dir, name)
    return dict(sorted(found.items()))


def save(final: str, state: dict, rank_state: dict, files: dict[str, str]) -> None:
    """Collective. `final`: the step folder's URI; `state`: DCP's state dict; `rank_state`: this rank's own
    (torch.save'd); `files`: name -> text, written by the rank that passes them (rank 0) before the commit."""
    rank = dist.get_rank()
    fs, path = _fs(final)
    if rank == 0 and fs.exists(f"{path}/{COMMIT_MARKER}"):  # re-saving a step: uncommitted until rewritten
        fs.rm(f"{path}/{COMMIT_MARKER}")
    dist.barrier()
    dcp.save(state, storage_writer=FsspecWriter(final, sync_files=False))
    buffer = io.BytesIO()
    torch.save(rank_state, buffer)
    fs.pipe(f"{path}/extra-rank{rank:05d}.pt", buffer.getvalue())
    for name, text in files.items():
        fs.pipe(f"{path}/{name}", text.encode())
    dist.barrier()
    if rank == 0:
        fs.pipe(f"{path}/{COMMIT_MARKER}", b"{}")


def remove(step_dir: str) -> None:
    fs, path = _fs(step_dir)
    fs.rm(path, recursive=True)


def read_json(uri: str) -> dict | None:
    fs, path = _fs(uri)
    try:
        return json.loads(fs.cat(path))
    except FileNotFoundError:
        return None


def read_text(uri: str) -> str | None:
    fs, path = _fs(uri)
    try:
        return fs.cat(path).decode()
    except FileNotFoundError:
        return None


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = _fs(uri)
    fs.pipe(path, data)


def write_json(uri: str, value: dict) -> None:
    fs, path = _fs(uri)
    fs.pipe(path, json.dumps(value).encode())  # one PutObject: replaced whole


def is_complete(step_dir: str) -> bool:
    fs, path = _fs(step_dir)
    return fs.exists(f"{path}/{COMMIT_MARKER}") and fs.exists(f"{path}/.metadata")


def load(step_dir: str, state: dict, no_dist: bool = False) -> None:
    dcp.load(state, storage_reader=FsspecReader(step_dir), no_dist=no_dist)


def load_extra(step_dir: str, rank: int) -> dict | None:
    fs, path = _fs(step_dir)
    try:
        data = fs.cat(f"{path}/extra-rank{rank:05d}.pt")
    except FileNotFoundError:
        return None
    return torch.load(io.BytesIO(data), weights_only=False)
