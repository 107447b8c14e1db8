# Sourced (not run) on a cluster node before `ray start` or a training launch, by deploy/ray-cluster.yaml,
# deploy/train.sh and the steps of docs/scaling-out.md:
#   source deploy/node_env.sh
# It sets: on an Ascend node, CANN's environment and the runtime settings of deploy/ascend.env; everywhere,
# Ray token authentication and the project's virtual environment on PATH. Processes started afterwards
# (raylet, encoder actors, torchrun ranks) inherit all of it. It returns non-zero, with the reason, on a node
# that has Ascend devices (/dev/davinci*) but no CANN: torch_npu's autoload would otherwise break `import torch`
# on that node, and every encoder and rank there would fail later with a less helpful error.
#
#   ASCEND_SET_ENV         CANN's set_env.sh to source, when it is not in a standard place (must exist)
#   QWEN3TTS_SYSROOT       a directory standing in for / when looking for CANN and /dev/davinci* (tests)
#   QWEN3TTS_ENV_PRINT=1   print what was found and the Ascend variables now set
qwen3tts_deploy="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
qwen3tts_root="${QWEN3TTS_SYSROOT:-}"
qwen3tts_status=0

# CANN installs its environment script in one of two places: ascend-toolkit/ up to CANN 8.x, cann/ in the
# layout newer releases use. An explicit ASCEND_SET_ENV wins and must exist.
qwen3tts_cann_env=""
if [ -n "${ASCEND_SET_ENV:-}" ]; then
  if [ -f "$ASCEND_SET_ENV" ]; then
    qwen3tts_cann_env="$ASCEND_SET_ENV"
  else
    echo "node_env: ASCEND_SET_ENV=$ASCEND_SET_ENV does not exist; point it at CANN's set_env.sh" >&2
    qwen3tts_status=1
  fi
else
  for qwen3tts_candidate in "$qwen3tts_root/usr/local/Ascend/ascend-toolkit/set_env.sh" \
                            "$qwen3tts_root/usr/local/Ascend/cann/set_env.sh"; do
    if [ -f "$qwen3tts_candidate" ]; then
      qwen3tts_cann_env="$qwen3tts_candidate"
      break
    fi
  done
fi

qwen3tts_devices=0
for qwen3tts_candidate in "$qwen3tts_root"/dev/davinci[0-9]*; do
  if [ -e "$qwen3tts_candidate" ]; then qwen3tts_devices=$((qwen3tts_devices + 1)); fi
done
if [ -n "$qwen3tts_cann_env" ]; then
  # set_env.sh reads variables that may be unset: do not let a caller's `set -u` abort it halfway.
  case $- in *u*) set +u; source "$qwen3tts_cann_env"; set -u ;; *) source "$qwen3tts_cann_env" ;; esac
  # As deploy/train.sh does: a value the operator already exported wins over the file.
  while IFS='=' read -r qwen3tts_key qwen3tts_value; do
    case "$qwen3tts_key" in ''|\#*) continue ;; esac
    [ -n "${!qwen3tts_key+x}" ] || export "$qwen3tts_key=$qwen3tts_value"
  done < "$qwen3tts_deploy/ascend.env"
elif [ "$qwen3tts_status" = 0 ] && [ "$qwen3tts_devices" -gt 0 ]; then
  echo "node_env: this node has $qwen3tts_devices Ascend devices ($qwen3tts_root/dev/davinci*) but no CANN: neither" \
       "$qwen3tts_root/usr/local/Ascend/ascend-toolkit/set_env.sh nor $qwen3tts_root/usr/local/Ascend/cann/set_env.sh" \
       "exists. Install the CANN toolkit (docs/ascend.md) or set ASCEND_SET_ENV to its set_env.sh." >&2
  qwen3tts_status=1
fi

# Every Ray process on the node, and every `ray` CLI call, authenticates with the cluster token
# (RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token). Never switched off.
export RAY_AUTH_MODE=token

qwen3tts_venv="${QWEN3TTS_VENV:-$(dirname "$qwen3tts_deploy")/.venv}"
if [ -x "$qwen3tts_venv/bin/python" ]; then
  export PATH="$qwen3tts_venv/bin:$PATH"
fi

if [ "${QWEN3TTS_ENV_PRINT:-0}" = 1 ]; then
  echo "cann: ${qwen3tts_cann_env:-none}"
  echo "ascend devices: $qwen3tts_devices"
  env | grep -E '^(ASCEND_HOME_PATH|HCCL_|TASK_QUEUE_ENABLE|CPU_AFFINITY_CONF|PYTORCH_NPU_ALLOC_CONF|COMBINED_ENABLE|MULTI_STREAM_MEMORY_REUSE|ACLNN_CACHE_LIMIT|ASCEND_SLOG_PRINT_TO_STDOUT|ASCEND_GLOBAL_LOG_LEVEL)=' | sort || true
fi
unset qwen3tts_deploy qwen3tts_root qwen3tts_cann_env qwen3tts_candidate qwen3tts_devices qwen3tts_venv \
      qwen3tts_key qwen3tts_value
# The last command's status is what `source` returns: non-zero stops `source deploy/node_env.sh && ray start`.
[ "$qwen3tts_status" = 0 ] && unset qwen3tts_status || { unset qwen3tts_status; false; }
