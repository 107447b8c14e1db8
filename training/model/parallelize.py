"""FSDP2 sharding of the talker: each talker decoder layer, each code-predictor layer, then the root.

Parameters stay fp32 (the master weights AdamW updates); MixedPrecisionPolicy casts them to `param_dtype`
for compute and reduces gradients in `reduce_dtype`. Pure bf16 training (upstream) loses updates smaller
than half a bf16 ulp, which at lr 2e-6 is most of them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from shared.device import DeviceInfo
from training.config import FsdpConfig
from training.model.talker import TalkerForTraining

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_mesh(device: DeviceInfo) -> DeviceMesh:
    return init_device_mesh(device.kind, (dist.get_world_size(),), mesh_dim_names=("dp",))


def parallelize(module: TalkerForTraining, config: FsdpConfig, mesh: DeviceMesh) -> TalkerForTraining:
    talker = module.talker
    if config.activation_checkpointing:
        # transformers' per-layer checkpointing keeps parameter names unchanged (a wrapper module would not).
        talker.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = MixedPrecisionPolicy(param_dtype=DTYPE[config.param_dtype], reduce_dtype=DTYPE[config.reduce_dtype])
    for layer in [*talker.model.layers, *talker.code_predictor.model.layers]:
        fully_shard(layer, mesh=mesh, reshard_after_forward=config.reshard_after_forward, mp_policy=policy)
    # The root holds the embeddings (text 151936 x 2048 in 1.7B), projection, norms and heads; it is
    # gathered for the whole step anyway, so resharding it after forward would only add a gather.
    fully_shard(module, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    return module
