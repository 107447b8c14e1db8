#!/usr/bin/env bash
# The whole flow end to end on the embedded default, on one machine with no cluster:
# tiny random codec + model, a generated two-speaker KAN-TTS corpus, the Ray encode service (private local
# Ray, GET /status served while it runs), FSDP2 training with torchrun on the shards (both speakers in one
# run), export of both as one custom-voice model, and one generated utterance. Everything lands in ./demo
# (or $1).
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/setup.sh
work="${1:-demo}"
status_port="${STATUS_PORT:-8000}"
mkdir -p "$work"
step() { printf '\n==> %s\n' "$*"; }

step "tiny random codec and Base model (same from_pretrained path as real weights)"
# --distinct-speakers: a random speaker encoder gives every voice nearly the same x-vector; this one tells them apart.
python -m shared.tiny --output "$work/tiny" --distinct-speakers

step "generated two-speaker corpus in the KAN-TTS layout (speaker1/, speaker2/), converted to the raw manifest"
python -m shared.synth --kantts "$work/opentts_data" --speakers 2 --count "${DEMO_UTTERANCES:-48}"
python -m services.kantts --root "$work/opentts_data" --output "$work/train_raw.jsonl" --seed 0

step "encode service on a private local Ray (GET /status on port $status_port while it runs, if the port is free)"
python -m services.encode --manifest "$work/train_raw.jsonl" --codec "$work/tiny/codec" --output "$work/shards" \
  --shard-size 8 --status-port "$status_port" --export-jsonl "$work/train_with_codes.jsonl"
python - "$work/shards" <<'PY'
import json, sys
from services.status.progress import collect_progress
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
from training.train.metrics import read_metrics
for r in read_metrics(sys.argv[1], "eval"):
    scores = ", ".join(f"{k[7:]} {r[k]:.3f}" for k in ("sample_similarity", "sample_cer") if k in r)
    print(f"step {r['step']}: eval loss {r['eval_loss']:.4f} over {r['eval_rows']} rows; samples: {scores}")
PY

step "export the checkpoint with the lowest eval loss (RUN/best) with both speakers as one custom-voice model and synthesise with it"
python -m training.export --checkpoint "$work/run/best" --output "$work/my_voice" --all-speakers
python - "$work/my_voice" "$work/my_voice.wav" <<'PY'
import sys
import soundfile as sf
from shared.qwen import load_inference_model
model = load_inference_model(sys.argv[1])
wavs, rate = model.generate_custom_voice(text="今天天气很好", speaker="speaker1", max_new_tokens=40)
sf.write(sys.argv[2], wavs[0], rate)
print(f"wrote {sys.argv[2]}: {len(wavs[0]) / rate:.2f} s at {rate} Hz (random tiny weights: noise, not speech)")
PY

step "proof the pipeline works: overfit one encoded utterance, export it, generate it back greedily"
# Tiny random weights cannot make speech. What a trained model can do is give back the codes it was trained on,
# which needs the encoded codes, the text, the loss alignment and the export to agree: this prints how many do.
python -m training.reproduce pick --shards "$work/shards" --output "$work/proof/data"
torchrun --standalone --nproc_per_node 1 -m training.train --config training/configs/tiny.yaml \
  model.path="$work/tiny/model" data.shards="$work/proof/data" checkpoint.dir="$work/proof/run" \
  train.steps="${DEMO_PROOF_STEPS:-150}" train.lr=5e-3 train.lr_schedule=constant train.warmup_steps=0 \
  train.weight_decay=0 checkpoint.interval=1000
last="$(ls -d "$work"/proof/run/step-* | sort | tail -1)"
python -m training.export --checkpoint "$last" --output "$work/proof/voice" --all-speakers
python -m training.reproduce check --voice "$work/proof/voice" --shards "$work/proof/data"
step "done: shards in $work/shards, checkpoints in $work/run (eval samples in $work/run/samples, TensorBoard: tensorboard --logdir $work/run/tensorboard), model in $work/my_voice, proof in $work/proof"
