"""The status server over real HTTP: a uvicorn process (the CLI) and the in-process helper."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.status.server import create_app, start_status_server, token_from

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def running_job(encode_output):
    """A job mid-run: 2 of 6 shards published, one being written, two live encoders out of three files."""
    encode_output.plan(num_shards=6)  # 4 rows per shard: 24 rows
    encode_output.shard(0)
    encode_output.shard(1, errors=1)
    encode_output.temporary_shard(2)
    encode_output.heartbeat("encoder-0", shard=2, rows_per_s=5.0, audio_seconds_per_s=10.0)
    encode_output.heartbeat("encoder-1", shard=4, rows_per_s=50.0, age=300)
    encode_output.garbage_heartbeat("encoder-2")
    encode_output.driver()
    return encode_output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cli_server(running_job, tmp_path):
    """`python -m services.status` in its own process, with a token file; yields its base URL."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "QWEN3TTS_STATUS_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "services.status", "--output", str(running_job.root),
                             "--port", str(port), "--token-file", str(token_file)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, proc.stdout.read()


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"status server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    pytest.fail("status server did not come up")


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def assert_running_job_numbers(status: dict) -> None:
    assert status["state"] == "running"
    assert status["shards"] == {"total": 6, "done": 2, "running": 1, "failed": 0, "pending": 3}
    assert status["rows"] == {"planned": 24, "ok": 7, "error": 1}
    assert status["audio_hours"] == pytest.approx(7 * 2.0 / 3600)
    assert status["rate"] == {"rows_per_s": 5.0, "audio_seconds_per_s": 10.0}  # the stale encoder is out
    assert status["eta_seconds"] == pytest.approx((24 - 8) / 5.0)
    assert [(e["name"], e["alive"]) for e in status["encoders"]] == [("encoder-0", True), ("encoder-1", False)]
    assert status["nodes"] == {"10.0.0.5": 1}


def test_cli_server_reports_directory_and_follows_it(cli_server, running_job):
    status = httpx.get(f"{cli_server}/status", headers=auth()).json()
    assert_running_job_numbers(status)
    running_job.shard(2)  # encoder-0 publishes its shard
    status = httpx.get(f"{cli_server}/status", headers=auth()).json()
    assert status["shards"]["done"] == 3 and status["shards"]["running"] == 0
    assert status["rows"]["ok"] == 11


def test_cli_server_requires_the_token(cli_server):
    for path in ("/status", "/"):
        assert httpx.get(f"{cli_server}{path}").status_code == 401
        assert httpx.get(f"{cli_server}{path}", headers=auth("wrong")).status_code == 401
        assert httpx.get(f"{cli_server}{path}", headers={"Authorization": TOKEN}).status_code == 401
        assert httpx.get(f"{cli_server}{path}", headers=auth()).status_code == 200
    assert httpx.get(f"{cli_server}/healthz").status_code == 200
    assert httpx.get(f"{cli_server}/openapi.json", headers=auth()).status_code == 404


def test_cli_page_is_self_refreshing_html(cli_server):
    response = httpx.get(f"{cli_server}/", headers=auth())
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert '<meta http-equiv="refresh"' in page
    assert "shards 2/6 (1 running, 0 failed)" in page
    assert "encoder-0" in page and "<script src" not in page and "http" not in page.split("<body>")[1]


def test_in_process_helper_on_port_zero(running_job):
    server = start_status_server(running_job.root, "127.0.0.1", 0, token=None)
    try:
        assert server.port != 0 and server.url == f"http://127.0.0.1:{server.port}"
        assert_running_job_numbers(httpx.get(f"{server.url}/status").json())
        running_job.shard(3)
        assert httpx.get(f"{server.url}/status").json()["shards"]["done"] == 3
        assert "<table>" in httpx.get(f"{server.url}/").text
    finally:
        server.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=2)


def test_in_process_helper_with_token(running_job):
    with start_status_server(running_job.root, "127.0.0.1", 0, token=TOKEN) as server:
        assert httpx.get(f"{server.url}/status").status_code == 401
        assert httpx.get(f"{server.url}/status", headers=auth()).json()["shards"]["done"] == 2
        assert httpx.get(f"{server.url}/healthz").json() == {"ok": True}


def test_helper_reports_a_port_in_use(running_job):
    with start_status_server(running_job.root, "127.0.0.1", 0) as first:
        with pytest.raises(OSError, match="could not start"):
            start_status_server(running_job.root, "127.0.0.1", first.port)


def test_empty_token_is_refused(tmp_path):
    with pytest.raises(ValueError):
        create_app(tmp_path, token="")
    (tmp_path / "token").write_text("\n")
    with pytest.raises(ValueError):
        token_from(tmp_path / "token")


def test_token_from_file_then_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("QWEN3TTS_STATUS_TOKEN", raising=False)
    assert token_from(None) is None
    monkeypatch.setenv("QWEN3TTS_STATUS_TOKEN", " from-env ")
    assert token_from(None) == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    assert token_from(str(tmp_path / "token")) == "from-file"


def test_page_escapes_heartbeat_text(running_job):
    running_job.write_json("workers/evil.json", {"name": "<script>alert(1)</script>", "updated": time.time()})
    with start_status_server(running_job.root, "127.0.0.1", 0) as server:
        page = httpx.get(f"{server.url}/").text
    assert "<script>" not in page and "&lt;script&gt;" in page
