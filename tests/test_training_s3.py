"""Training with data.shards and checkpoint.dir on an S3-compatible store (a real moto server on loopback,
tests/s3server.py): 2 ranks under torchrun, killed mid-run and restarted, give exactly the losses of an
uninterrupted run on local paths; only committed checkpoints count, retention applies, export reads one."""
import json
import subprocess
import sys
import time
import uuid

from shared.store import open_store
from tests.s3server import upload_tree as upload
from tests.test_training_distributed import (ENV, REPO, STEPS, kill_after_step, losses_by_step, torchrun,
                                             train_command)
from training.checkpoint.step_folders import complete_checkpoints


def test_two_ranks_on_s3_killed_and_resumed_match_the_local_run_and_export(tiny_dir, synthetic_encoded, s3_env,
                                                                          tmp_path):
    local = tmp_path / "local"
    result = torchrun(tiny_dir, synthetic_encoded, local, f"train.steps={STEPS}", "checkpoint.interval=2")
    assert result.returncode == 0, result.stderr[-3000:]

    prefix = f"s3://encode-out/train-{uuid.uuid4().hex[:8]}"
    upload(synthetic_encoded, f"{prefix}/encoded")
    run, logs = f"{prefix}/run", tmp_path / "logs"
    env = {**ENV, **s3_env}
    command = [sys.executable, *train_command(tiny_dir, f"{prefix}/encoded/shards", run, nproc=2),
               f"train.steps={STEPS}", "checkpoint.interval=2", f"checkpoint.log_dir={logs}"]
    killed_at = kill_after_step(command, logs, 3, env, timeout=240)
    assert 3 <= killed_at < STEPS, "the run must be killed part-way through"
    assert STEPS not in complete_checkpoints(run)

    resumed = subprocess.run(command, cwd=REPO, env=env, timeout=300, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run}/step-" in resumed.stderr
    assert losses_by_step(logs) == losses_by_step(local)  # bit-exact: fp32 on CPU, same data order
    assert sorted(complete_checkpoints(run)) == sorted(complete_checkpoints(local)) == [STEPS - 2, STEPS]
    keys = set(open_store(run).listing(f"step-{STEPS:06d}"))
    assert {".metadata", ".complete", "extra-rank00000.pt", "extra-rank00001.pt"} <= keys

    out = tmp_path / "exported"
    exported = subprocess.run([sys.executable, "-m", "training.export", "--checkpoint", f"{run}/step-{STEPS:06d}",
                               "--output", str(out)], cwd=REPO, env=env, timeout=180, capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["tts_model_type"] == "base"


from tests.test_training_data import builder, encoded, good_ids, ids_of, stream  # noqa: E402,F401 (fixtures)


def test_follow_mode_on_s3_trains_on_shards_as_they_are_published(encoded, builder, s3_env):
    """Shards published as completed multipart uploads, then _COMPLETE: follow mode starts on the first and
    ends once _COMPLETE is there and every shard was consumed."""
    import threading

    from shared import schema

    uri = f"s3://encode-out/follow-{uuid.uuid4().hex[:8]}"
    store = open_store(uri)
    sources = schema.published_shards(encoded)
    store.write_bytes(schema.PLAN_FILE, b"{}")

    def encode_service():
        for sid in (0, 1, 2):
            time.sleep(0.3)
            store.publish(f"{schema.SHARDS_DIR}/{schema.shard_name(sid)}", lambda f: f.write(sources[sid].read_bytes()))
        time.sleep(0.3)
        store.write_bytes(schema.COMPLETE_MARKER, b"{}")

    publisher = threading.Thread(target=encode_service)
    publisher.start()
    live = stream(f"{uri}/{schema.SHARDS_DIR}", builder, follow=True)
    steps = live.epoch_steps()
    seen = ids_of([next(steps)])
    assert not store.exists(schema.COMPLETE_MARKER)  # training started before the encode service finished
    seen += ids_of(steps)
    publisher.join()
    assert sorted(seen) == sorted(good_ids(encoded))
    assert live.position.consumed == [0, 1, 2]
