#!/usr/bin/env bash
# The whole flow end to end on the embedded default, on one machine with no cluster:
# tiny random codec + model, a generated KAN-TTS corpus, the Ray encode service (private local Ray,
# GET /status served while it runs), FSDP2 training with torchrun on the shards, export as a custom
# voice, and one generated utterance. Everything lands in ./demo (or $1).
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/setup.sh
work="${1:-demo}"
status_port="${STATUS_PORT:-8000}"
mkdir -p "$work"
step() { printf '\n==> %s\n' "$*"; }

step "tiny random codec and Base model (same from_pretrained path as real weights)"
python -m shared.tiny --output "$work/tiny"

step "generated speech corpus in the KAN-TTS layout, converted to the raw manifest"
python -m shared.synth --kantts "$work/opentts_data" --count "${DEMO_UTTERANCES:-48}"
python -m services.kantts --root "$work/opentts_data" --output "$work/train_raw.jsonl" --seed 0

step "encode service (status at http://127.0.0.1:$status_port/status while it runs)"
python -m services.encode --manifest "$work/train_raw.jsonl" --codec "$work/tiny/codec" --output "$work/shards" \
  --shard-size 8 --status-port "$status_port" --export-jsonl "$work/train_with_codes.jsonl"
python - "$work/shards" <<'PY'
import json, sys
from services.progress import collect_progress
p = collect_progress(sys.argv[1])
print(json.dumps({k: p[k] for k in ("state", "shards", "rows", "audio_hours")}, indent=1))
PY

step "FSDP2 training on the shards: torchrun, 2 CPU ranks (gloo), 10% held out, eval every 4 steps"
python -m shared.tiny_asr --output "$work/tiny/asr"
torchrun --standalone --nproc_per_node "${DEMO_RANKS:-2}" -m training.train --config training/configs/tiny.yaml \
  model.path="$work/tiny/model" data.shards="$work/shards" checkpoint.dir="$work/run" train.steps="${DEMO_STEPS:-12}" \
  eval.fraction=0.1 eval.interval=4 eval.max_new_tokens=24 eval.asr_model="$work/tiny/asr"
ls "$work"/run/samples/*/
python - "$work/run" <<'PY'
import sys
from training.metrics import read_metrics
for r in read_metrics(sys.argv[1], "eval"):
    scores = ", ".join(f"{k[7:]} {r[k]:.3f}" for k in ("sample_similarity", "sample_cer") if k in r)
    print(f"step {r['step']}: eval loss {r['eval_loss']:.4f} over {r['eval_rows']} rows; samples: {scores}")
PY

step "export the checkpoint with the lowest eval loss (RUN/best) as a custom voice and synthesise with it"
python -m training.export --checkpoint "$work/run/best" --output "$work/my_voice" --speaker-name demo_voice
python - "$work/my_voice" "$work/my_voice.wav" <<'PY'
import sys
import soundfile as sf
from shared.qwen import load_inference_model
model = load_inference_model(sys.argv[1])
wavs, rate = model.generate_custom_voice(text="今天天气很好", speaker="demo_voice", max_new_tokens=40)
sf.write(sys.argv[2], wavs[0], rate)
print(f"wrote {sys.argv[2]}: {len(wavs[0]) / rate:.2f} s at {rate} Hz")
PY
step "done: shards in $work/shards, checkpoints in $work/run (samples/, tensorboard/: tensorboard --logdir $work/run/tensorboard), model in $work/my_voice"
