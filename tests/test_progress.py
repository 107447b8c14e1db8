import os
import time

import pytest

from services.status import progress as progress_module
from services.status.progress import collect_progress, format_progress_line


def test_missing_directory_is_empty(tmp_path):
    p = collect_progress(tmp_path / "does-not-exist")
    assert p["state"] == "empty"
    assert p["shards"] == {"total": 0, "done": 0, "running": 0, "failed": 0, "pending": 0}
    assert p["rows"] == {"planned": None, "ok": 0, "error": 0}
    assert p["eta_seconds"] is None and p["encoders"] == [] and p["nodes"] == {}


def test_planned_only(encode_output):
    encode_output.plan(num_shards=5)
    p = collect_progress(encode_output.root)
    assert p["state"] == "planned"
    assert p["shards"]["pending"] == 5 and p["rows"]["planned"] == 20


def test_complete_directory(encode_output):
    encode_output.plan(num_shards=2)
    encode_output.shard(0, errors=1, encode_seconds=2.0)
    encode_output.shard(1, encode_seconds=2.0)
    encode_output.heartbeat("encoder-0", age=3600)  # left over from the run, long dead
    encode_output.driver(state="finished")
    before_summary = collect_progress(encode_output.root)
    # no encoder alive and no summary yet: the speed shards were encoded at (8 rows, 14 audio-s in 4 s)
    assert before_summary["state"] == "stopped"
    assert before_summary["rate"] == {"rows_per_s": pytest.approx(2.0), "audio_seconds_per_s": pytest.approx(3.5)}
    encode_output.complete(elapsed_seconds=16.0)
    p = collect_progress(encode_output.root)
    assert p["state"] == "complete"
    assert p["shards"] == {"total": 2, "done": 2, "running": 0, "failed": 0, "pending": 0}
    assert p["rows"] == {"planned": 8, "ok": 7, "error": 1}
    assert p["audio_hours"] == pytest.approx(7 * 2.0 / 3600)
    # complete: over the job's wall time from summary.json
    assert p["rate"] == {"rows_per_s": pytest.approx(0.5), "audio_seconds_per_s": pytest.approx(14 / 16)}
    assert p["eta_seconds"] == 0
    assert p["encoders"][0]["alive"] is False and p["nodes"] == {"10.0.0.5": 0}


def test_running_eta_from_alive_encoders(encode_output):
    encode_output.plan(num_shards=10)  # 40 rows
    encode_output.shard(0)
    encode_output.shard(1, errors=2)
    encode_output.heartbeat("encoder-0", shard=2, rows_per_s=3.0, audio_seconds_per_s=6.0)
    encode_output.heartbeat("encoder-1", shard=3, rows_per_s=1.0, audio_seconds_per_s=2.0, node="10.0.0.6")
    encode_output.heartbeat("encoder-2", shard=4, rows_per_s=100.0, age=31)  # stale: not counted
    encode_output.driver(failed_shards={"5": "RuntimeError: boom", "3": "retried, now running"})
    p = collect_progress(encode_output.root)
    assert p["state"] == "running"
    assert p["shards"] == {"total": 10, "done": 2, "running": 2, "failed": 1, "pending": 5}
    assert p["rate"] == {"rows_per_s": 4.0, "audio_seconds_per_s": 8.0}
    assert p["eta_seconds"] == pytest.approx((40 - 8) / 4.0)
    assert p["nodes"] == {"10.0.0.5": 1, "10.0.0.6": 1}  # the stale encoder-2 is not counted
    assert [e["alive"] for e in p["encoders"]] == [True, True, False]
    line = format_progress_line(p)
    assert line.startswith("[running] shards 2/10 (2 running, 1 failed) rows 6 ok / 2 err")
    assert "4.0 rows/s, 8 audio-s/s, ETA 0:00:08" in line


def test_stale_job_is_stopped_without_eta(encode_output):
    encode_output.plan(num_shards=3)
    encode_output.shard(0)
    encode_output.heartbeat("encoder-0", shard=1, age=120)
    encode_output.driver(state="running", age=120)  # the driver died without saying so
    p = collect_progress(encode_output.root)
    assert p["state"] == "stopped"
    assert p["shards"]["running"] == 0 and p["shards"]["pending"] == 2
    assert p["eta_seconds"] is None
    assert "ETA ?" in format_progress_line(p)


def test_garbage_files_never_raise(encode_output):
    encode_output.root.joinpath("plan.json").write_text("{not json")
    encode_output.root.joinpath("driver.json").write_text("[1, 2]")
    encode_output.garbage_heartbeat("encoder-9")
    encode_output.write_json("workers/encoder-8.json", {"name": 5, "updated": "yesterday", "rows": None,
                                                        "shard": "x"})
    (encode_output.root / "shards").mkdir()
    (encode_output.root / "shards" / "shard-00007.parquet").write_bytes(b"not parquet")
    p = collect_progress(encode_output.root)
    assert p["state"] == "stopped"
    assert p["shards"]["done"] == 1 and p["rows"]["ok"] == 0
    assert p["encoders"] == [{"name": "encoder-8", "node": None, "node_id": None, "hostname": None, "device": None, "shard": None,
                              "rows": 0, "rows_error": 0, "rows_per_s": 0.0, "audio_seconds_per_s": 0.0,
                              "alive": False, "updated": None, "state": "stale"}]


def test_temporaries_and_unplanned_shards_do_not_count(encode_output):
    encode_output.plan(num_shards=2)
    encode_output.temporary_shard(0)
    encode_output.shard(7)  # outside the plan (e.g. left by an older plan)
    p = collect_progress(encode_output.root)
    assert p["shards"]["done"] == 0 and p["rows"]["ok"] == 0


def test_footer_stats_are_cached_until_the_file_changes(encode_output, monkeypatch):
    encode_output.plan(num_shards=2)
    path = encode_output.shard(0)
    reads = []
    real_read_stats = progress_module.read_stats
    monkeypatch.setattr(progress_module, "read_stats", lambda p: reads.append(p) or real_read_stats(p))
    collect_progress(encode_output.root)
    collect_progress(encode_output.root)
    assert len(reads) == 1
    encode_output.shard(0, errors=4)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # guarantee a new mtime on coarse clocks
    assert collect_progress(encode_output.root)["rows"]["error"] == 4
    assert len(reads) == 2
