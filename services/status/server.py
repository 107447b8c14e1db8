"""HTTP status of an encode job: JSON at /status, a self-refreshing page at / (services.status.page), Prometheus
metrics at /metrics (services.status.metrics), liveness at /healthz.

    python -m services.status --output DIR --port P [--host 127.0.0.1] [--token-file F]

Everything served is computed by services.status.progress from the output directory named at start-up;
no request can name a path or read a file. With a token (--token-file, else $QWEN3TTS_STATUS_TOKEN)
every route but /healthz needs `Authorization: Bearer <token>`.
"""
from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from services.status.dashboard import Dashboard, collect_dashboard
from services.status.metrics import exposition, job_registry
from services.status.page import render_page
from services.status.progress import collect_progress
from services.status.shard_details import ShardDetailsCache
from shared.store import LocalStore, Store, open_store

TOKEN_ENV = "QWEN3TTS_STATUS_TOKEN"
OPEN_PATHS = {"/healthz"}  # liveness probes (load balancers, k8s) carry no credentials


class ProgressCache:
    """collect_progress once per change of the directory (or per `max_age` for the time-based fields), so
    many clients polling at once cost one directory scan, not one each. The fingerprint is a few stat
    calls: adding, renaming or rewriting a shard or heartbeat changes its directory's mtime."""

    WATCHED = ("", "shards", "workers")

    def __init__(self, output: Store, max_age: float = 1.0):
        self.output, self.max_age = output, max_age
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._at = 0.0
        self.progress: dict = {}
        self.body = b""
        self._details = ShardDetailsCache()
        # Its own lock: a first page load over many shards (reading their columns) must not hold up /status.
        self._view_lock = threading.Lock()
        self._dashboard: Dashboard | None = None
        self._page: tuple[Dashboard | None, str] = (None, "")  # the page and the dashboard it shows

    def _fingerprint(self) -> tuple:
        """Directory mtimes on a path; on an object store nothing cheaper than the listing itself, so every
        `max_age` is a new snapshot."""
        if not isinstance(self.output, LocalStore):
            return ()
        stamps = []
        for name in self.WATCHED:
            try:
                stamps.append(os.stat(self.output.location(name)).st_mtime_ns)
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def get(self) -> tuple[dict, bytes]:
        with self._lock:
            key, now = self._fingerprint(), time.monotonic()
            if key != self._key or now - self._at > self.max_age:
                self.progress = collect_progress(self.output)
                self.body = json.dumps(self.progress).encode()
                self._key, self._at = key, now
            return self.progress, self.body

    def dashboard(self) -> Dashboard:
        """The page's and /metrics' view of the same snapshot; the shards' columns are read once per shard."""
        progress = self.get()[0]
        with self._view_lock:
            if self._dashboard is None or self._dashboard.progress is not progress:
                self._dashboard = collect_dashboard(self.output, progress, self._details)
            return self._dashboard

    def page(self) -> str:
        dashboard = self.dashboard()
        with self._view_lock:
            if self._page[0] is not dashboard:
                self._page = (dashboard, render_page(dashboard))
            return self._page[1]


def create_app(output_dir: str | Path | Store, token: str | None = None) -> FastAPI:
    if token is not None and not token:
        raise ValueError("an empty status token would let anyone in; pass None to disable authentication")
    output = open_store(output_dir)
    # No /docs, /redoc or /openapi.json: nothing here needs them, and they widen what is exposed.
    app = FastAPI(title="qwen3tts encode status", docs_url=None, redoc_url=None, openapi_url=None)

    if token is not None:
        expected = f"Bearer {token}".encode()

        @app.middleware("http")
        async def require_bearer_token(request: Request, call_next):
            if request.url.path in OPEN_PATHS:
                return await call_next(request)
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    cache = ProgressCache(output)

    @app.get("/status")
    def status() -> Response:
        return Response(cache.get()[1], media_type="application/json")

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(cache.page())

    registry = job_registry(cache)

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        body, content_type = exposition(registry, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    return app


class StatusServer:
    """A uvicorn server answering from a background thread; `stop()` asks it to exit and joins it."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread):
        self._server = server
        self._thread = thread
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> "StatusServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_status_server(output_dir: str | Path, host: str = "127.0.0.1", port: int = 0,
                        token: str | None = None, startup_timeout: float = 30.0) -> StatusServer:
    """Serve status for `output_dir` in a daemon thread; port 0 picks a free port (see `.port`, `.url`).

    Raises OSError when it cannot serve (port taken, address not local), like a failed bind would."""
    config = uvicorn.Config(create_app(output_dir, token), host=host, port=port, log_level="warning",
                            access_log=False, lifespan="off")
    server = uvicorn.Server(config)

    def serve() -> None:
        try:
            server.run()
        except SystemExit:  # uvicorn exits on a bind failure; it has logged why, and we raise below
            pass

    thread = threading.Thread(target=serve, name=f"status-server-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise OSError(f"status server could not start on {host}:{port} (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise OSError(f"status server did not start on {host}:{port} within {startup_timeout} s")
        time.sleep(0.02)
    return StatusServer(server, thread)


def token_from(token_file: str | Path | None) -> str | None:
    """The token in `token_file` when given, else $QWEN3TTS_STATUS_TOKEN, else None (no authentication)."""
    if token_file is not None:
        token = Path(token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="encode output to report on: a path or an s3:// URI")
    parser.add_argument("--port", type=int, default=8787, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--token-file", type=Path, help=f"file holding the bearer token (else ${TOKEN_ENV})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        token = token_from(args.token_file)
    except (OSError, ValueError) as e:
        print(f"status: error: {e}", file=sys.stderr)
        return 2
    if token is None and not is_loopback(args.host):
        print(f"status: warning: serving on {args.host} without a token; anyone who can reach it can read "
              "the job's status", file=sys.stderr)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server = start_status_server(args.output, args.host, args.port, token)
    except OSError as e:
        print(f"status: error: {e}", file=sys.stderr)
        return 1
    print(f"status: serving {args.output} at {server.url}", flush=True)
    while not stop.wait(0.5):  # a timed wait lets the signal handlers run promptly
        pass
    server.stop()
    return 0
