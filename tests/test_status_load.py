"""benchmarks/status_load.py in small: 50 clients for 3 s on /status while a real encode runs. Every response
must be the status JSON (no timing assertions: this machine is shared)."""
import asyncio

import httpx
import pytest

from benchmarks.status_load import check_status_body, main, run_load


def test_status_under_concurrent_load_while_encoding(tiny_codec_dir, tmp_path):
    # 400 rows: the job must outlast the 3 s of load and the status read after it (150 once finished first)
    report = main(["--clients", "50", "--seconds", "3", "--utterances", "400", "--codec", str(tiny_codec_dir),
                   "--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "report.json")])
    load = report["load"]
    assert load["errors"] == 0, load["errors_by_kind"]
    assert load["requests"] == load["ok"] > 0
    assert load["responses_with_live_encoder"] > 0  # the load overlapped real encoding
    assert set(load["states_seen"]) <= {"running", "complete"}
    assert (tmp_path / "report.json").read_text().startswith("{")


@pytest.mark.parametrize("response,kind", [
    (httpx.Response(200, text="not json"), "invalid_json"),
    (httpx.Response(200, json=[1, 2]), "not_a_status_object"),
    (httpx.Response(200, json={"state": "running"}), "not_a_status_object"),
    (httpx.Response(401, json={"detail": "missing or wrong bearer token"}), "http_401"),
    (httpx.Response(500, text="Internal Server Error"), "http_500"),
])
def test_anything_but_a_status_object_counts_as_an_error(response, kind):
    with pytest.raises(ValueError, match=kind):
        check_status_body(response)


def test_a_status_object_passes():
    body = {"state": "running", "shards": {}, "rows": {}, "encoders": []}
    assert check_status_body(httpx.Response(200, json=body)) == body


def test_load_never_leaves_loopback():
    with pytest.raises(ValueError, match="127.0.0.1"):
        asyncio.run(run_load("http://10.0.0.1:8000", {}, clients=1, seconds=0.1))
