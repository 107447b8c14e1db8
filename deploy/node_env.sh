# Sourced (not run) on a cluster node before `ray start` or a training launch, by deploy/ray-cluster.yaml,
# deploy/train_on_shards.sh and the steps of README.md ("Scaling out"):
#   source deploy/node_env.sh
# It sets: on an Ascend node (CANN installed), CANN's environment and the runtime settings of
# deploy/ascend.env; everywhere, Ray token authentication and the project's virtual environment on PATH.
# Processes started afterwards (raylet, encoder actors, torchrun ranks) inherit all of it.
qwen3tts_deploy="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

qwen3tts_cann_env="${ASCEND_SET_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}"
if [ -f "$qwen3tts_cann_env" ]; then
  # set_env.sh reads variables that may be unset: do not let a caller's `set -u` abort it halfway.
  case $- in *u*) set +u; source "$qwen3tts_cann_env"; set -u ;; *) source "$qwen3tts_cann_env" ;; esac
  # As deploy/train.sh does: a value the operator already exported wins over the file.
  while IFS='=' read -r qwen3tts_key qwen3tts_value; do
    case "$qwen3tts_key" in ''|\#*) continue ;; esac
    [ -n "${!qwen3tts_key+x}" ] || export "$qwen3tts_key=$qwen3tts_value"
  done < "$qwen3tts_deploy/ascend.env"
fi

# Every Ray process on the node, and every `ray` CLI call, authenticates with the cluster token
# (RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token). Never switched off.
export RAY_AUTH_MODE=token

qwen3tts_venv="${QWEN3TTS_VENV:-$(dirname "$qwen3tts_deploy")/.venv}"
if [ -x "$qwen3tts_venv/bin/python" ]; then
  export PATH="$qwen3tts_venv/bin:$PATH"
fi
unset qwen3tts_deploy qwen3tts_cann_env qwen3tts_venv qwen3tts_key qwen3tts_value
