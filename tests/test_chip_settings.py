"""Per-chip training settings: `auto` attention resolves to flash_attention_2 (transformers' route to torch_npu's
npu_fusion_attention) on an NPU computing in bf16/fp16, to a varlen path on CUDA and to sdpa elsewhere; an Ascend
chip without bf16 (910A) is refused before training, fp32 included (its fp32 matmuls read fp16 inputs)."""
import inspect

import pytest

from shared.device import DeviceInfo, UnsupportedPrecision, attention_for, check_training_precision, precision_problem
from training.config import load_config
from tests.test_training_config import CONFIGS

BF16_RUN = {"fsdp.param_dtype": "bfloat16", "fsdp.reduce_dtype": "float32"}


def test_shipped_1_7b_config_takes_varlen_attention_on_accelerators_and_sdpa_on_cpu():
    config = load_config(CONFIGS / "qwen3tts_1.7b.yaml")
    assert config.model.attn_implementation == "auto" and config.fsdp.param_dtype == "bfloat16"
    assert attention_for("auto", "npu", config.fsdp.param_dtype) == "flash_attention_2"
    assert config.for_chip(DeviceInfo("cpu", None, None)) == "sdpa"
    # CUDA takes a varlen path for packed rows: flash-attn's kernel when installed (half precision), else flex.
    assert attention_for("auto", "cuda", "bfloat16", flash_attn=False) == "flex_attention"
    assert attention_for("auto", "cuda", "bfloat16", flash_attn=True) == "flash_attention_2"
    assert attention_for("auto", "cuda", "float32", flash_attn=True) == "flex_attention"
    assert attention_for("auto", "cpu", "bfloat16") == "sdpa"
    with pytest.raises(ValueError, match="flex_attention trains on CUDA only.*Fix: model.attn_implementation=auto"):
        attention_for("flex_attention", "npu", "bfloat16")
    assert attention_for("auto", "npu", "float32") == "sdpa"  # the fused kernel takes half precision only
    assert attention_for("eager", "npu", "bfloat16") == "eager"  # an explicit choice is kept
    with pytest.raises(ValueError, match="flash_attention_3"):
        attention_for("flash_attention_3", "npu", "bfloat16")
    with pytest.raises(ValueError, match="model.attn_implementation must be one of"):
        load_config(CONFIGS / "qwen3tts_1.7b.yaml", ["model.attn_implementation=flash"])


def test_transformers_routes_flash_attention_2_to_npu_fusion_attention():
    """The pinned transformers (4.57.3) sends flash_attention_2 to its NPU integration when torch_npu is present;
    a transformers upgrade that drops the route must be noticed here, not on the cluster."""
    from transformers import modeling_flash_attention_utils, modeling_utils
    from transformers.integrations import npu_flash_attention

    assert "npu_flash_attn_varlen_func" in inspect.getsource(modeling_flash_attention_utils._lazy_imports)
    assert "npu_fusion_attention(" in inspect.getsource(npu_flash_attention.npu_flash_attn_varlen_func)
    assert 'input_layout="TND"' in inspect.getsource(npu_flash_attention.npu_flash_attn_varlen_func)
    # Loading with flash_attention_2 on an NPU does not ask for the flash-attn package.
    assert "is_torch_npu_available()" in inspect.getsource(modeling_utils.PreTrainedModel._flash_attn_2_can_dispatch)


def test_chip_without_bf16_is_refused_with_the_fix():
    problem = precision_problem("npu", "Ascend910A", False, BF16_RUN)
    assert problem and "910A" in problem and "Fix: train on an Ascend 910B or newer" in problem
    assert precision_problem("npu", "Ascend910B3", True, BF16_RUN) is None
    # fp32 is no fallback there: torch_npu computes fp32 matmuls from fp16 inputs on chips before 910B1.
    fp32 = precision_problem("npu", "Ascend910A", False, {"fsdp.param_dtype": "float32", "fsdp.reduce_dtype": "float32"})
    assert fp32 and "fp16 inputs" in fp32
    assert "`fsdp.param_dtype=float32`" in precision_problem("cuda", "Tesla V100", False, BF16_RUN)
    assert "Tesla V100" in precision_problem("cuda", "Tesla V100", False, BF16_RUN)
    check_training_precision(DeviceInfo("cpu", None, None), BF16_RUN)  # CPUs emulate bf16: nothing to refuse
    assert issubclass(UnsupportedPrecision, RuntimeError)
