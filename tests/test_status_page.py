"""The status page and /metrics over a real encode output: served by a real uvicorn server, rendered by a real
headless Chromium at desktop and phone sizes, and scraped by a real Prometheus server whose HTTP API must
report what /status reports."""
import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import yaml
from PIL import Image

from services.status.server import start_status_server
from shared.schema import SUMMARY_FILE
from tests.conftest import run_encode, synth_corpus, write_manifest
from tests.raycluster import free_port
from tests.prometheus_server import PrometheusServer
from tests.system_tools import system_tool
from tests.test_status import TOKEN, auth

# Clip lengths spread over several histogram bins, and bad rows of four reasons.
GOOD_SECONDS = [0.6, 0.9, 1.3, 1.7, 2.2, 2.6, 3.1, 3.4, 4.2, 4.8, 5.5, 6.5, 7.2, 1.1, 2.9, 3.8]
BAD_ROWS = {"missing_file": 2, "silent": 1, "empty_text": 1, "undecodable": 1}
GREEN_OK = (0x2E, 0x9D, 0x5B)  # --ok in services.status.page: the done segment of the progress bar
VIEWPORTS = {"desktop": (1280, 900), "phone": (390, 844)}


@dataclass
class EncodedJob:
    out: Path
    port: int  # where the job's driver served status (free again once it exited)
    token_file: Path
    prometheus: PrometheusServer  # scraping that port since before the job started
    started: float
    finished: float


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_codec_dir):
    """A real encode (services.encode, tiny codec) of good clips and bad rows, 4 rows per shard, whose driver
    serves status with a token on a free port that a real Prometheus scrapes every second while it runs."""
    root = tmp_path_factory.mktemp("page-job")
    entries = synth_corpus(root / "wav", [(s, 24_000) for s in GOOD_SECONDS])
    sf.write(root / "wav" / "silence.wav", np.zeros(24_000, dtype=np.float32), 24_000)
    (root / "wav" / "not_audio.wav").write_bytes(b"not a wav\n" * 40)
    good = entries[0]
    bad = [{**good, "id": "gone-1", "audio": str(root / "wav" / "gone-1.wav")},
           {**good, "id": "silent-1", "audio": str(root / "wav" / "silence.wav")},
           {**good, "id": "gone-2", "audio": str(root / "wav" / "gone-2.wav")},
           {**good, "id": "no-text-1", "text": "  "},
           {**good, "id": "garbage-1", "audio": str(root / "wav" / "not_audio.wav")}]
    manifest = write_manifest(root / "raw.jsonl", entries[:6] + bad[:2] + entries[6:12] + bad[2:] + entries[12:])
    token_file = root / "token"
    token_file.write_text(TOKEN)
    port = free_port()
    target = f"127.0.0.1:{port}"
    prometheus = PrometheusServer(root / "prometheus",
                                  jobs={"encode": (target, token_file), "no-token": (target, None)})
    try:
        started = time.time()
        done = run_encode("--manifest", str(manifest), "--codec", str(tiny_codec_dir), "--output", str(root / "out"),
                          "--shard-size", "4", "--status-port", str(port), "--status-token-file", str(token_file),
                          timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        yield EncodedJob(root / "out", port, token_file, prometheus, started, time.time())
    finally:
        prometheus.stop()


@pytest.fixture
def encoded(job) -> Path:
    return job.out


def test_page_shows_a_real_job(encoded):
    summary = json.loads((encoded / SUMMARY_FILE).read_text())
    assert summary["errors_by_reason"] == BAD_ROWS  # the job itself agrees on what went wrong
    with start_status_server(encoded, "127.0.0.1", 0, token=TOKEN) as server:
        assert httpx.get(f"{server.url}/").status_code == 401
        page = httpx.get(f"{server.url}/", headers=auth()).text
        status = httpx.get(f"{server.url}/status", headers=auth()).json()
    body = page.split("<body>", 1)[1]
    assert status["state"] == "complete" and status["shards"]["done"] == status["shards"]["total"] == 6
    assert f"{status['shards']['done']} / {status['shards']['total']} shards done" in body
    assert f"{len(GOOD_SECONDS)} rows ok" in body and f"{sum(BAD_ROWS.values())} errors" in body
    for reason, count in BAD_ROWS.items():
        assert f"<span>{reason}</span>" in body and f'<span class="n">{count}</span>' in body, reason
    for row_id in ("gone-1", "silent-1", "gone-2", "no-text-1", "garbage-1"):
        assert f"<td>{row_id}</td>" in body
    # id and reason code only: no path, no file name, no detail of the error message
    assert str(encoded.parent) not in page and ".wav" not in page and "not a wav" not in page
    assert "<svg" in body and "<script" not in page and "http" not in body  # nothing fetched from elsewhere
    counted = sum(int(n) for n in _duration_bar_counts(body))
    assert counted == len(GOOD_SECONDS)


def _duration_bar_counts(body: str) -> list[str]:
    section = body.split("Clip durations", 1)[1].split("</section>", 1)[0]
    return re.findall(r'<span class="n">(\d+)</span>', section)


def screenshot(browser: str, url: str, size: tuple[int, int], target: Path, profile: Path) -> None:
    """Headless Chromium as root in a container: --no-sandbox is required (it refuses to run as root otherwise);
    no GPU and a small /dev/shm are common there too."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
           f"--screenshot={target}", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0 and target.is_file(), done.stderr[-3000:]


def test_page_in_headless_chromium_at_desktop_and_phone_size(encoded, tmp_path):
    browser = system_tool("chromium", "chromium", "chromium-browser")
    with start_status_server(encoded, "127.0.0.1", 0) as server:  # Chromium cannot send a bearer header
        for name, size in VIEWPORTS.items():
            target = tmp_path / f"{name}.png"
            screenshot(browser, f"{server.url}/", size, target, tmp_path / "profile")
            with Image.open(target) as image:
                assert image.size == size, name
                rgb = image.convert("RGB")
                colours = rgb.getcolors(maxcolors=1 << 20)
                assert len(colours) > 100, f"{name}: a near-blank screenshot ({len(colours)} colours)"
                # the progress bar rendered with the page's stylesheet, across most of the card's width
                row = _green_row(rgb)
                assert row is not None, f"{name}: no progress bar in the screenshot"
                assert _green_run(rgb, row) > 0.6 * size[0], name


def _green_row(image: Image.Image) -> int | None:
    width, height = image.size
    for y in range(0, min(height, 400)):
        if sum(1 for x in range(0, width, 4) if image.getpixel((x, y)) == GREEN_OK) > width // 16:
            return y
    return None


def _green_run(image: Image.Image, y: int) -> int:
    return sum(1 for x in range(image.size[0]) if image.getpixel((x, y)) == GREEN_OK)


def test_prometheus_scraped_the_job_while_it_ran(job):
    prometheus = job.prometheus
    window = (job.started, job.finished)
    running = prometheus.series('qwen3tts_encode_state{job="encode",state="running"}', *window)
    assert 1 in [v for values in running.values() for v in values], "never scraped the job as running"
    alive = prometheus.series('qwen3tts_encode_encoder_alive{job="encode"}', *window)
    assert any(1 in values for values in alive.values()), f"never scraped a live encoder: {alive}"
    (done,) = prometheus.series('qwen3tts_encode_shards{job="encode",state="done"}', *window).values()
    assert done == sorted(done) and len(done) >= 2, done  # progress never goes backwards
    (planned,) = prometheus.series('qwen3tts_encode_shards_planned{job="encode"}', *window).values()
    assert set(planned) == {6}


def test_prometheus_scrapes_metrics_that_match_status(job):
    prometheus = job.prometheus
    # the job's driver (and its server) are gone: a standalone server takes over the same port
    with start_status_server(job.out, "127.0.0.1", job.port, token=TOKEN) as server:
        status = httpx.get(f"{server.url}/status", headers=auth()).json()
        assert status["state"] == "complete"
        prometheus.wait_for_values('qwen3tts_encode_state{job="encode",state="complete"} == 1', "state", timeout=30)
        rows = prometheus.values('qwen3tts_encode_rows{job="encode"}', "result")
        assert rows == {"ok": status["rows"]["ok"], "error": status["rows"]["error"]}
        assert prometheus.values('qwen3tts_encode_error_rows{job="encode"}', "reason") == BAD_ROWS
        shards = prometheus.values('qwen3tts_encode_shards{job="encode"}', "state")
        assert shards == {k: status["shards"][k] for k in ("done", "running", "failed", "pending")}
        assert prometheus.value('qwen3tts_encode_shards_planned{job="encode"}') == status["shards"]["total"]
        assert prometheus.value('qwen3tts_encode_audio_seconds{job="encode"}') == pytest.approx(
            status["audio_hours"] * 3600)
        by_encoder = {e["name"]: e for e in status["encoders"]}
        assert by_encoder
        for metric, key in (("encoder_rows_per_second", "rows_per_s"),
                            ("encoder_audio_seconds_per_second", "audio_seconds_per_s")):
            got = prometheus.values(f'qwen3tts_encode_{metric}{{job="encode"}}', "encoder")
            assert got == pytest.approx({name: e[key] for name, e in by_encoder.items()}), metric
        ages = prometheus.values('qwen3tts_encode_encoder_heartbeat_age_seconds{job="encode"}', "encoder")
        now = time.time()
        for name, e in by_encoder.items():
            assert now - e["updated"] - 5 <= ages[name] <= now - e["updated"] + 1, name
        # the scrape without the token was refused, and Prometheus says so (its last scrape may predate this
        # server, when the port refused connections: wait for one that reached it)
        deadline = time.time() + 30
        while "401" not in prometheus.target_error("no-token") and time.time() < deadline:
            time.sleep(0.5)
        assert prometheus.value('up{job="no-token"}') == 0
        assert "401" in prometheus.target_error("no-token")


def readme_prometheus_configs() -> list[dict]:
    """The docs' Prometheus YAML: the scrape config (docs/watching.md), and the annotation-driven job of the KubeRay
    steps (docs/scaling-out.md, a list item there)."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    text = "\n".join((docs / name).read_text() for name in ("watching.md", "scaling-out.md"))
    configs = []
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        value = yaml.safe_load(block)
        if isinstance(value, dict) and "scrape_configs" in value:
            configs.append(value)
        elif isinstance(value, list) and all(isinstance(j, dict) and "job_name" in j for j in value):
            configs.append({"scrape_configs": value})
    return configs


def test_documented_scrape_configs_pass_promtool(tmp_path):
    promtool = system_tool("prometheus", "promtool")  # Debian's prometheus package ships promtool
    configs = readme_prometheus_configs()
    assert len(configs) == 2, "the docs show a static scrape config and a KubeRay annotation-driven job"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    for i, config in enumerate(configs):
        for job in config["scrape_configs"]:
            assert job["authorization"]["type"] == "Bearer", job["job_name"]  # /metrics needs the token
            job["authorization"]["credentials_file"] = str(token_file)  # promtool checks that it exists
            if job.pop("kubernetes_sd_configs", None) is not None:
                # Debian builds Prometheus without Kubernetes discovery; the rest (auth, relabelling) is checked
                job["static_configs"] = [{"targets": ["10.0.0.1:8000"]}]
        path = tmp_path / f"prometheus-{i}.yml"
        path.write_text(yaml.safe_dump(config))
        done = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
