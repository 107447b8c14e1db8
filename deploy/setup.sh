#!/usr/bin/env bash
# Creates ./.venv and installs the project with its test extra, once per version of pyproject.toml.
# Sourced by deploy/demo.sh and tests/run.sh so that a fresh machine needs nothing but Python 3.10-3.12.
# Cluster nodes run it with QWEN3TTS_EXTRAS=npu (deploy/ray-cluster.yaml) to get torch_npu instead.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${QWEN3TTS_VENV:-$repo/.venv}"
python_bin="${PYTHON:-$(command -v python3.11 || command -v python3)}"
extras="${QWEN3TTS_EXTRAS:-test}"
stamp="$venv/.installed-$(sha256sum "$repo/pyproject.toml" | cut -c1-16)${QWEN3TTS_EXTRAS:+-$extras}"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing into $venv (first run: torch, qwen-tts, ray; several minutes)"
  [ -x "$venv/bin/python" ] || "$python_bin" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  index_args=()
  # torch_npu's x86_64 wheels require torch's +cpu build, published only on PyTorch's CPU index (aarch64 uses PyPI's).
  if [[ ",$extras," == *,npu,* && "$(uname -m)" == x86_64 ]]; then
    index_args=(--extra-index-url "${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}")
  fi
  "$venv/bin/python" -m pip install --quiet "${index_args[@]}" -e "$repo[$extras]"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
# Keep Ray and torch from oversubscribing small machines; real deployments set their own.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export RAY_USAGE_STATS_ENABLED=0
