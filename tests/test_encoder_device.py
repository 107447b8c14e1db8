"""An encoder placed for an accelerator uses that accelerator or fails loudly: on a real `ray start` cluster with a
fake NPU (this machine has none) and no simulation switch, the job stops at the encoders' start with a message
that names the expected device, what was found and the fix, and encodes nothing on the CPU."""

import pytest

from shared.device import SIMULATED_ACCELERATORS_VAR, AcceleratorMissing, placed_device
from shared.schema import published_shards
from tests.conftest import encode_args, synth_corpus, write_manifest
from tests.raycluster import LocalRayCluster


def test_placed_device_refuses_a_missing_npu_and_keeps_the_cpu_for_cpu(monkeypatch):
    monkeypatch.delenv(SIMULATED_ACCELERATORS_VAR, raising=False)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "3")
    with pytest.raises(AcceleratorMissing) as refused:
        placed_device("npu", "encoder-7 on node-a")
    message = str(refused.value)
    assert "encoder-7 on node-a, placed on Ray's NPU resource: expected an Ascend NPU, but" in message
    assert "ASCEND_RT_VISIBLE_DEVICES='3'" in message
    assert "set_env.sh" in message and "--device cpu" in message
    with pytest.raises(AcceleratorMissing, match="expected a CUDA GPU"):
        placed_device("cuda", "encoder-8")
    assert placed_device("cpu", "encoder-9").kind == "cpu"
    monkeypatch.setenv(SIMULATED_ACCELERATORS_VAR, "1")
    simulated = placed_device("npu", "encoder-7")
    assert (simulated.kind, simulated.describe()) == ("cpu", "cpu (simulating npu 3)")


def test_encoder_placed_on_an_npu_it_cannot_see_fails_the_job(tiny_codec_dir, tmp_path):
    cluster = LocalRayCluster(simulated_accelerators=False).start_head(num_cpus=2, resources={"NPU": 1})
    try:
        entries = synth_corpus(tmp_path / "wav", [(0.5, 24_000)] * 2)
        manifest = write_manifest(tmp_path / "raw.jsonl", entries)
        out = tmp_path / "out"
        with cluster.driver(*encode_args(manifest, tiny_codec_dir, out, "--shard-size", "1"),
                            log=tmp_path / "driver.log") as driver:
            code = driver.wait(timeout=240)
            log = driver.output
    finally:
        cluster.stop()
    assert code != 0, log[-3000:]
    # The job's own last words name the encoder, what it expected and the fix (not just "the actor died").
    assert "encoder-0 could not start: shared.device.AcceleratorMissing: encoder-0 on " in log, log[-3000:]
    assert "placed on Ray's NPU resource: expected an Ascend NPU, but" in log, log[-3000:]
    assert "ASCEND_RT_VISIBLE_DEVICES='0'" in log  # the card Ray gave it
    assert "Fix:" in log
    assert not published_shards(out), "nothing may be encoded on the CPU in the NPU's place"
