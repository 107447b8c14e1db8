#!/usr/bin/env bash
# Fine-tune on the shards of an encode output directory, across nodes: run it on every node, each with its own
# NODE_RANK (0..NNODES-1) and the same MASTER_ADDR (node 0's address):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.5 deploy/train_on_shards.sh /data/shards [key=value ...]
# FOLLOW=1 starts while the encode service is still publishing (data.follow=true): training takes shards as
# they appear and ends once the encode output is complete and every shard was trained on.
# CONFIG picks the training config (default training/configs/qwen3tts_1.7b.yaml); key=value arguments override
# it (model.path=..., checkpoint.dir=...). Everything else is deploy/train.sh's environment: NPUS_PER_NODE,
# MASTER_PORT, TRAIN_DEVICE, TRAIN_PRINT_ONLY=1 (print the command instead of running it).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

fail() {
  echo "train_on_shards: error: $*" >&2
  exit 2
}

[ $# -ge 1 ] && [ "${1#*=}" = "$1" ] || fail "usage: deploy/train_on_shards.sh ENCODE_OUTPUT_DIR [key=value ...]"
# Absolute paths: deploy/train.sh runs from the repository root, whatever directory this was started in.
shards="$(realpath -m "$1")"
config="$(realpath -m "${CONFIG:-$repo/training/configs/qwen3tts_1.7b.yaml}")"
shift

overrides=("data.shards=$shards")
if [ "${FOLLOW:-0}" = 1 ]; then
  overrides+=("data.follow=true")  # the directory may not exist yet: the encode job creates it
elif [ ! -d "$shards" ]; then
  fail "$shards does not exist; point at the encode --output directory (or set FOLLOW=1 to wait for it)."
fi
# deploy/train.sh would default MASTER_ADDR to 127.0.0.1, where the other nodes would wait forever.
if [ "${NNODES:-1}" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  fail "NNODES=$NNODES: set MASTER_ADDR to the address of the node with NODE_RANK=0, the same on every node."
fi

# deploy/train.sh sources deploy/node_env.sh (CANN, the Ascend variables, the venv) itself.
exec bash "$repo/deploy/train.sh" "$config" "${overrides[@]}" "$@"
