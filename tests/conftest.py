# Readable progress for the whole suite: "[k/N] tests/test_x.py (n tests), elapsed" as each file starts.
from tests.progress_plugin import pytest_configure  # noqa: F401

# ---------------------------------------------------------------------------------------------
# Encode output directories for the status/progress tests (services.status.progress, services.status).
# ---------------------------------------------------------------------------------------------
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from shared import schema


class EncodeOutputBuilder:
    """Writes the files of docs/design.md into one output directory, the way the encode job does."""

    def __init__(self, root: Path, shard_size: int = 4):
        self.root = root
        self.shard_size = shard_size

    def write_json(self, relative: str, value) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
        return path

    def plan(self, num_shards: int) -> dict:
        shards = [{"id": i, "start": i * self.shard_size, "end": (i + 1) * self.shard_size,
                   "byte_start": 0, "byte_end": 0} for i in range(num_shards)]
        plan = {"version": 1, "config_hash": "0" * 64, "created": 0.0, "inputs": {},
                "num_rows": num_shards * self.shard_size, "num_shards": num_shards, "shards": shards}
        self.write_json(schema.PLAN_FILE, plan)
        return plan

    def shard(self, shard_id: int, errors: int = 0, seconds_per_row: float = 2.0,
              encode_seconds: float = 1.0) -> Path:
        """A real published shard: `errors` error rows, the rest good rows with random codes."""
        rng = np.random.default_rng(shard_id)
        rows = []
        for k in range(self.shard_size):
            index = shard_id * self.shard_size + k
            entry = {"id": f"utt{index}", "audio": f"/data/{index}.wav", "text": "t", "ref_audio": "/data/ref.wav"}
            if k < errors:
                rows.append(schema.ShardRow.from_entry(index, entry, error="decode: unreadable"))
            else:
                codes = rng.integers(0, 2048, size=(int(seconds_per_row * 12.5), 16), dtype=np.int16)
                rows.append(schema.ShardRow.from_entry(index, entry, codes=codes, duration=seconds_per_row,
                                                       sample_rate=24000))
        good = self.shard_size - errors
        stats = schema.ShardStats(rows=self.shard_size, rows_ok=good, rows_error=errors,
                                   audio_seconds=good * seconds_per_row, frames=good * int(seconds_per_row * 12.5),
                                   encode_seconds=encode_seconds, worker="encoder-0")
        path = self.root / schema.SHARDS_DIR / schema.shard_name(shard_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(schema.build_table(rows, stats), path)
        return path

    def temporary_shard(self, shard_id: int) -> Path:
        """What an encoder leaves while writing: a full Parquet file under a name readers must ignore."""
        published = self.shard(shard_id)
        temporary = published.with_name(f".{published.name}.tmp-1234")
        published.rename(temporary)
        return temporary

    def heartbeat(self, name: str, age: float = 1.0, shard: int | None = None, rows_per_s: float = 10.0,
                  audio_seconds_per_s: float = 20.0, node: str = "10.0.0.5") -> Path:
        now = time.time()
        return self.write_json(f"{schema.WORKERS_DIR}/{name}.json", {
            "name": name, "node": node, "hostname": f"host-{node}", "pid": 1234, "device": "cpu",
            "shard": shard, "rows": 100, "rows_error": 1, "audio_seconds": 200.0, "rows_per_s": rows_per_s,
            "audio_seconds_per_s": audio_seconds_per_s, "started": now - 100, "updated": now - age})

    def garbage_heartbeat(self, name: str) -> Path:
        path = self.root / schema.WORKERS_DIR / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"name": "half-writ')
        return path

    def driver(self, state: str = "running", age: float = 1.0, failed_shards: dict | None = None) -> Path:
        now = time.time()
        return self.write_json("driver.json", {
            "pid": 99, "host": "node-a", "state": state, "started": now - 100, "updated": now - age,
            "num_encoders": 2, "failed_shards": failed_shards or {}, "message": ""})

    def complete(self, elapsed_seconds: float) -> None:
        self.write_json(schema.SUMMARY_FILE, {"complete": True, "elapsed_seconds": elapsed_seconds})
        (self.root / schema.COMPLETE_MARKER).write_text("")


@pytest.fixture
def encode_output(tmp_path) -> EncodeOutputBuilder:
    root = tmp_path / "encoded"
    root.mkdir()
    return EncodeOutputBuilder(root)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Encode service: a tiny codec, generated corpora and a way to run the real job (services.encode).
# ---------------------------------------------------------------------------------------------
import os
import signal
import subprocess
import sys

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_codec_dir(tmp_path_factory) -> Path:
    from shared.tiny_codec import write_codec

    return write_codec(tmp_path_factory.mktemp("codec") / "codec")


def write_manifest(path: Path, entries: list) -> Path:
    """Entries are dicts (written as JSON) or raw bytes (written as they are, for broken lines)."""
    with open(path, "wb") as f:
        for entry in entries:
            f.write(entry if isinstance(entry, bytes) else json.dumps(entry, ensure_ascii=False).encode())
            f.write(b"\n")
    return path


def synth_corpus(root: Path, specs: list[tuple[float, int]], seed: int = 0) -> list[dict]:
    """Write one wav per (seconds, sample_rate) and return manifest entries for them (ref = the first)."""
    import soundfile as sf

    from shared.synth import synth_text, synth_utterance

    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (seconds, rate) in enumerate(specs):
        path = root / f"utt{i:04d}.wav"
        sf.write(path, synth_utterance(seconds, rate, seed * 1000 + i), rate)
        entries.append({"id": f"utt{i:04d}", "audio": str(path), "text": synth_text(i)})
    for entry in entries:
        entry["ref_audio"] = entries[0]["audio"]
    return entries


def run_encode(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process (its own private local Ray), status on a free port."""
    cmd = [sys.executable, "-m", "services.encode", "--status-port", "0", "--device", "cpu", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


# A few clips of mixed rates (resampled up and down) that the multi-node and fault jobs cycle over.
CYCLED_CLIPS = [(1.0, 24_000), (1.4, 16_000), (0.7, 44_100)]


@pytest.fixture(scope="session")
def cycled_clips(tmp_path_factory, tiny_codec_dir) -> tuple[list[dict], dict]:
    """Manifest entries for CYCLED_CLIPS and their codes from a clean encode (see expected_codes)."""
    entries = synth_corpus(tmp_path_factory.mktemp("cycled"), CYCLED_CLIPS)
    return entries, expected_codes(tiny_codec_dir, entries)


def encode_args(manifest: Path, codec: Path, output: Path | str, *extra: str) -> list[str]:
    """Arguments of `python -m services.encode` for the jobs of the multi-node and fault tests."""
    return ["--manifest", str(manifest), "--codec", str(codec), "--output", str(output), "--status-port", "0",
            "--progress-seconds", "2", *extra]


def heartbeats(output: Path) -> dict[str, dict]:
    """Encoder name -> its heartbeat (workers/<name>.json), skipping one caught mid-replace."""
    beats = {}
    for path in sorted((output / schema.WORKERS_DIR).glob("*.json")):
        try:
            beats[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    return beats


def requeued_shards(driver_log: str, encoder: str) -> list[int]:
    """The shards the driver gave back to the queue when it lost `encoder` (fails if it never did)."""
    import re

    lost = re.search(rf"{encoder} lost \(\w+\); re-queueing its shards \[([\d, ]*)\]", driver_log)
    assert lost, f"the driver never reported {encoder} lost:\n{driver_log[-4000:]}"
    return [int(s) for s in lost.group(1).split(",") if s.strip()]


def busy_encoder(out: Path, timeout: float, where=lambda beat: True) -> dict:
    """The heartbeat of an encoder that is working on a shard now (and satisfies `where`)."""
    from tests.raycluster import wait_for

    return wait_for(lambda: next((b for b in heartbeats(out).values() if b.get("shard") is not None and where(b)),
                                 None), timeout, "an encoder busy with a shard")


def assert_lost_shards_redone_elsewhere(driver_log: str, victim: dict, out: Path, entries: list, codes) -> None:
    """The victim's in-flight shards were re-queued, written by another encoder, and every row is right."""
    requeued = requeued_shards(driver_log, victim["name"])
    assert requeued, f"{victim['name']} was lost with no shard in flight"
    shards = schema.published_shards(out)
    assert all(schema.read_stats(shards[sid]).worker != victim["name"] for sid in requeued)
    assert_rows_match(out, entries, codes)


def repeated_corpus(clips: list[dict], rows: int) -> list[dict]:
    """`rows` manifest entries cycling over a few clips (from synth_corpus): a job with many rows and shards,
    long enough to inject faults into, for little set-up time and disk."""
    return [{**clips[i % len(clips)], "id": f"row{i:05d}"} for i in range(rows)]


def expected_codes(codec_dir: Path, entries: list[dict]) -> dict[str, np.ndarray]:
    """Codes per audio path from shared.qwen.encode_clips on each decoded clip alone: what a clean encode
    writes (its codes never depend on batching, see test_encode_job)."""
    from shared.audio import load_audio
    from shared.qwen import encode_clips, load_codec

    codec = load_codec(codec_dir)
    paths = sorted({e["audio"] for e in entries})
    return {p: encode_clips(codec, [load_audio(p).samples])[0].astype(np.int64) for p in paths}


def assert_rows_match(output: Path, entries: list[dict], expected: dict[str, np.ndarray]) -> None:
    """Every manifest line exactly once, in order, with the right id and codes; no temporary left behind."""
    from tests.test_encode_job import read_rows

    rows = read_rows(output)
    assert [r["index"] for r in rows] == list(range(len(entries))), "a row is missing or written twice"
    assert [r["id"] for r in rows] == [e["id"] for e in entries]
    for row in rows:
        assert row["error"] is None, row["error"]
        assert np.array_equal(row["audio_codes"], expected[row["audio"]]), f"codes of {row['id']} differ"
    from shared.store import open_store

    listed = open_store(output).listing(schema.SHARDS_DIR)  # a path or an s3:// URI alike
    assert not [name for name in listed if schema.shard_id_of(name) is None]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-protocol server (tests/s3server.py) for the session; its bucket `encode-out` exists."""
    from tests.s3server import S3Server

    server = S3Server(str(tmp_path_factory.mktemp("s3") / "moto.log")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """This process reads the test server's endpoint and writer credentials from the standard variables."""
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


# ---------------------------------------------------------------------------------------------
# Training (issue 3): one tiny random codec + Base model per session, and synthetic encoded shards.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """DIR/codec and DIR/model written by shared.tiny (the same writer the demo uses)."""
    from shared.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_custom_voice_dir(tiny_dir) -> Path:
    """TINY/custom_voice: the tiny CustomVoice model shared.tiny writes (built-in speakers ryan and the dialect
    speaker eric, no speaker encoder), the same size as TINY/model, whose speaker encoder can serve it."""
    from shared.tiny import write_custom_voice

    path = tiny_dir / "custom_voice"
    return path if (path / "config.json").is_file() else write_custom_voice(tiny_dir)


@pytest.fixture(scope="session")
def synthetic_encoded(tiny_dir, tmp_path_factory) -> Path:
    """A complete encode output directory (shards + _COMPLETE) built from generated audio by the tiny codec."""
    from training.data.synthetic import write_encoded

    return write_encoded(tmp_path_factory.mktemp("encoded"), tiny_dir / "codec", num_shards=2, rows_per_shard=6)
# ---------------------------------------------------------------------------------------------


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its ranks: the ranks run in sessions of their own, so killing torchrun's process
    group alone leaves them training (and writing checkpoints) as orphans."""
    import psutil

    victims = [proc.pid, *(child.pid for child in psutil.Process(proc.pid).children(recursive=True))]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
