"""A corpus that grows, end to end through the encode CLI: a manifest with lines appended encodes only the new
rows into new shards, the old shard files stay as they are, the result equals a clean encode of the final
manifest, and a follow-mode training stream that is mid-epoch when the corpus grows trains on every row once
per epoch. (The stream is training.data.stream.ShardStream read in this process on the real shards, not a torchrun
job: only there can the test hold the reader mid-epoch while the growth starts.)"""
import json
import threading
import time

import numpy as np

from shared import schema
from tests.conftest import (assert_rows_match, encode_args, heartbeats, repeated_corpus, run_encode,
                            write_manifest)
from tests.test_encode_job import read_rows
from tests.test_training_data import builder, ids_of, stream  # noqa: F401 (builder is a fixture)

SHARD_SIZE = 3


def shard_files(out):
    """Shard id -> (inode, mtime): a shard rewritten, even with the same bytes, changes them."""
    return {sid: (p.stat().st_ino, p.stat().st_mtime_ns) for sid, p in schema.published_shards(out).items()}


def results(out) -> dict[str, bytes]:
    """The job's result files (plan, manifest copy, summary, errors, _COMPLETE), not its lock or heartbeat."""
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name not in (".lock", "driver.json")}


def rows_encoded_since(out, started: float) -> int:
    """Rows the encoders of the run started at `started` encoded, from their heartbeats' own totals."""
    return sum(b["rows"] + b["rows_error"] for b in heartbeats(out).values() if b["started"] >= started)


def test_a_grown_manifest_encodes_only_its_new_rows(cycled_clips, tiny_codec_dir, builder, tmp_path):  # noqa: F811
    clips, expected = cycled_clips
    entries = repeated_corpus(clips, 25)
    manifest, out = tmp_path / "train_raw.jsonl", tmp_path / "encoded"
    args = encode_args(manifest, tiny_codec_dir, out, "--shard-size", str(SHARD_SIZE), "--progress-seconds", "60")

    def encode(lines: list[dict], *extra: str):
        write_manifest(manifest, lines)
        started = time.time()
        result = run_encode(*args, *extra)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result, rows_encoded_since(out, started)

    _, work = encode(entries[:20])
    assert work == 20 and len(schema.published_shards(out)) == 7  # the last shard holds 2 rows

    # A follow-mode reader (what training runs) takes its first step now, before the corpus grows.
    reader = stream(out, builder, follow=True, shards_per_round=2)
    epoch = reader.epoch_steps()
    seen = ids_of([next(epoch)])

    before = shard_files(out)
    grown, work = encode(entries[:22])  # +10 %
    assert "7 already published, 1 to encode" in grown.stdout and "grew by 2 rows" in grown.stdout
    assert work == 2
    after = shard_files(out)
    assert {sid: after[sid] for sid in before} == before and sorted(after) == list(range(8))

    # The second growth runs while the reader waits for it: the job removes _COMPLETE before its first new
    # shard, the reader then takes every new shard as it appears and ends its epoch at the new _COMPLETE.
    job_over = threading.Event()
    shards_when_incomplete = []  # the shards published when the reader first saw _COMPLETE gone

    def read_rest_of_epoch():
        while (out / schema.COMPLETE_MARKER).exists() and not job_over.is_set():
            time.sleep(0.02)
        if not job_over.is_set():
            shards_when_incomplete.extend(schema.published_shards(out))
        seen.extend(ids_of(epoch))

    follower = threading.Thread(target=read_rest_of_epoch, daemon=True)
    follower.start()
    before = shard_files(out)
    try:
        grown, work = encode(entries)
    finally:
        job_over.set()
        follower.join(timeout=300)
    assert "8 already published, 1 to encode" in grown.stdout and work == 3
    assert shards_when_incomplete == list(range(8)), "_COMPLETE was not removed before the new shard was encoded"
    after = shard_files(out)
    assert {sid: after[sid] for sid in before} == before and sorted(after) == list(range(9))
    plan = json.loads((out / schema.PLAN_FILE).read_text())
    assert [(g["rows_before"], g["rows_added"]) for g in plan["grown"]] == [(20, 2), (22, 3)]
    assert len(plan["encode_runs"]) == 3

    ids = sorted(e["id"] for e in entries)
    assert sorted(seen) == ids and reader.position.consumed == list(range(9))  # every row once, this epoch
    reader.next_epoch()
    assert sorted(ids_of(reader.epoch_steps())) == ids  # and the next

    # What a clean encode of the final manifest writes: every line once, in order, with its codes.
    assert_rows_match(out, entries, expected)
    grown_codes = {r["id"]: r["audio_codes"] for r in read_rows(out)}

    # A line edited in the middle is not growth: refused, naming both ways on, with nothing touched.
    edited = [*entries[:12], {**entries[12], "text": "an edited transcript"}, *entries[13:]]
    write_manifest(manifest, edited)
    files = results(out)
    refused = run_encode(*args)
    assert refused.returncode == 2, refused.stderr[-3000:]
    message = refused.stderr.strip().splitlines()[-1]
    assert "line 13 differs" in message and "append the new lines" in message and "--replan" in message
    assert results(out) == files
    assert shard_files(out) == after

    # --replan still starts over: the edited manifest in one run, the same codes per row id as the grown one.
    _, work = encode(edited, "--replan")
    assert work == 25
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [e["id"] for e in entries] and rows[12]["text"] == "an edited transcript"
    assert all(np.array_equal(r["audio_codes"], grown_codes[r["id"]]) for r in rows)
    aside = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and len(list((aside[0] / schema.SHARDS_DIR).glob("shard-*.parquet"))) == 9
