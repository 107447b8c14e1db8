"""plan.json records each encode run's device kind and codec numerics: a resubmit on other hardware is allowed
but warned about and visible in the plan; plans written before the record existed still load and are reused."""
import json

from services.encode.plan import load_plan, prepare_plan, record_encode_run
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


def test_chips_computing_fp32_from_fp16_are_refused_unless_accepted_and_then_recorded(tmp_path, tiny_codec_dir):
    """Ascend chips before 910B1 (no bf16, the check training uses too) read fp16 inputs in fp32 convolutions and
    matmuls: refused for encoding with the fix; with the flag, plan.json records what the encoder reported."""
    import pytest

    from services.encode.plan import amend_encode_run
    from shared.device import ALLOW_REDUCED_FLAG, FP16_INPUTS, UnsupportedPrecision, npu_codec_numerics

    assert npu_codec_numerics("Ascend910B3", True, False) == codec_numerics("npu")
    with pytest.raises(UnsupportedPrecision, match=f"Ascend910A .*fp16 inputs.*Fix: .*{ALLOW_REDUCED_FLAG}"):
        npu_codec_numerics("Ascend910A", False, False)
    accepted = npu_codec_numerics("Ascend310P3", False, True)
    assert accepted == FP16_INPUTS and accepted.fp32_inputs == "float16" and accepted.conv_reduced_fp32

    manifest = write_manifest(tmp_path / "m.jsonl", [{"audio": "x.wav", "text": "t"}] * 3)
    out = tmp_path / "out"
    plan = prepare_plan(out, manifest, tiny_codec_dir, 2)
    record_encode_run(out, plan, codec_numerics("npu"), print)  # what the driver expects before any encoder runs
    logged = []
    amend_encode_run(out, plan, CodecNumerics(**json.loads(json.dumps(accepted.__dict__))), "encoder-0 on n1",
                     logged.append)
    (run,) = json.loads((out / PLAN_FILE).read_text())["encode_runs"]
    assert run["fp32_inputs"] == "float16" and run["conv_reduced_fp32"] and run["matmul_reduced_fp32"]
    assert len(logged) == 1 and "encoder-0 on n1" in logged[0] and "fp32_inputs float32 -> float16" in logged[0]
    amend_encode_run(out, plan, accepted, "encoder-1 on n1", logged.append)
    assert len(logged) == 1  # the record already says so
    assert load_plan(out).runs[0].numerics == FP16_INPUTS
