#!/usr/bin/env bash
# Launch FSDP2 training on one or many nodes:
#   bash deploy/train.sh CONFIG [key=value ...]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.5 bash deploy/train.sh training/configs/qwen3tts_1.7b.yaml data.shards=/data/out
# Run the same command on every node with its own NODE_RANK. Environment:
#   NPUS_PER_NODE  ranks on this node (default: the accelerators torch sees; 1 on CPU)
#   NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500)
#   TRAIN_DEVICE   auto|npu|cuda|cpu (default auto: npu on a node with Ascend devices, which must then work;
#                  elsewhere CUDA, then CPU; shared.device decides)
#   MAX_RESTARTS   torchrun restarts of a failed rank group, each resuming from the last checkpoint (default 3)
#   TRAIN_CPU_AFFINITY_CONF  torch_npu CPU binding of the ranks (default 2,npu_affine:1 when every card is
#                  visible, else each rank binds by its physical card; see below)
#   TRAIN_PRINT_ONLY=1  print the Ascend environment and the torchrun command instead of running it (with
#                  TRAIN_DEVICE set, torch is not asked at all: nothing runs)
# It sources deploy/node_env.sh first (CANN, deploy/ascend.env, the venv); that fails on a node that has Ascend
# devices but no CANN. On an NPU the Ascend runtime variables are set (values already in the environment win):
# the shared ones from deploy/ascend.env plus the training-only ones below; docs/ascend.md explains each.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash deploy/train.sh CONFIG [key=value ...]" >&2; exit 2; }
config="$1"; shift
source deploy/node_env.sh
python_bin="${PYTHON:-python}"

preference="${TRAIN_DEVICE:-auto}"
if [ "$preference" = auto ] && compgen -G "${QWEN3TTS_SYSROOT:-}/dev/davinci[0-9]*" > /dev/null; then
  preference=npu  # an Ascend node trains on its NPUs or fails saying why, never quietly on the CPU
fi
if [ "${TRAIN_PRINT_ONLY:-0}" = 1 ] && [ "$preference" != auto ]; then
  kind="$preference"
else
  kind="$("$python_bin" -c 'import sys; from shared.device import resolve_kind; print(resolve_kind(sys.argv[1]))' \
          "$preference")"
fi

# The prefetch thread tokenizes while the step runs: HF tokenizers' own thread pool would then be forked into
# the data-loading workers or contend with the step's threads, and it warns on every fork.
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
if [ "$kind" = npu ]; then
  # Shared runtime settings (HCCL_CONNECT_TIMEOUT, PYTORCH_NPU_ALLOC_CONF, TASK_QUEUE_ENABLE, CPU_AFFINITY_CONF,
  # COMBINED_ENABLE, CANN log settings), exported only where the caller has not set them.
  while IFS='=' read -r key value; do
    case "$key" in ''|\#*) continue ;; esac
    [ -n "${!key+x}" ] || export "$key=$value"
  done < deploy/ascend.env
  # Asynchronous kernel launches (1 = synchronous, for debugging a failing operator only; it also disables
  # the task queue and costs a large share of throughput).
  export ASCEND_LAUNCH_BLOCKING="${ASCEND_LAUNCH_BLOCKING:-0}"
  # CPU binding of each rank. torch_npu's topology binding (npu_affine:1, mode 2: main and task-queue threads on
  # fixed cores) looks the cores up by the visible index, right only when the ranks see every card: with
  # ASCEND_RT_VISIBLE_DEVICES=4,5,6,7 it would bind rank 0 (card 4) to card 0's cores. So it is the default
  # only without that variable; with it, each rank binds itself by its physical card (shared/cpu_affinity.py).
  # TRAIN_CPU_AFFINITY_CONF overrides, e.g. explicit ranges per visible index: 2,npu0:0-23,npu1:24-47.
  if [ -n "${TRAIN_CPU_AFFINITY_CONF:-}" ]; then
    export CPU_AFFINITY_CONF="$TRAIN_CPU_AFFINITY_CONF"
  elif [ -z "${ASCEND_RT_VISIBLE_DEVICES:-}" ]; then
    export CPU_AFFINITY_CONF="2,npu_affine:1"
  fi
  # MB of HCCL buffer per communicator (default 200). FSDP2 all-gathers a whole decoder layer's parameters
  # and reduce-scatters its gradients in one collective; a buffer at least that size (a 1.7B talker layer is
  # ~100 MB in bf16) avoids splitting each collective into several rounds.
  export HCCL_BUFFSIZE="${HCCL_BUFFSIZE:-400}"
  # Seconds a started collective may wait for its peers (default 1800). A rank that is slow to publish its
  # checkpoint shard or to read a new round of shards must not kill the others.
  export HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1800}"
fi

if [ -z "${NPUS_PER_NODE:-}" ] && [ "${TRAIN_PRINT_ONLY:-0}" = 1 ] && [ "$kind" = npu ]; then
  NPUS_PER_NODE="$({ compgen -G "${QWEN3TTS_SYSROOT:-}/dev/davinci[0-9]*" || true; } | wc -l)"  # torch not asked
elif [ -z "${NPUS_PER_NODE:-}" ]; then
  NPUS_PER_NODE="$("$python_bin" -c '
import sys, torch
from shared.device import resolve_kind
kind = resolve_kind(sys.argv[1])
print({"npu": lambda: torch.npu.device_count(), "cuda": torch.cuda.device_count}.get(kind, lambda: 1)())' \
    "$kind")"
fi
command=("$python_bin" -m torch.distributed.run --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}"
         --nproc_per_node "$NPUS_PER_NODE" --master_addr "${MASTER_ADDR:-127.0.0.1}"
         --master_port "${MASTER_PORT:-29500}" --max-restarts "${MAX_RESTARTS:-3}" -m training.train --config "$config" "$@"
         "train.device=$kind")

if [ "${TRAIN_PRINT_ONLY:-0}" = 1 ]; then
  echo "device: $kind"
  env | grep -E '^(HCCL_|ASCEND_|TASK_QUEUE_ENABLE|TOKENIZERS_PARALLELISM|NPU_ASD_ENABLE|CPU_AFFINITY_CONF|PYTORCH_NPU_ALLOC_CONF|COMBINED_ENABLE|MULTI_STREAM_MEMORY_REUSE|ACLNN_CACHE_LIMIT)' | sort || true
  printf '%q ' "${command[@]}"; echo
  exit 0
fi
exec "${command[@]}"
