"""The page's and /metrics' view of a job (services.status.dashboard, services.status.page, services.status.metrics) over output
directories written file by file (real Parquet shards, heartbeats, driver.json), served over real HTTP:
stale encoders, failed shards, throughput over time, and error rows that must show only an id and a code."""
import os
import re
import time

import httpx
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.status.dashboard import collect_dashboard
from services.status.metrics import job_metrics
from services.status.page import render_page
from services.status.progress import collect_progress
from services.status.shard_details import ID_SHOWN_CHARS, ShardDetailsCache
from services.status.server import start_status_server
from shared import schema
from tests.test_status import running_job  # noqa: F401 (fixture)

SENTINEL = "sentinel-path-9d2e"


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """/metrics parsed by prometheus_client's own parser: family name -> {label values: value}."""
    families = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        families[family.name] = {tuple(sorted(s.labels.items())): s.value for s in family.samples}
    return families


def test_page_marks_stale_encoders_failed_shards_and_nodes(encode_output):
    encode_output.plan(num_shards=6)
    encode_output.shard(0)
    encode_output.heartbeat("encoder-0", shard=1, rows_per_s=2.0, audio_seconds_per_s=4.0)
    encode_output.heartbeat("encoder-1", shard=2, rows_per_s=3.0, node="10.0.0.6")
    encode_output.heartbeat("encoder-2", shard=3, age=600, node="10.0.0.6")
    encode_output.driver(failed_shards={"4": "RuntimeError: boom"})
    with start_status_server(encode_output.root, "127.0.0.1", 0) as server:
        page = httpx.get(f"{server.url}/").text
        metrics = scrape(server.url)
    stale_rows = [row for row in page.split("<tr") if 'class="stale"' in row]
    assert len(stale_rows) == 1 and "encoder-2" in stale_rows[0] and "stale</span>" in stale_rows[0]
    assert re.search(r">0:10:0\d<", stale_rows[0])  # its heartbeat's age
    assert "1 / 6 shards done" in page and "2 running" in page and "1 failed" in page and "2 pending" in page
    assert "<td>10.0.0.6</td><td class=\"num\">1 / 2</td>" in page  # per node: alive / all encoders
    assert "RuntimeError" not in page  # a failed shard's reason can carry paths; only the count is shown
    shards = metrics["qwen3tts_encode_shards"]
    assert shards[(("state", "failed"),)] == 1 and shards[(("state", "done"),)] == 1
    alive = metrics["qwen3tts_encode_encoder_alive"]
    assert alive[(("encoder", "encoder-2"), ("node", "10.0.0.6"))] == 0
    assert alive[(("encoder", "encoder-0"), ("node", "10.0.0.5"))] == 1
    age = metrics["qwen3tts_encode_encoder_heartbeat_age_seconds"][(("encoder", "encoder-2"), ("node", "10.0.0.6"))]
    assert 599 <= age <= 620
    assert metrics["qwen3tts_encode_rows_per_second"][()] == 5.0  # the stale encoder is not counted


def test_metrics_follow_the_directory_between_scrapes(running_job):
    with start_status_server(running_job.root, "127.0.0.1", 0) as server:
        before = scrape(server.url)
        running_job.shard(2)
        after = scrape(server.url)
    assert before["qwen3tts_encode_shards"][(("state", "done"),)] == 2
    assert after["qwen3tts_encode_shards"][(("state", "done"),)] == 3
    assert after["qwen3tts_encode_rows"][(("result", "ok"),)] == before["qwen3tts_encode_rows"][(("result", "ok"),)] + 4


def test_metrics_tolerate_progress_without_a_failed_count(running_job):
    progress = collect_progress(running_job.root)
    del progress["shards"]["failed"]  # a driver.json (or progress) that does not report failures
    (shards,) = [f for f in job_metrics(progress, {}) if f.name == "qwen3tts_encode_shards"]
    assert {s.labels["state"] for s in shards.samples} == {"done", "running", "pending"}


def test_retries_and_lost_encoders_show_when_the_driver_reports_them(running_job):
    progress = collect_progress(running_job.root)
    progress["faults"] = {"shard_retries": 3, "encoders_lost": 1}  # what driver.json carries once it counts them
    families = {f.name: f for f in job_metrics(progress, {})}
    assert families["qwen3tts_encode_shard_retries"].samples[0].value == 3
    assert families["qwen3tts_encode_encoders_lost"].samples[0].value == 1
    page = render_page(collect_dashboard(running_job.root, progress, ShardDetailsCache()))
    assert "3 attempts retried" in page and "1 encoders lost and replaced" in page
    del progress["faults"]
    assert not {"qwen3tts_encode_shard_retries", "qwen3tts_encode_encoders_lost"} & {
        f.name for f in job_metrics(progress, {})}


def test_throughput_spreads_each_shard_over_its_encode_time(encode_output):
    encode_output.plan(num_shards=4)
    now = time.time()
    for shard, (published, seconds) in enumerate([(now - 400, 100.0), (now - 300, 100.0), (now - 100, 50.0)]):
        path = encode_output.shard(shard, encode_seconds=seconds)
        os.utime(path, (published, published))
    encode_output.heartbeat("encoder-0", shard=3, rows_per_s=0.5, audio_seconds_per_s=1.0)
    encode_output.driver()
    progress = collect_progress(encode_output.root, now=now)
    t = collect_dashboard(encode_output.root, progress, ShardDetailsCache()).throughput
    width = (t.end - t.start) / len(t.rows_per_s)
    assert t.start == pytest.approx(now - 500) and t.end == pytest.approx(now)  # running: up to now
    assert sum(t.rows_per_s) * width == pytest.approx(12)  # 3 shards of 4 rows
    assert sum(t.audio_seconds_per_s) * width == pytest.approx(24)
    assert max(t.rows_per_s) == pytest.approx(4 / 50, rel=0.05)  # the 50 s shard was the fastest
    gap = [r for k, r in enumerate(t.rows_per_s) if now - 200 + width <= t.start + k * width <= now - 150 - width]
    assert gap and all(r == 0 for r in gap)  # nothing was being encoded between the 2nd and the 3rd shard
    assert (t.live_rows_per_s, t.live_audio_seconds_per_s) == (0.5, 1.0)  # from the alive heartbeat
    # encoder-0 (which wrote every shard) is busy with shard 3 since its last publication: measured until then
    assert t.measured_until == pytest.approx(now - 100, abs=0.01)
    assert t.measured_buckets == int(400 / width)


def write_shard(root, shard_id: int, rows: list[schema.ShardRow]) -> None:
    stats = schema.ShardStats(rows=len(rows), rows_ok=sum(r.ok for r in rows), rows_error=sum(not r.ok for r in rows),
                              audio_seconds=sum(r.duration or 0.0 for r in rows if r.ok), frames=0,
                              encode_seconds=1.0, worker="encoder-0")
    path = root / schema.SHARDS_DIR / schema.shard_name(shard_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(schema.build_table(rows, stats), path)


def test_error_rows_show_an_id_and_a_reason_code_only(encode_output):
    encode_output.plan(num_shards=1)
    secret = f"/data/{SENTINEL}/clip.wav"
    long_id = "x" * 500
    row = schema.ShardRow.from_entry
    write_shard(encode_output.root, 0, [
        row(0, {"id": "<b>bold</b>", "audio": secret}, error=f"missing_file: {secret}: check the path"),
        row(1, {"id": long_id, "audio": secret}, error=f"Not A Code {SENTINEL}: whatever"),
        row(2, {"id": "ctl\x1b[31m", "audio": secret}, error=f"undecodable: {secret}: {SENTINEL}"),
        row(3, {"id": "ok", "audio": secret}, codes=[[1] * 16] * 3, duration=0.24, sample_rate=24000),
    ])
    with start_status_server(encode_output.root, "127.0.0.1", 0) as server:
        page = httpx.get(f"{server.url}/").text
        body = httpx.get(f"{server.url}/metrics").text
        metrics = scrape(server.url)
    for text in (page, body):
        assert SENTINEL not in text and "clip.wav" not in text and "check the path" not in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold" not in page
    assert "x" * ID_SHOWN_CHARS not in page and "x" * (ID_SHOWN_CHARS - 1) + "…" in page
    assert "\x1b" not in page and "ctl?[31m" in page
    assert metrics["qwen3tts_encode_error_rows"] == {(("reason", "missing_file"),): 1, (("reason", "other"),): 1,
                                                     (("reason", "undecodable"),): 1}
    assert "&lt; 1 s" in page  # the one good clip lands in the first duration bin


def test_shard_details_are_read_once_per_file_version(encode_output):
    encode_output.plan(num_shards=2)
    path = encode_output.shard(0, errors=1)
    cache = ShardDetailsCache()
    first = cache.get(path)
    assert first is not None and cache.get(path) is first  # unchanged file: the cached record
    assert first.errors_by_reason == {"decode": 1} and sum(first.duration_counts) == 3
    encode_output.shard(0, errors=2)  # rewritten (a --replan): read again
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    second = cache.get(path)
    assert second is not first and second.errors_by_reason == {"decode": 2}
    (path.parent / "shard-00001.parquet").write_bytes(b"not parquet")
    assert cache.get(path.parent / "shard-00001.parquet") is None  # counted by status, without details


def test_page_of_an_empty_directory(tmp_path):
    with start_status_server(tmp_path, "127.0.0.1", 0) as server:
        page = httpx.get(f"{server.url}/")
        metrics = scrape(server.url)
    assert page.status_code == 200 and "no shard published yet" in page.text
    assert "no encoder has reported yet" in page.text
    assert metrics["qwen3tts_encode_state"][(("state", "empty"),)] == 1
