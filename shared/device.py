"""Device and collective-backend selection: Ascend NPU first, then CUDA, then CPU.

torch_npu is optional. Importing it on a machine without CANN breaks `import torch`, so it is only
imported when an NPU is plausibly present (an Ascend driver or visible-devices variable) or asked for.
torch itself is imported by the functions that use it: the encode driver needs this module's names but never
torch, whose import (~2 s of a core) would slow Ray's start beside it and whose teardown costs ~0.6 s at exit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    simulated: str | None = None  # the accelerator kind a CPU stands in for (SIMULATED_ACCELERATORS_VAR)

    @property
    def torch_device(self) -> torch.device:
        import torch
        if self.kind == "cpu":
            return torch.device("cpu")
        return torch.device(self.kind, self.index or 0)

    @property
    def backend(self) -> str:
        return BACKEND_FOR[self.kind]

    def describe(self) -> str:
        if self.simulated:
            return f"cpu (simulating {self.simulated} {self.visible})"
        if self.kind == "cpu":
            return "cpu"
        return f"{self.kind}:{self.index or 0} (physical {self.visible})" if self.visible else f"{self.kind}:{self.index or 0}"


# Set on the Ray nodes of tests that fake accelerators (`ray start --resources '{"NPU": 2}'` on a CPU machine):
# encoders placed for those fake cards encode on the CPU and say so. Never set on a real cluster.
SIMULATED_ACCELERATORS_VAR = "QWEN3TTS_SIMULATED_ACCELERATORS"
ACCELERATOR_NAME = {"npu": "an Ascend NPU", "cuda": "a CUDA GPU"}
ON_THE_CPU = "or run on the CPU instead (encode: --device cpu; training: TRAIN_DEVICE=cpu)"
FIX_FOR_MISSING = {
    "npu": "on that node source CANN's set_env.sh before `ray start` or training (deploy/node_env.sh does), "
           "install the project with the npu extra (QWEN3TTS_EXTRAS=npu bash deploy/setup.sh) and check the card "
           f"with `npu-smi info`; {ON_THE_CPU}",
    "cuda": f"on that node install a CUDA build of torch and check the card with `nvidia-smi`; {ON_THE_CPU}",
}


class AcceleratorMissing(RuntimeError):
    """A process was meant for an accelerator that torch cannot use here."""


def _npu_plausible() -> bool:
    return bool(os.environ.get("ASCEND_HOME_PATH") or os.path.exists("/usr/local/Ascend")
                or os.path.exists("/dev/davinci_manager"))


def npu_missing_reason() -> str | None:
    """None when torch_npu imports and sees at least one NPU; else what is missing (for error messages)."""
    if not _npu_plausible():
        return "this node has no Ascend driver or CANN (no /dev/davinci_manager, /usr/local/Ascend or ASCEND_HOME_PATH)"
    import torch

    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except Exception as exc:
        return f"`import torch_npu` failed ({type(exc).__name__}: {exc})"
    try:
        count = torch.npu.device_count() if torch.npu.is_available() else 0
    except Exception as exc:
        return f"torch.npu failed ({type(exc).__name__}: {exc})"
    return None if count > 0 else "torch_npu imports but sees no NPU"


def cuda_missing_reason() -> str | None:
    import torch
    try:
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return None
    except Exception as exc:
        return f"torch.cuda failed ({type(exc).__name__}: {exc})"
    return f"torch {torch.__version__} sees no CUDA GPU"


def npu_available() -> bool:
    """True when torch_npu imports and reports at least one device. Never raises."""
    return npu_missing_reason() is None


def cuda_available() -> bool:
    return cuda_missing_reason() is None


def missing_accelerator(kind: str, what: str) -> AcceleratorMissing:
    """The error for `what` (e.g. "device 'npu' requested"), which needs an accelerator of `kind` that torch
    cannot use here: what was expected, what was found, and the fix."""
    reason = npu_missing_reason() if kind == "npu" else cuda_missing_reason()
    var = VISIBLE_DEVICES_VAR[kind]
    return AcceleratorMissing(f"{what}: expected {ACCELERATOR_NAME[kind]}, but {reason} ({var}="
                              f"{os.environ.get(var)!r}). Fix: {FIX_FOR_MISSING[kind]}")


def resolve_kind(preference: str = "auto") -> str:
    """Turn a preference into a concrete device kind, failing loudly when a named one is missing."""
    if preference not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {preference!r}")
    if preference in ACCELERATOR_NAME and not (npu_available() if preference == "npu" else cuda_available()):
        raise missing_accelerator(preference, f"device {preference!r} requested")
    if preference != "auto":
        return preference
    if npu_available():
        return "npu"
    if cuda_available():
        return "cuda"
    return "cpu"


def placed_device(kind: str, placed_as: str) -> DeviceInfo:
    """The device of a process that was given an accelerator of `kind` (the cluster's kind, decided by whoever
    placed it): that accelerator or an AcceleratorMissing, never a quiet fallback to the CPU while the card it
    reserved sits idle. `placed_as` names the process in the error ("encoder-3 on node 10.0.0.7")."""
    if kind == "cpu":
        return DeviceInfo("cpu", None, None)
    if os.environ.get(SIMULATED_ACCELERATORS_VAR) == "1":
        return DeviceInfo("cpu", None, os.environ.get(VISIBLE_DEVICES_VAR[kind]), simulated=kind)
    if kind not in ACCELERATOR_NAME:
        raise ValueError(f"unknown accelerator kind {kind!r}; expected one of {tuple(ACCELERATOR_NAME)} or cpu")
    if not (npu_available() if kind == "npu" else cuda_available()):
        raise missing_accelerator(kind, f"{placed_as}, placed on Ray's {RAY_RESOURCE[kind]} resource")
    return select_device(kind)


def select_device(preference: str = "auto", local_index: int | None = None) -> DeviceInfo:
    """Pick the device for this process.

    Under Ray, an actor that asked for one accelerator sees exactly one device (Ray sets the
    visible-devices variable), so local index 0 is the device Ray assigned. Under torchrun the
    caller passes LOCAL_RANK.
    """
    import torch
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
        from shared.cpu_affinity import bind_to_card
        bind_to_card(index)  # by the physical card id, which torch_npu's own binding does not translate to
    else:
        torch.cuda.set_device(index)
    return DeviceInfo(kind, index, visible)


def synchronize(dev: DeviceInfo) -> None:
    import torch
    if dev.kind == "cuda":
        torch.cuda.synchronize()
    elif dev.kind == "npu":
        torch.npu.synchronize()


def peak_memory_bytes(dev: DeviceInfo) -> int:
    """Peak accelerator memory since start (or host RSS peak on CPU)."""
    import torch
    if dev.kind == "cuda":
        return int(torch.cuda.max_memory_allocated())
    if dev.kind == "npu":
        return int(torch.npu.max_memory_allocated())
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass(frozen=True)
class CodecNumerics:
    """How the codec's arithmetic runs on a device: recorded in plan.json so shards encoded on different hardware
    are visible. The codec always runs in fp32 with the reduced-precision fp32 modes off (HF32 on Ascend, TF32 on
    CUDA): those round the inputs of convolutions/matmuls to a ~10-bit mantissa, which moves the codec's
    nearest-codebook choices and would make codes depend on which machine encoded a shard."""
    device_kind: str
    dtype: str = "float32"
    conv_reduced_fp32: bool = False  # HF32 (npu) / TF32 (cuda) in convolutions; fp16 inputs on Ascend before 910B
    matmul_reduced_fp32: bool = False  # the same for matmuls
    fp32_inputs: str = "float32"  # what fp32 convolutions/matmuls really read: "float16" on Ascend before 910B

    def differs_from(self, other: "CodecNumerics") -> list[str]:
        return [f"{name} {getattr(other, name)} -> {getattr(self, name)}" for name in self.__dataclass_fields__
                if getattr(self, name) != getattr(other, name)]


def codec_numerics(kind: str) -> CodecNumerics:
    """The numerics the codec runs with on `kind` (what apply_codec_numerics sets there)."""
    return CodecNumerics(kind)


# Chips before Ascend910B1 (910A, 310P) have fp16 cube units only: torch_npu feeds fp32 convolutions and matmuls to
# them as fp16 inputs whatever the HF32 switches say. The same chips lack bf16, so torch.npu.is_bf16_supported()
# tells them apart (the test training's precision check uses).
FP16_INPUTS = CodecNumerics("npu", conv_reduced_fp32=True, matmul_reduced_fp32=True, fp32_inputs="float16")
ALLOW_REDUCED_FLAG = "--allow-reduced-codec-precision"


def npu_codec_numerics(device_name: str, bf16_supported: bool, allow_reduced: bool) -> CodecNumerics:
    """The codec's numerics on an Ascend chip, or UnsupportedPrecision (with the fix) on a chip that computes fp32
    from fp16 inputs, unless the user accepted that."""
    if bf16_supported:
        return CodecNumerics("npu")
    if not allow_reduced:
        raise UnsupportedPrecision(
            f"{device_name} (before Ascend910B1: 910A, 310P) computes fp32 convolutions and matmuls from fp16 "
            "inputs, so the codec's codes would depend on the chip. Fix: encode on an Ascend 910B or newer, a GPU "
            f"or the CPU, or pass {ALLOW_REDUCED_FLAG} to accept it (plan.json then records fp32_inputs float16)")
    return FP16_INPUTS


def apply_codec_numerics(dev: DeviceInfo, allow_reduced: bool = False) -> CodecNumerics:
    """Switch this process's reduced-precision fp32 modes off and return what is in effect, read back from torch.

    torch_npu turns HF32 on for fp32 convolutions by default (torch.npu.conv.allow_hf32 = True; matmul HF32 is
    off by default); CUDA turns TF32 on for cuDNN convolutions (torch.backends.cudnn.allow_tf32 = True).
    """
    import torch
    if dev.kind == "npu":
        chip = npu_codec_numerics(torch.npu.get_device_name(dev.index or 0), bool(torch.npu.is_bf16_supported()),
                                  allow_reduced)
        torch.npu.conv.allow_hf32 = False
        torch.npu.matmul.allow_hf32 = False
        if chip == FP16_INPUTS:
            return chip  # the switches cannot lift what the chip does
        now = CodecNumerics("npu", conv_reduced_fp32=bool(torch.npu.conv.allow_hf32),
                            matmul_reduced_fp32=bool(torch.npu.matmul.allow_hf32))
    elif dev.kind == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        now = CodecNumerics("cuda", conv_reduced_fp32=torch.backends.cudnn.allow_tf32,
                            matmul_reduced_fp32=torch.backends.cuda.matmul.allow_tf32)
    else:
        now = CodecNumerics("cpu")
    if now != codec_numerics(now.device_kind):
        raise RuntimeError(f"could not switch the codec's reduced-precision fp32 modes off on {dev.describe()}: "
                           f"{now}; check the torch/torch_npu versions against docs/ascend.md")
    return now


# ------------------------------------------------------------------------------------------ training per chip

ATTENTION_CHOICES = ("auto", "eager", "sdpa", "flex_attention", "flash_attention_2")
HALF_DTYPES = ("bfloat16", "float16")


class UnsupportedPrecision(RuntimeError):
    """The chip cannot compute in the dtype the training config asks for."""


def flash_attn_installed() -> bool:
    """True when the flash-attn package (CUDA's flash_attention_2 kernels) can be imported; never imports it."""
    import importlib.util
    return importlib.util.find_spec("flash_attn") is not None


def attention_for(requested: str, kind: str, compute_dtype: str, flash_attn: bool | None = None) -> str:
    """The attention implementation training loads the model with; `auto` picks per device.

    Packed rows need a varlen path: sdpa and eager get a dense (B, 1, L, L) block-diagonal mask from the position
    ids, which computes every pair (most of them between different utterances at pack_length 4096) and, on CUDA,
    rules out sdpa's flash kernel and its GQA path.
    - NPU, bf16/fp16: transformers' "flash_attention_2" runs torch_npu's npu_fusion_attention in varlen ("TND")
      form. The fused kernel takes half precision only, so fp32 compute (e.g. a 910A) keeps sdpa.
    - CUDA: "flash_attention_2" (flash-attn's varlen kernel on cu_seq_lens) when that package is installed and
      compute is half precision; otherwise "flex_attention", torch's own kernel over a block mask that skips the
      tiles between utterances (compiled with torch.compile on first use).
    - CPU: sdpa (inductor compiles flex attention's forward only on CPU, not its backward).
    `flash_attn` says whether flash-attn is installed (looked up when None).
    """
    if requested not in ATTENTION_CHOICES:
        raise ValueError(f"model.attn_implementation must be one of {ATTENTION_CHOICES}, got {requested!r}")
    if requested == "flex_attention" and kind != "cuda":
        raise ValueError(f"model.attn_implementation=flex_attention trains on CUDA only (this is {kind}: "
                         "torch compiles no flex backward for it). Fix: model.attn_implementation=auto")
    if requested != "auto":
        return requested
    half = compute_dtype in HALF_DTYPES
    if kind == "npu":
        return "flash_attention_2" if half else "sdpa"
    if kind == "cuda":
        has_flash = flash_attn_installed() if flash_attn is None else flash_attn
        return "flash_attention_2" if half and has_flash else "flex_attention"
    return "sdpa"


def precision_problem(kind: str, device_name: str, bf16_supported: bool, dtypes: dict[str, str]) -> str | None:
    """Why this chip cannot train with `dtypes` ({"fsdp.param_dtype": "bfloat16", ...}), with the fix; None if
    it can."""
    if kind == "npu" and not bf16_supported:  # whatever the dtypes: fp32 is no fallback on these chips
        return (f"{device_name} (before Ascend910B1: 910A, 310P) cannot train here: it has no bf16 units, and "
                "torch_npu computes fp32 matmuls and convolutions from fp16 inputs, so fp32 would really be fp16 "
                "without the loss scaling this trainer does not do. Fix: train on an Ascend 910B or newer, a GPU "
                "or the CPU")
    asked = [key for key, dtype in dtypes.items() if dtype == "bfloat16"]
    if not asked or bf16_supported or kind == "cpu":
        return None
    settings = " ".join(f"{key}=float32" for key in asked)
    return (f"{', '.join(asked)}=bfloat16 but {device_name} cannot compute in bf16. Fix: train in fp32, e.g. "
            f"append `{settings}` to the deploy/train.sh command (or set it in the config); float16 runs too but "
            "this trainer does no loss scaling, so small gradients underflow")


def check_training_precision(dev: DeviceInfo, dtypes: dict[str, str]) -> None:
    """Fail before the model is loaded when the chip lacks a dtype the config asks for, instead of a kernel error
    at the first step."""
    import torch
    if dev.kind == "npu":
        supported, name = bool(torch.npu.is_bf16_supported()), torch.npu.get_device_name(dev.index or 0)
    elif dev.kind == "cuda":
        supported, name = bool(torch.cuda.is_bf16_supported()), torch.cuda.get_device_name(dev.index or 0)
    else:
        return
    problem = precision_problem(dev.kind, name, supported, dtypes)
    if problem:
        raise UnsupportedPrecision(problem)
