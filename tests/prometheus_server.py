"""A real Prometheus server (Debian's `prometheus` package) for tests: loopback only, a free port, its own
config file and data directory, scraping every second; queried through its HTTP API and stopped by pid."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import yaml

from tests.raycluster import free_port
from tests.system_tools import system_tool


class PrometheusServer:
    def __init__(self, root: Path, jobs: dict[str, tuple[str, Path | None]]):
        """jobs: scrape job name -> (host:port target, bearer token file or None)."""
        binary = system_tool("prometheus")
        root.mkdir(parents=True, exist_ok=True)
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [scrape_job(name, target, token) for name, (target, token) in jobs.items()]}
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(root / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.root = root

    def __enter__(self) -> "PrometheusServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.log.close()

    def query(self, promql: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for_values(self, promql: str, label: str, timeout: float) -> dict[str, float]:
        """The first non-empty answer (Prometheus applies its targets a few seconds after start-up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if self.query(promql):
                    return self.values(promql, label)
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.2)
        raise AssertionError(f"no value for {promql} within {timeout} s; targets: {self.targets()}; "
                             f"log: {self.log_tail()}")

    def series(self, promql: str, start: float, end: float) -> dict[tuple, list[float]]:
        """Every sample of each series in [start, end] at 1 s steps (query_range), keyed by its labels."""
        response = httpx.get(f"{self.url}/api/v1/query_range",
                             params={"query": promql, "start": start, "end": end, "step": "1s"}, timeout=10)
        response.raise_for_status()
        return {tuple(sorted(r["metric"].items())): [float(v) for _, v in r["values"]]
                for r in response.json()["data"]["result"]}

    def values(self, promql: str, label: str) -> dict[str, float]:
        return {r["metric"][label]: float(r["value"][1]) for r in self.query(promql)}

    def value(self, promql: str) -> float:
        (result,) = self.query(promql)
        return float(result["value"][1])

    def targets(self) -> list[dict]:
        return httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]

    def target_error(self, job: str) -> str:
        (target,) = [t for t in self.targets() if t["labels"]["job"] == job]
        return target["lastError"]

    def log_tail(self) -> str:
        self.log.flush()
        return (self.root / "prometheus.log").read_text()[-2000:]


def scrape_job(name: str, target: str, token_file: Path | None) -> dict:
    job = {"job_name": name, "static_configs": [{"targets": [target]}]}
    if token_file is not None:  # what the scrape config in docs/watching.md shows
        job["authorization"] = {"type": "Bearer", "credentials_file": str(token_file)}
    return job
