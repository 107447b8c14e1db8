"""CPU binding of a process that drives one Ascend card, by the card's physical id.

torch_npu's own binding (CPU_AFFINITY_CONF with npu_affine) looks the affinity up by the *visible* device index,
without translating it through ASCEND_RT_VISIBLE_DEVICES. Every Ray encoder sees its one card as index 0, and a
training rank on cards 4-7 sees card 4 as index 0, so all of them were bound to card 0's cores. Here the
physical id is read from the visible-devices list and the process binds itself (every thread it has, and so
every thread it starts later) to its share of the cores next to that card:
- the cores next to each card come from `npu-smi info -t topo` (its "CPU Affinity" column, one range per card,
  usually shared by the cards of one NUMA node); cards sharing a range split it evenly, in id order;
- without npu-smi, the node's allowed cores are split evenly among the node's cards (/dev/davinciN), in id order.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

VISIBLE_VAR = "ASCEND_RT_VISIBLE_DEVICES"
TORCH_NPU_AFFINITY_VAR = "CPU_AFFINITY_CONF"


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus = []
    for part in filter(None, text.strip().split(",")):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def physical_card(visible: str | None, index: int) -> int:
    """The physical id of visible device `index` under ASCEND_RT_VISIBLE_DEVICES=`visible` (unset: the same)."""
    ids = [int(v) for v in (visible or "").split(",") if v.strip()]
    return ids[index] if ids else index


def parse_npu_smi_topology(text: str) -> dict[int, list[int]]:
    """card -> cores from `npu-smi info -t topo`: rows `NPU<n> ... <cpu list>` of its matrix."""
    affinity = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and re.fullmatch(r"NPU\d+", words[0]) and re.fullmatch(r"[\d,-]+", words[-1]):
            affinity[int(words[0][3:])] = parse_cpulist(words[-1])
    return affinity


@dataclass(frozen=True)
class NodeTopology:
    cards: list[int]  # physical ids of the node's cards
    cpus: list[int]  # the cores this process may use (its cpuset)
    card_affinity: dict[int, list[int]] = field(default_factory=dict)  # from npu-smi; empty when unknown

    def cores_for(self, card: int) -> list[int]:
        """The cores a process driving `card` binds to."""
        allowed = set(self.cpus)
        near = [c for c in self.card_affinity.get(card, []) if c in allowed]
        if near:
            sharing = sorted(k for k, cores in self.card_affinity.items()
                             if [c for c in cores if c in allowed] == near)
            return _share(near, sharing.index(card), len(sharing))
        if card not in self.cards:
            raise ValueError(f"card {card} is not among this node's cards {self.cards}")
        return _share(sorted(allowed), sorted(self.cards).index(card), len(self.cards))


def _share(cores: list[int], position: int, parts: int) -> list[int]:
    """Slice `position` of `cores` cut into `parts` near-equal contiguous slices (never empty)."""
    if parts >= len(cores):
        return [cores[position % len(cores)]]
    return cores[position * len(cores) // parts:(position + 1) * len(cores) // parts]


def read_topology(sysroot: str = "") -> NodeTopology:
    cards = sorted(int(p.name[len("davinci"):]) for p in Path(f"{sysroot}/dev").glob("davinci*")
                   if p.name[len("davinci"):].isdigit())
    try:
        text = subprocess.run(["npu-smi", "info", "-t", "topo"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    return NodeTopology(cards, sorted(os.sched_getaffinity(0)), parse_npu_smi_topology(text))


def bind_threads(cores: list[int]) -> None:
    """Bind every thread of this process (threads started later inherit the binding of their creator)."""
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cores)
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            pass


def torch_npu_binds_by_visible_index(environ=os.environ) -> bool:
    """True when torch_npu is set to bind by topology while this process sees a renumbered subset of cards:
    the case it gets wrong (it would bind to the cores of the card whose physical id is the visible index)."""
    conf, visible = environ.get(TORCH_NPU_AFFINITY_VAR, ""), environ.get(VISIBLE_VAR)
    ids = [int(v) for v in (visible or "").split(",") if v.strip()]
    return "npu_affine" in conf and bool(ids) and ids != list(range(len(ids)))


def bind_to_card(index: int, log=print, topology: NodeTopology | None = None) -> list[int] | None:
    """Bind this process to its share of the cores next to the physical card behind visible index `index`.
    Left to torch_npu when CPU_AFFINITY_CONF is set and binds correctly; returns the cores bound to, or None."""
    if os.environ.get(TORCH_NPU_AFFINITY_VAR) and not torch_npu_binds_by_visible_index():
        return None
    if os.environ.get(TORCH_NPU_AFFINITY_VAR):
        log(f"warning: {TORCH_NPU_AFFINITY_VAR}={os.environ[TORCH_NPU_AFFINITY_VAR]} with {VISIBLE_VAR}="
            f"{os.environ[VISIBLE_VAR]} binds by the visible index (to card {index}'s cores); binding by the "
            f"physical card instead. Fix: leave {TORCH_NPU_AFFINITY_VAR} unset (deploy/ascend.env does)")
    card = physical_card(os.environ.get(VISIBLE_VAR), index)
    topology = topology or read_topology(os.environ.get("QWEN3TTS_SYSROOT", ""))
    cores = topology.cores_for(card)
    bind_threads(cores)
    return cores
