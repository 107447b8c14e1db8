"""CPU binding by the physical Ascend card on fake topologies: every encoder of a node (each sees its card as
visible index 0) and every rank on a subset of cards gets the cores next to its own card, not card 0's."""
import os
import subprocess
import sys

import pytest

from shared.cpu_affinity import (NodeTopology, parse_cpulist, parse_npu_smi_topology, physical_card,
                                 torch_npu_binds_by_visible_index)

# `npu-smi info -t topo` of an 8-card, 192-core server: two cards per 48-core NUMA node.
TOPO = """\
           NPU0       NPU1       NPU2       NPU3       NPU4       NPU5       NPU6       NPU7       CPU Affinity
NPU0       X          HCCS       HCCS       HCCS       HCCS       HCCS       HCCS       HCCS       0-47
NPU1       HCCS       X          HCCS       HCCS       HCCS       HCCS       HCCS       HCCS       0-47
NPU2       HCCS       HCCS       X          HCCS       HCCS       HCCS       HCCS       HCCS       48-95
NPU3       HCCS       HCCS       HCCS       X          HCCS       HCCS       HCCS       HCCS       48-95
NPU4       HCCS       HCCS       HCCS       HCCS       X          HCCS       HCCS       HCCS       96-143
NPU5       HCCS       HCCS       HCCS       HCCS       HCCS       X          HCCS       HCCS       96-143
NPU6       HCCS       HCCS       HCCS       HCCS       HCCS       HCCS       X          HCCS       144-191
NPU7       HCCS       HCCS       HCCS       HCCS       HCCS       HCCS       HCCS       X          144-191

Legend:
  X    = Self
  HCCS = Connection traversing HCCS.
"""


def test_each_encoder_binds_next_to_its_own_card_from_npu_smi():
    topology = NodeTopology(list(range(8)), list(range(192)), parse_npu_smi_topology(TOPO))
    # Ray gives encoder k the card k: ASCEND_RT_VISIBLE_DEVICES=k, visible index 0 in every one of them.
    cores = [topology.cores_for(physical_card(str(k), 0)) for k in range(8)]
    assert cores[0] == list(range(0, 24)) and cores[1] == list(range(24, 48))  # two cards share a NUMA node
    assert cores[5] == list(range(120, 144)) and cores[7] == list(range(168, 192))
    assert sorted(c for cs in cores for c in cs) == list(range(192))  # disjoint, the whole node used
    # torch_npu's npu_affine binding would have looked up index 0 for all eight: card 0's cores.
    assert len({tuple(c) for c in cores}) == 8


def test_training_ranks_on_a_subset_of_cards_bind_by_physical_card():
    topology = NodeTopology(list(range(8)), list(range(192)), parse_npu_smi_topology(TOPO))
    visible = "4,5,6,7"
    assert [physical_card(visible, rank) for rank in range(4)] == [4, 5, 6, 7]
    assert topology.cores_for(physical_card(visible, 0)) == list(range(96, 120))
    assert torch_npu_binds_by_visible_index({"CPU_AFFINITY_CONF": "2,npu_affine:1", "ASCEND_RT_VISIBLE_DEVICES": visible})
    assert not torch_npu_binds_by_visible_index({"CPU_AFFINITY_CONF": "2,npu_affine:1"})  # all cards visible
    assert not torch_npu_binds_by_visible_index({"CPU_AFFINITY_CONF": "2,npu_affine:1",
                                                 "ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3"})


def test_without_npu_smi_the_pods_cores_split_evenly_by_card():
    """A pod's cpuset (here 176 of 192 cores, not contiguous) and /dev/davinci0-7, no topology tool."""
    allowed = parse_cpulist("0-87,96-183")
    topology = NodeTopology(list(range(8)), allowed)
    cores = [topology.cores_for(k) for k in range(8)]
    assert all(len(c) == 22 for c in cores) and sorted(sum(cores, [])) == allowed
    assert cores[4][0] == 96  # the second socket's block
    # A topology range partly outside the cpuset is cut to it before it is shared.
    cut = NodeTopology([0, 1], list(range(10)), {0: list(range(20)), 1: list(range(20))})
    assert cut.cores_for(0) == [0, 1, 2, 3, 4] and cut.cores_for(1) == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="card 9 is not among"):
        NodeTopology([0, 1], [0, 1]).cores_for(9)
    assert NodeTopology([0, 1, 2], [0, 1]).cores_for(2) == [0]  # more cards than cores: never empty


def test_a_process_binds_every_thread_it_has(tmp_path):
    """In a child: a thread started before binding is bound too, and one started after inherits it."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two usable cores to tell the cards apart")
    code = """
import os, threading, time
from shared.cpu_affinity import NodeTopology, bind_to_card
early = []
t = threading.Thread(target=lambda: (time.sleep(0.5), early.append(os.sched_getaffinity(0)))); t.start()
allowed = sorted(os.sched_getaffinity(0))[:2]
os.environ["ASCEND_RT_VISIBLE_DEVICES"] = "1"
cores = bind_to_card(0, topology=NodeTopology([0, 1], allowed))
t.join()
late = []
u = threading.Thread(target=lambda: late.append(os.sched_getaffinity(0))); u.start(); u.join()
print(cores == [allowed[1]], early[0] == {allowed[1]}, late[0] == {allowed[1]}, os.sched_getaffinity(0) == {allowed[1]})
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True"] * 4, out.stderr
