"""Device and collective-backend selection: Ascend NPU first, then CUDA, then CPU.

torch_npu is optional. Importing it on a machine without CANN breaks `import torch`, so it is only
imported when an NPU is plausibly present (an Ascend driver or visible-devices variable) or asked for.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DEVICE_CHOICES = ("auto", "npu", "cuda", "cpu")
BACKEND_FOR = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
# Ray's resource name for each accelerator kind (NPUs are a custom resource, GPUs are built in).
RAY_RESOURCE = {"npu": "NPU", "cuda": "GPU"}
# Environment variable through which Ray (and the Ascend runtime) restricts the visible devices.
VISIBLE_DEVICES_VAR = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "npu" | "cuda" | "cpu"
    index: int | None  # local index as torch sees it (after visible-devices masking)
    visible: str | None  # the visible-devices value this process was given, e.g. "3"

    @property
    def torch_device(self) -> torch.device:
        if self.kind == "cpu":
            return torch.device("cpu")
        return torch.device(self.kind, self.index or 0)

    @property
    def backend(self) -> str:
        return BACKEND_FOR[self.kind]

    def describe(self) -> str:
        if self.kind == "cpu":
            return "cpu"
        return f"{self.kind}:{self.index or 0} (physical {self.visible})" if self.visible else f"{self.kind}:{self.index or 0}"


def _npu_plausible() -> bool:
    return bool(os.environ.get("ASCEND_HOME_PATH") or os.path.exists("/usr/local/Ascend")
                or os.path.exists("/dev/davinci_manager"))


def npu_available() -> bool:
    """True when torch_npu imports and reports at least one device. Never raises."""
    if not _npu_plausible():
        return False
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except Exception:
        return False
    try:
        return bool(torch.npu.is_available()) and torch.npu.device_count() > 0
    except Exception:
        return False


def cuda_available() -> bool:
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:
        return False


def resolve_kind(preference: str = "auto") -> str:
    """Turn a preference into a concrete device kind, failing loudly when a named one is missing."""
    if preference not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {preference!r}")
    if preference == "npu" and not npu_available():
        raise RuntimeError("--device npu was requested but torch_npu/CANN found no NPU; "
                           "install the `npu` extra on an Ascend host or use --device auto")
    if preference == "cuda" and not cuda_available():
        raise RuntimeError("--device cuda was requested but torch sees no CUDA GPU; use --device auto or cpu")
    if preference != "auto":
        return preference
    if npu_available():
        return "npu"
    if cuda_available():
        return "cuda"
    return "cpu"


def select_device(preference: str = "auto", local_index: int | None = None) -> DeviceInfo:
    """Pick the device for this process.

    Under Ray, an actor that asked for one accelerator sees exactly one device (Ray sets the
    visible-devices variable), so local index 0 is the device Ray assigned. Under torchrun the
    caller passes LOCAL_RANK.
    """
    kind = resolve_kind(preference)
    if kind == "cpu":
        return DeviceInfo("cpu", None, None)
    visible = os.environ.get(VISIBLE_DEVICES_VAR[kind])
    index = local_index if local_index is not None else 0
    count = torch.npu.device_count() if kind == "npu" else torch.cuda.device_count()
    if index >= count:
        raise RuntimeError(f"{kind} index {index} requested but only {count} visible ({VISIBLE_DEVICES_VAR[kind]}={visible})")
    if kind == "npu":
        torch.npu.set_device(index)
    else:
        torch.cuda.set_device(index)
    return DeviceInfo(kind, index, visible)


def synchronize(dev: DeviceInfo) -> None:
    if dev.kind == "cuda":
        torch.cuda.synchronize()
    elif dev.kind == "npu":
        torch.npu.synchronize()


def peak_memory_bytes(dev: DeviceInfo) -> int:
    """Peak accelerator memory since start (or host RSS peak on CPU)."""
    if dev.kind == "cuda":
        return int(torch.cuda.max_memory_allocated())
    if dev.kind == "npu":
        return int(torch.npu.max_memory_allocated())
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
