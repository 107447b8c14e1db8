"""plan.json records each encode run's device kind and codec numerics: a resubmit on other hardware is allowed
but warned about and visible in the plan; plans written before the record existed still load and are reused."""
import json

from services.plan import load_plan, prepare_plan, record_encode_run
from shared.device import CodecNumerics, DeviceInfo, apply_codec_numerics, codec_numerics
from shared.schema import PLAN_FILE
from tests.conftest import write_manifest


def test_runs_on_other_hardware_are_recorded_and_warned_about(tmp_path, tiny_codec_dir):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"audio": "x.wav", "text": "t"}] * 5)
    out = tmp_path / "out"
    plan = prepare_plan(out, manifest, tiny_codec_dir, 2)
    logged = []
    assert record_encode_run(out, plan, codec_numerics("npu"), logged.append) == []
    assert record_encode_run(out, prepare_plan(out, manifest, tiny_codec_dir, 2), codec_numerics("npu"),
                             logged.append) == []
    assert logged == []  # the same hardware again: nothing to say
    resumed = prepare_plan(out, manifest, tiny_codec_dir, 2)  # a resubmit on a CPU machine: same plan
    assert resumed.created == plan.created
    assert record_encode_run(out, resumed, codec_numerics("cpu"), logged.append) == ["device_kind npu -> cpu"]
    assert len(logged) == 1 and "warning" in logged[0] and "device_kind npu -> cpu" in logged[0]
    runs = json.loads((out / PLAN_FILE).read_text())["encode_runs"]
    assert [r["device_kind"] for r in runs] == ["npu", "npu", "cpu"]
    assert all(r["dtype"] == "float32" and not r["conv_reduced_fp32"] and not r["matmul_reduced_fp32"] for r in runs)
    assert [r.numerics.device_kind for r in load_plan(out).runs] == ["npu", "npu", "cpu"]


def test_plan_without_run_history_loads_and_is_reused(tmp_path, tiny_codec_dir):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"audio": "x.wav", "text": "t"}] * 3)
    out = tmp_path / "out"
    plan = prepare_plan(out, manifest, tiny_codec_dir, 2)
    old = json.loads((out / PLAN_FILE).read_text())
    del old["encode_runs"]  # as written by the previous release
    (out / PLAN_FILE).write_text(json.dumps(old))
    again = prepare_plan(out, manifest, tiny_codec_dir, 2)
    assert (again.created, again.runs) == (plan.created, [])


def test_codec_numerics_on_cpu_and_a_reduced_precision_change_is_named():
    assert apply_codec_numerics(DeviceInfo("cpu", None, None)) == CodecNumerics("cpu")
    hf32 = CodecNumerics("npu", conv_reduced_fp32=True)
    assert hf32.differs_from(codec_numerics("npu")) == ["conv_reduced_fp32 False -> True"]
