"""What the status server exposes, attacked over real HTTP: the bearer token in every shape a client might
misuse, paths and query strings that try to name files, methods that try to change something, and where it
binds (loopback by default; the CLI warns when it serves the network without a token)."""
import socket
import subprocess
import sys

import httpx
import pytest

from services.encode.driver import parse_args as parse_encode_args
from services.status.server import start_status_server
from tests.test_status import REPO, TOKEN, auth, free_port, running_job, wait_until_healthy  # noqa: F401 (fixture)

SENTINEL = "sentinel-file-contents-4f1c"
STATUS_KEYS = ('"shards"', '"rows"', '"encoders"')


@pytest.fixture
def guarded(running_job, tmp_path):
    """An in-process server with a token over a job directory that also holds files nobody may read."""
    (running_job.root / "secret.txt").write_text(SENTINEL)
    (running_job.root.parent / "outside.txt").write_text(SENTINEL)
    with start_status_server(running_job.root, "127.0.0.1", 0, token=TOKEN) as server:
        yield server


def raw_get(server, target: str, headers: dict | None = None, method: str = "GET") -> tuple[int, str]:
    """One request with the target sent byte for byte: httpx would normalise `..` and `%2e` away."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {server.host}:{server.port}", "Connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items()), "", ""]
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall("\r\n".join(lines).encode())
        data = b"".join(iter(lambda: s.recv(65536), b""))
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def assert_leaks_nothing(body: str) -> None:
    assert SENTINEL not in body and "root:" not in body


# ------------------------------------------------------------------------------------------------- the token


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": f"bearer {TOKEN}"},  # the comparison is exact; a lower-case scheme is not the token
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer  {TOKEN}"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": "Bearer "},
    {"Cookie": f"token={TOKEN}"},
    {"X-Ray-Authorization": f"Bearer {TOKEN}"},
], ids=["none", "lowercase-scheme", "prefix", "suffix", "two-spaces", "basic", "empty", "cookie", "other-header"])
def test_only_the_exact_bearer_token_opens_status(guarded, headers):
    for path in ("/status", "/", "/metrics"):
        code, body = raw_get(guarded, path, headers)  # raw: httpx itself refuses some of these headers
        assert code == 401, (path, headers)
        assert TOKEN not in body and not any(k in body for k in STATUS_KEYS) and "qwen3tts_" not in body
    for path in ("/status", "/", "/metrics"):
        assert raw_get(guarded, path, auth())[0] == 200, path


def test_token_in_the_query_string_is_not_accepted(guarded):
    for query in (f"token={TOKEN}", f"access_token={TOKEN}", f"authorization=Bearer%20{TOKEN}"):
        for path in ("/status", "/metrics"):
            assert httpx.get(f"{guarded.url}{path}?{query}").status_code == 401


def test_healthz_is_open_and_says_nothing_about_the_job(guarded):
    response = httpx.get(f"{guarded.url}/healthz")
    assert response.status_code == 200 and response.json() == {"ok": True}


# ------------------------------------------------------------------------------------------------- paths


def test_query_parameters_cannot_redirect_status_to_another_path(guarded):
    plain = httpx.get(f"{guarded.url}/status", headers=auth()).json()
    for query in ("output=/etc/passwd", "output=..", "path=/etc/passwd", "file=secret.txt", "dir=/", "output=/tmp"):
        response = httpx.get(f"{guarded.url}/status?{query}", headers=auth())
        assert response.status_code == 200, query
        assert_leaks_nothing(response.text)
        status = response.json()
        assert (status["shards"], status["rows"]) == (plain["shards"], plain["rows"]), query


@pytest.mark.parametrize("target", [
    "/../etc/passwd", "/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc%2fpasswd",
    "//etc/passwd", "/status/../../etc/passwd", "/status/..%2fsecret.txt", "/secret.txt", "/../outside.txt",
    "/plan.json", "/driver.json", "/workers/encoder-0.json", "/shards/shard-00000.parquet", "/static/secret.txt",
    "/docs", "/redoc", "/openapi.json", "/status/secret.txt", "/status.json", "/metrics/../secret.txt",
    "/metrics/secret.txt", "/errors.jsonl", "/summary.json",
])
def test_no_route_serves_a_file(guarded, target):
    code, body = raw_get(guarded, target, auth())
    assert code == 404, (target, code, body[:200])
    assert_leaks_nothing(body)
    code, body = raw_get(guarded, target)  # and without the token, nothing either
    assert code in (401, 404) and not any(k in body for k in STATUS_KEYS)
    assert_leaks_nothing(body)


@pytest.mark.parametrize("target", ["/healthz/../status", "/healthz/%2e%2e/status", "/healthz/", "//status",
                                    "/status/", "/STATUS", "/healthz/..%2fstatus", "/./status"])
def test_open_route_is_no_way_around_the_token(guarded, target):
    code, body = raw_get(guarded, target)
    assert not any(k in body for k in STATUS_KEYS), (target, code)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_nothing_can_be_written_through_the_server(guarded, running_job, method):
    before = sorted(p.relative_to(running_job.root) for p in running_job.root.rglob("*"))
    for path in ("/status", "/", "/metrics", "/healthz", "/secret.txt"):
        code, body = raw_get(guarded, path, {**auth(), "Content-Length": "0"}, method=method)
        assert code in (404, 405), (method, path, code)
        assert_leaks_nothing(body)
    assert sorted(p.relative_to(running_job.root) for p in running_job.root.rglob("*")) == before


# ------------------------------------------------------------------------------------------------- binding


def test_defaults_bind_loopback_only(running_job):
    args = parse_encode_args(["--manifest", "m", "--codec", "c", "--output", "o"])
    assert args.status_host == "127.0.0.1"
    address = non_loopback_address()
    with start_status_server(running_job.root, port=0) as server:
        assert server.host == "127.0.0.1"
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        with pytest.raises(OSError):  # refused: nothing listens on the machine's network address
            socket.create_connection((address, server.port), timeout=5).close()


def non_loopback_address() -> str:
    """This machine's address on its default route (a UDP connect sends nothing; it only picks the route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            pytest.skip("this machine has no network interface besides loopback to test against")
        address = s.getsockname()[0]
    assert not address.startswith("127."), address
    return address


def start_cli(output, host: str, *extra: str, log):
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(output.parent)}  # no QWEN3TTS_STATUS_TOKEN from the caller
    proc = subprocess.Popen([sys.executable, "-m", "services.status", "--output", str(output), "--host", host,
                             "--port", str(port), *extra], cwd=REPO, env=env, stdout=log, stderr=log, text=True)
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("host,with_token,warns", [("0.0.0.0", False, True), ("0.0.0.0", True, False),
                                                   ("127.0.0.1", False, False)])
def test_cli_warns_when_serving_the_network_without_a_token(running_job, tmp_path, host, with_token, warns):
    """The actual behaviour: it warns on stderr and still serves (it does not refuse)."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc, url = start_cli(running_job.root, host, *(["--token-file", str(token_file)] if with_token else []),
                              log=log)
        try:
            wait_until_healthy(url, proc)
            unauthenticated = httpx.get(f"{url}/status").status_code
        finally:
            proc.terminate()
            assert proc.wait(timeout=15) == 0
    output = log_path.read_text()
    assert ("without a token" in output) is warns, output
    assert unauthenticated == (401 if with_token else 200)
    assert TOKEN not in output
