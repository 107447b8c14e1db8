"""Training while the real encode service (services.encode) publishes shards: data.follow=true starts on the
first shards, never reads a temporary, and stops once the plan is complete, having trained on every good row."""
import json
import re
import subprocess
import sys

import pyarrow.parquet as pq

from shared import schema
from training.checkpoint.step_folders import complete_checkpoints
from training.train.metrics import read_metrics
from training.data.synthetic import write_wav

from tests.test_training_distributed import ENV, REPO, train_command


def test_follow_mode_trains_on_the_encode_service_output_as_it_appears(tiny_dir, tmp_path):
    audio = tmp_path / "audio"
    ref = write_wav(audio / "ref.wav", 1.6, 99, rate=22050)  # not 24 kHz: training resamples it
    lines = [{"audio": str(write_wav(audio / f"{i}.wav", 0.4 + 0.1 * (i % 5), i)), "text": f"utterance number {i}",
              "ref_audio": str(ref)} for i in range(12)]
    lines.append({"audio": str(audio / "missing.wav"), "text": "no audio", "ref_audio": str(ref)})  # an error row
    manifest = tmp_path / "train_raw.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output, run = tmp_path / "encoded", tmp_path / "run"

    trainer = subprocess.Popen([sys.executable, *train_command(tiny_dir, output, run), "data.follow=true",
                                "train.steps=0", "data.poll_seconds=0.2", "checkpoint.interval=2",
                                # ~2 packed utterances per micro-batch: several steps per round, whatever
                                # the arrival order makes the rounds
                                "data.frame_budget=64", "data.pack_length=0"],
                               cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    encode = subprocess.run([sys.executable, "-m", "services.encode", "--manifest", str(manifest), "--codec",
                             str(tiny_dir / "codec"), "--output", str(output), "--device", "cpu", "--num-encoders",
                             "1", "--shard-size", "3", "--status-port", "-1"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert encode.returncode == 0, encode.stderr[-3000:]
    log, _ = trainer.communicate(timeout=300)
    assert trainer.returncode == 0, log[-3000:]

    shards = schema.published_shards(output)
    assert (output / schema.COMPLETE_MARKER).exists() and len(shards) == 5
    good = sum(pq.read_table(p).column("error").null_count for p in shards.values())
    assert good == 12
    trained = [int(s) for ids in re.findall(r"round: shards \[([\d, ]*)\]", log) for s in ids.split(",")]
    assert sorted(trained) == sorted(shards)  # every published shard trained on, once
    final = max(complete_checkpoints(run))
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, final + 1)) and final >= 3
