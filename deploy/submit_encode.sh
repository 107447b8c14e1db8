#!/usr/bin/env bash
# Submit the encode service to a running Ray cluster as a Ray job; arguments go to `python -m services.encode`:
#   HEAD=10.0.0.1 deploy/submit_encode.sh --manifest /data/train_raw.jsonl \
#       --codec /models/Qwen3-TTS-Tokenizer-12Hz --output /data/shards [--status-token-file F ...]
# Environment: HEAD (the head node's address) and DASHBOARD_PORT (8265), or RAY_DASHBOARD_ADDRESS
# (http://host:port) instead of both; NO_WAIT=1 returns once the job is accepted instead of following its log.
# The cluster's token: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

fail() {
  echo "submit_encode: error: $*" >&2
  exit 2
}

# Ray 2.60 clusters authenticate every connection; switching authentication off on the client is never the fix.
case "${RAY_AUTH_MODE:-token}" in
  token) ;;
  disabled) fail "RAY_AUTH_MODE is 'disabled': refusing to submit without token authentication. The cluster" \
                 "runs with token authentication; unset RAY_AUTH_MODE (or set it to token) and provide its token." ;;
  *) fail "RAY_AUTH_MODE is '$RAY_AUTH_MODE': this script only submits with token authentication (token)." ;;
esac
export RAY_AUTH_MODE=token

# The same order Ray reads them in, so the check and Ray agree on which token is used.
if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
  :
elif [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then
  [ -s "$RAY_AUTH_TOKEN_PATH" ] && [ -r "$RAY_AUTH_TOKEN_PATH" ] ||
    fail "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is not a readable, non-empty token file."
elif [ ! -s "$HOME/.ray/auth_token" ]; then
  fail "no Ray token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it, or copy the cluster's" \
       "token to ~/.ray/auth_token (on the head node: \`ray get-auth-token\`)."
fi

if [ -n "${RAY_DASHBOARD_ADDRESS:-}" ]; then
  address="$RAY_DASHBOARD_ADDRESS"
elif [ -n "${HEAD:-}" ]; then
  address="http://$HEAD:${DASHBOARD_PORT:-8265}"
else
  fail "set HEAD to the head node's address (or RAY_DASHBOARD_ADDRESS to http://host:port)."
fi

# A status server reachable from the network must ask for a token: the job's status (paths, hosts, errors)
# is not for anyone who can reach the head node.
status_host=127.0.0.1 status_token=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --status-host) status_host="${args[i + 1]:-}" ;;
    --status-host=*) status_host="${args[i]#*=}" ;;
    --status-token-file) status_token="${args[i + 1]:-}" ;;
    --status-token-file=*) status_token="${args[i]#*=}" ;;
  esac
done
case "$status_host" in
  127.*|localhost|::1) ;;
  *) [ -n "$status_token" ] || fail "--status-host $status_host serves /status beyond this machine: add" \
                                   "--status-token-file (a token file on the head node)." ;;
esac

submit=(ray job submit --address "$address" --working-dir "$repo")
[ "${NO_WAIT:-0}" = 1 ] && submit+=(--no-wait)
echo "submit_encode: submitting to $address (token authentication on)" >&2
exec "${submit[@]}" -- python -m services.encode "$@"
