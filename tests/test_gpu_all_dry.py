"""benchmarks/gpu_all.sh --dry: the one-call device script runs end to end on a CPU (tiny sizes; nothing timed
is checked): every step runs and writes its results, the LoRA hook is recorded, and the summary names the stack."""
import json
import os
import subprocess

from tests.test_training_distributed import REPO


def test_gpu_all_dry_mode_runs_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    result = subprocess.run(["bash", str(REPO / "benchmarks/gpu_all.sh"), "--dry", "--out", str(out)],
                            capture_output=True, text=True, timeout=3000, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry"] is True and summary["device"] == "cpu" and "measure nothing" in summary["note"]
    assert summary["pinned_stack"] is True  # this venv is the pinned one
    status = {s["name"]: s["status"] for s in summary["steps"]}
    lora = "ok" if (REPO / "benchmarks/lora_memory.py").exists() else "skipped"
    assert status == {"packed_attention": "ok", "codec_precision": "ok", "encode": "ok", "train_sdpa": "ok",
                      "lora_memory": lora}, {s["name"]: (out / f"{s['name']}.log").read_text()[-2000:]
                                             for s in summary["steps"] if s["status"] not in ("ok", "skipped")}
    attention = json.loads((out / "packed_attention.json").read_text())
    assert set(attention["attention"]) == {"sdpa-dense", "flex"} and set(attention["step"]) == {"sdpa-dense", "flex"}
    assert attention["attention"]["flex"]["computed_tile_share"] < 1.0
    codec = json.loads((out / "codec_precision.json").read_text())["variants"]
    assert codec["fp32"]["frames_all_16_equal"] == 1.0 and 0.0 <= codec["bf16"]["frames_all_16_equal"] <= 1.0
    assert (out / "encode.json").is_file() and (out / "train_sdpa.json").is_file()


def test_gpu_all_refuses_a_missing_wheel_directory(tmp_path):
    result = subprocess.run(["bash", str(REPO / "benchmarks/gpu_all.sh"), "--wheels", str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "is not a directory" in result.stderr and "pip download" in result.stderr
