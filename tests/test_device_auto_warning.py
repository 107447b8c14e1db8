"""--device auto on a cluster whose nodes have Ascend device files but no NPU resource in Ray: the driver warns
loudly, naming the node and the fix, before it runs CPU encoders (a real local Ray; the node's / is a fake
directory through QWEN3TTS_SYSROOT, which Ray's workers inherit)."""
import os
import subprocess
import sys

CODE = """
import pathlib, ray
from services.encode.dispatch import cluster_kind
ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
for case in ("cards", "none"):
    lines = []
    print("KIND", case, cluster_kind("auto", lines.append))
    print("LOG", case, *lines)
    for card in pathlib.Path(%r, "dev").glob("davinci[0-9]*"):
        card.unlink()  # the second case: a node without cards
ray.shutdown()
"""


def test_auto_warns_when_nodes_have_unregistered_ascend_cards(tmp_path):
    (tmp_path / "dev").mkdir()
    for name in ("davinci0", "davinci1", "davinci_manager"):
        (tmp_path / "dev" / name).touch()
    env = {**os.environ, "QWEN3TTS_SYSROOT": str(tmp_path), "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-c", CODE % str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env=env)
    lines = out.stdout.splitlines()
    assert "KIND cards cpu" in lines and "KIND none cpu" in lines, out.stderr[-3000:]
    warning = next(line for line in lines if line.startswith("LOG cards"))
    assert "WARNING: --device auto runs CPU encoders" in warning and "(2 cards)" in warning
    assert "source CANN before `ray start`" in warning and "--device cpu" in warning
    assert "LOG none" in lines  # no cards: CPU encoders are what the cluster offers, nothing to say
