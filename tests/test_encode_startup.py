"""What a small job's fixed cost depends on (benchmarks/first_code.py measures the cost itself): the driver never
imports torch or the model, the encoder imports the codec without scikit-learn, and a private Ray's autoscaler
monitor is stopped at once; and a finished job leaves no process of its private Ray behind."""
import json
import os
import subprocess
import sys
import threading

import soundfile as sf

from shared.synth import synth_utterance
from tests.conftest import REPO, encode_args, write_manifest
from tests.raycluster import Background, session_members, wait_for

# Runs the real CLI's main() and then reports which heavy modules the driver process had imported.
DRIVER = """
import json, sys
from services.encode.driver import main
code = main(sys.argv[1:])
print("DRIVER_MODULES " + json.dumps({name: name in sys.modules for name in ("torch", "transformers", "qwen_tts")}))
sys.exit(code)
"""


def python(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_driver_never_imports_torch_and_leaves_no_process_of_its_private_ray(tiny_codec_dir, tmp_path):
    """torch's import (~2 s of a core) slowed Ray's start beside it and its teardown cost ~0.6 s at exit; the
    driver needs neither torch nor the model, only the encoders do."""
    sf.write(tmp_path / "a.wav", synth_utterance(1.0, 24_000, seed=3), 24_000)
    manifest = write_manifest(tmp_path / "raw.jsonl", [{"id": "a", "audio": str(tmp_path / "a.wav"), "text": "t"}])
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-c", DRIVER, "--device", "cpu", *encode_args(manifest, tiny_codec_dir, out)]
    with Background(command, env=env, log=tmp_path / "driver.log") as job:
        assert job.wait(timeout=300) == 0, job.output[-4000:]
        # Ray's daemons, its workers and the reaper run in the driver's session: none may outlive the job.
        wait_for(lambda: not session_members([job.pid]), 30, "the finished job's private Ray to be gone")
    report = next(line for line in job.output.splitlines() if line.startswith("DRIVER_MODULES "))
    assert json.loads(report.split(" ", 1)[1]) == {"torch": False, "transformers": False, "qwen_tts": False}
    assert json.loads((out / "summary.json").read_text())["rows_ok"] == 1


def test_the_encoder_loads_and_runs_the_codec_without_scikit_learn(tiny_codec_dir):
    """transformers imports scikit-learn only for assisted generation; the encoder tells it scikit-learn is
    absent. If a transformers upgrade renames the flag, the import comes back and this fails."""
    code = """
import json, sys
import numpy as np
from services.encode.encoder import skip_scikit_learn_in_transformers
skip_scikit_learn_in_transformers()
from shared.qwen import encode_clips, load_codec
codes = encode_clips(load_codec(sys.argv[1]), [np.random.default_rng(0).standard_normal(24000).astype(np.float32)])
from transformers.utils import is_sklearn_available
print(json.dumps({"sklearn_imported": "sklearn" in sys.modules, "available": is_sklearn_available(),
                  "shape": list(codes[0].shape)}))
"""
    result = python(code, str(tiny_codec_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sklearn_imported"] is False and report["available"] is False, report
    frames, quantizers = report["shape"]
    assert frames == 13 and quantizers > 0, report  # 1 s at 12.5 frames/s, the last frame partial


def test_the_private_rays_autoscaler_monitor_is_stopped_before_shutdown():
    """ray.shutdown() gives each daemon 1 s to exit on SIGTERM and the monitor took all of it; the driver kills
    it first. This reads Ray's internal process table: if a Ray upgrade renames it, this fails."""
    code = """
import json, os
import ray
from services.encode.driver import stop_autoscaler_monitor
from ray._private import ray_constants, worker
ray.init(address="local", include_dashboard=False, logging_level="WARNING")
monitors = [info.process for info in worker._global_node.all_processes[ray_constants.PROCESS_TYPE_MONITOR]]
alive_before = [p.poll() is None for p in monitors]
stop_autoscaler_monitor()
print(json.dumps({"monitors": len(monitors), "alive_before": alive_before,
                  "alive_after": [p.poll() is None for p in monitors]}))
ray.shutdown()
"""
    result = python(code, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"monitors": 1, "alive_before": [True], "alive_after": [False]}, report


def test_the_encoder_reads_the_codec_weights_while_it_imports(tiny_codec_dir, tmp_path, monkeypatch):
    """warm_page_cache reads every weight file once (this process's read counter grows by their size) and
    leaves an unreadable file to the codec load, which names it."""
    from services.encode.encoder import warm_page_cache

    weights = sum(p.stat().st_size for p in tiny_codec_dir.glob("*.safetensors"))
    assert weights > 0

    def bytes_read() -> int:
        return int(next(line for line in open("/proc/self/io") if line.startswith("rchar:")).split()[1])

    before = bytes_read()
    warm_page_cache(tiny_codec_dir).join(timeout=60)
    assert bytes_read() - before >= weights
    raised = []
    monkeypatch.setattr(threading, "excepthook", raised.append)
    (tmp_path / "model.safetensors").mkdir()  # unreadable as a file
    warm_page_cache(tmp_path).join(timeout=60)
    assert raised == []
