#!/usr/bin/env bash
# Every accelerator figure in one device call (~8 minutes on a CUDA machine), on the pinned stack:
#   bash benchmarks/gpu_all.sh --wheels DIR [--out DIR]     # install DIR's wheels offline, then measure on CUDA
#   bash benchmarks/gpu_all.sh --dry [--out DIR]            # CPU, tiny sizes: checks the script end to end
#
# The device machine reaches no package index, so the pinned wheels travel with the call. Prepare them where
# pip can reach PyPI, on the device's OS, CPU architecture and Python (or add pip's --platform/--python-version):
#   python -m pip download --dest wheels/ . setuptools    # torch 2.9.1 (CUDA build on Linux x86_64), qwen-tts ...
#   python -m pip download --dest wheels/ flash-attn      # optional: a prebuilt wheel matching torch 2.9.1
# Installed into a fresh venv with `pip install --no-index --find-links DIR`, so nothing else is fetched. Without
# --wheels the machine's own python runs it, and summary.json says whether its versions are the pinned ones.
#
# Steps, each under its own time limit (seconds, env), each writing OUT/<step>.json and OUT/<step>.log:
#   packed_attention  sdpa with the dense packed mask vs flex (and flash-attn's varlen when installed): attention
#                     only and whole step, pack_length 4096, 1.7B shapes                      (T_ATTENTION=90)
#   codec_precision   raw codec audio-s/s: fp32, bf16, fp32 compiled, frame agreement with fp32  (T_CODEC=90)
#   encode            encode_bench flows a, b, c: b/a and b/c                                     (T_ENCODE=120)
#   train_<impl>      train_bench, 1.7B shape, packed, bf16, one rank: frames/s and MFU, one run per attention
#                     implementation (sdpa, flex_attention, flash_attention_2 when installed)  (T_TRAIN=75 each)
#   lora_memory       LoRA vs full-fine-tuning memory, when benchmarks/lora_memory.py exists (args:
#                     LORA_MEMORY_ARGS)                                                            (T_LORA=60)
# A step that fails or runs out of time is recorded as such and the next one runs. --dry figures measure nothing
# (tiny sizes on a CPU) and must never be reported.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry=0; wheels="${WHEELS:-}"; out="${OUT:-$repo/gpu_all_out}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) dry=1 ;;
    --wheels) wheels="$2"; shift ;;
    --out) out="$2"; shift ;;
    *) echo "gpu_all.sh: unknown argument $1 (use --dry, --wheels DIR, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$wheels" ] && [ ! -d "$wheels" ]; then
  echo "gpu_all.sh: --wheels $wheels is not a directory. Fix: prepare it with pip download (see the top of this file)" >&2
  exit 2
fi
mkdir -p "$out"
python_bin="${PYTHON:-python}"
if [ -n "$wheels" ]; then
  venv="${GPU_ALL_VENV:-$out/venv}"
  echo "[gpu_all] installing the pinned stack from $wheels (offline)"
  python3 -m venv "$venv" && "$venv/bin/python" -m pip install --quiet --no-index --find-links "$wheels" "$repo" \
    || { echo "gpu_all.sh: offline install from $wheels failed (a wheel missing for this platform?)" >&2; exit 1; }
  if compgen -G "$wheels/flash_attn-*.whl" > /dev/null; then
    "$venv/bin/python" -m pip install --quiet --no-index --find-links "$wheels" flash-attn \
      || echo "[gpu_all] flash-attn wheel did not install; flash_attention_2 is left out"
  fi
  python_bin="$venv/bin/python"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
work="${GPU_ALL_WORK_DIR:-$out/work}"

if [ "$dry" = 1 ]; then
  attention_args=(--dry --device cpu)
  codec_args=(--dry --variants fp32,bf16)  # compiling the codec on a CPU takes minutes: left to the device run
  encode_args=(--device cpu --quick --codec-size tiny --clips 4 --flows b,c --timeout 600)
  train_common=(--device cpu --model-size tiny --ranks 1 --dtypes float32 --checkpointing off --steps 3 --warmup 1
                --shards 1 --rows-per-shard 8)
  implementations=(sdpa)  # flex trains on CUDA only (torch compiles no flex backward for the CPU)
  t_attention=900; t_codec=900; t_encode=900; t_train=900; t_lora=900
  lora_default="--device cpu --no-batch-growth"  # the 1.7B widths on a CPU: the fewest runs that check the script
else
  attention_args=(--device cuda)
  codec_args=(--device cuda --codec-size full)
  encode_args=(--device cuda --codec-size full --clips 120 --flows a,b,c --timeout 110)
  train_common=(--device cuda --model-size full --ranks 1 --dtypes bfloat16 --checkpointing on --steps 6 --warmup 2)
  implementations=(sdpa flex_attention)
  "$python_bin" -c "import flash_attn" 2> /dev/null && implementations+=(flash_attention_2)
  t_attention="${T_ATTENTION:-90}"; t_codec="${T_CODEC:-90}"; t_encode="${T_ENCODE:-120}"
  t_train="${T_TRAIN:-75}"; t_lora="${T_LORA:-60}"
  lora_default="--device cuda"
fi

steps_file="$out/steps.tsv"; : > "$steps_file"
run_step() {  # name seconds command...: run it under a limit, record name, status, exit code and wall seconds
  local name="$1" limit="$2"; shift 2
  local started=$SECONDS
  echo "[gpu_all] $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$? status=ok
  [ $rc -eq 0 ] || status=failed
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && status=timeout
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - started))" >> "$steps_file"
  tail -n 25 "$out/$name.log"
}

run_step packed_attention "$t_attention" "$python_bin" "$repo/benchmarks/packed_attention.py" "${attention_args[@]}" \
  --work-dir "$work" --json "$out/packed_attention.json"
run_step codec_precision "$t_codec" "$python_bin" "$repo/benchmarks/codec_precision.py" "${codec_args[@]}" \
  --work-dir "$work" --json "$out/codec_precision.json"
run_step encode "$t_encode" "$python_bin" "$repo/benchmarks/encode_bench.py" "${encode_args[@]}" \
  --work-dir "$work" --json "$out/encode.json"
for impl in "${implementations[@]}"; do
  run_step "train_$impl" "$t_train" "$python_bin" "$repo/benchmarks/train_bench.py" "${train_common[@]}" \
    --override "model.attn_implementation=$impl" --work-dir "$work" --json "$out/train_$impl.json"
done
# LoRA memory (benchmarks/lora_memory.py comes with the LoRA work): run when present, recorded as skipped if not.
if [ -f "$repo/benchmarks/lora_memory.py" ]; then
  read -r -a lora_args <<< "${LORA_MEMORY_ARGS:-$lora_default}"
  run_step lora_memory "$t_lora" "$python_bin" "$repo/benchmarks/lora_memory.py" "${lora_args[@]}" \
    --json "$out/lora_memory.json"
else
  printf 'lora_memory\tskipped\t\t0\n' >> "$steps_file"
fi

"$python_bin" - "$out" "$dry" <<'EOF'
import json, sys
from pathlib import Path
import torch, transformers
out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
steps = [dict(zip(("name", "status", "rc", "seconds"), line.split("\t")))
         for line in (out / "steps.tsv").read_text().splitlines()]
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not dry else "cpu"
pinned = {"torch": "2.9.1", "transformers": "4.57.3"}
found = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
summary = {"dry": dry, "device": device, "versions": {**found, "torch_build": torch.__version__},
           "pinned_stack": found == pinned, "steps": steps,
           "note": "dry run: tiny sizes on a CPU, figures measure nothing" if dry else ""}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
EOF
