"""Bad local inputs of an encode job are refused by the driver before Ray starts and before anything is written:
one line naming the flag, the path and the fix, exit code 2, and an existing plan left as it was."""
import json
import shutil
import subprocess
import sys

import pytest
import soundfile as sf

from services.encode.driver import main
from shared.synth import synth_utterance
from tests.conftest import REPO, run_encode, write_manifest


@pytest.fixture
def inputs(tmp_path):
    sf.write(tmp_path / "a.wav", synth_utterance(1.0, 24_000, seed=1), 24_000)
    manifest = write_manifest(tmp_path / "raw.jsonl", [{"id": "a", "audio": str(tmp_path / "a.wav"), "text": "t"}])
    return tmp_path, manifest


def refused(capsys, *argv) -> str:
    assert main([*argv, "--status-port", "-1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def broken_codecs(good, root):
    """(name, directory) of codec directories that are wrong in one way each."""
    def copy(name):
        return shutil.copytree(good, root / name)

    no_config = copy("no_config")
    (no_config / "config.json").unlink()
    tts = copy("tts_model")
    (tts / "config.json").write_text(json.dumps({"model_type": "qwen3_tts"}))
    no_weights = copy("no_weights")
    (no_weights / "model.safetensors").unlink()
    truncated = copy("truncated")
    (truncated / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:6])
    bad_json = copy("bad_json")
    (bad_json / "config.json").write_text("{not json")
    a_file = root / "codec_file"
    a_file.write_text("x")
    return [("no such directory", root / "nowhere"), ("is a file", a_file), ("no config.json", no_config),
            ("model_type 'qwen3_tts'", tts), ("no weights", no_weights), ("not a safetensors file", truncated),
            ("not readable JSON", bad_json)]


def test_bad_codec_is_refused_before_anything_is_written(tiny_codec_dir, inputs, capsys):
    root, manifest = inputs
    for what, codec in broken_codecs(tiny_codec_dir, root):
        out = root / f"out-{codec.name}"
        line = refused(capsys, "--manifest", str(manifest), "--codec", str(codec), "--output", str(out))
        assert line.startswith(f"error: --codec {codec}") and what in line, line
        assert "Qwen3-TTS-Tokenizer-12Hz" in line or "download it again" in line
        assert not out.exists(), f"{out} was created for a bad codec"


def test_a_bad_codec_on_a_resubmit_leaves_the_plan_as_it_was(tiny_codec_dir, inputs, capsys):
    from services.encode.plan import prepare_plan

    root, manifest = inputs
    out = root / "out"
    out.mkdir()
    prepare_plan(out, manifest, tiny_codec_dir, 256)
    before = (out / "plan.json").read_bytes()
    refused(capsys, "--manifest", str(manifest), "--codec", str(root / "missing_codec"), "--output", str(out))
    assert (out / "plan.json").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["manifest.jsonl",
                                                                                                   "plan.json"]


def test_bad_manifest_reference_and_numbers(tiny_codec_dir, inputs, capsys):
    root, manifest = inputs
    out = root / "out"
    codec = ["--codec", str(tiny_codec_dir), "--output", str(out)]
    assert "--manifest /no/such.jsonl: no such file" in refused(capsys, "--manifest", "/no/such.jsonl", *codec)
    (root / "empty.jsonl").write_text("")
    assert "the file is empty" in refused(capsys, "--manifest", str(root / "empty.jsonl"), *codec)
    (root / "ref.txt").write_text("not audio")
    line = refused(capsys, "--manifest", str(manifest), *codec, "--ref-audio", str(root / "ref.txt"))
    assert line.startswith(f"error: --ref-audio {root / 'ref.txt'}: not a readable audio file")
    assert "--shard-size 0: must be at least 1" in refused(capsys, "--manifest", str(manifest), *codec,
                                                          "--shard-size", "0")
    (root / "out_file").write_text("")
    assert "--output" in refused(capsys, "--manifest", str(manifest), "--codec", str(tiny_codec_dir), "--output",
                                 str(root / "out_file"))
    assert not out.exists()


def test_the_cli_exits_2_with_one_line():
    result = subprocess.run([sys.executable, "-m", "services.encode", "--manifest", "/no/m.jsonl", "--codec", "/no/c",
                             "--output", "/tmp/never-written"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --manifest /no/m.jsonl: no such file; pass a JSONL manifest (one {\"audio\", \"text\", \"ref_audio\"} "
        "object a line) or a directory of audio files"], result.stderr


def test_an_encoder_start_up_error_ends_the_job_with_its_reason_and_the_fixed_command_runs(tiny_codec_dir, inputs):
    """A codec the checks cannot tell from a good one (its config says 960 samples a frame) fails in the actor's
    start-up: the same on every try, so the job ends (exit 2) with the exception's own line, not Ray's first one.
    Nothing was published under that plan, so the corrected command replans instead of asking for --replan."""
    root, manifest = inputs
    odd = shutil.copytree(tiny_codec_dir, root / "odd_codec")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "encode_downsample_rate": 960}))
    out = root / "out"
    failed = run_encode("--manifest", str(manifest), "--codec", str(odd), "--output", str(out), "--status-port", "-1")
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines()[-1] == (f"error: encoder-0 could not start: ValueError: {odd} is not a "
                                                      "12 Hz codec (input rate 24000, downsample 960); use "
                                                      "Qwen3-TTS-Tokenizer-12Hz")
    fixed = run_encode("--manifest", str(manifest), "--codec", str(tiny_codec_dir), "--output", str(out),
                       "--status-port", "-1")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "has no published shard: replanning" in fixed.stdout


def test_an_unwritable_output_is_one_line_naming_the_flag_the_path_and_the_fix(tiny_codec_dir, inputs):
    """procfs refuses new directories (ENOENT), sysfs refuses them (EPERM), and nothing can be created under a
    regular file: each is refused by the preflight, in a fresh process, before Ray starts."""
    root, manifest = inputs
    (root / "a_file").write_text("")
    for output, cause in [("/proc/nonexistent", "cannot create a directory in /proc"),
                          ("/sys/nonexistent", "cannot create a directory in /sys"),
                          ("/proc/version/out", "is under /proc/version, a file"),
                          (str(root / "a_file" / "deeper" / "out"), f"is under {root / 'a_file'}, a file")]:
        result = subprocess.run([sys.executable, "-m", "services.encode", "--manifest", str(manifest),
                                 "--codec", str(tiny_codec_dir), "--output", output, "--status-port", "-1"],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (output, result.returncode, result.stderr)
        assert lines[0].startswith(f"error: --output {output}: {cause}"), lines[0]
        assert lines[0].endswith("pass a directory you can write to (it is created if missing)"), lines[0]


def test_the_output_probe_leaves_nothing_behind(tiny_codec_dir, inputs, capsys):
    root, manifest = inputs
    out = root / "new" / "deeper" / "out"
    line = refused(capsys, "--manifest", str(manifest), "--codec", str(tiny_codec_dir), "--output", str(out),
                   "--shard-size", "0")  # the output passes; a later check refuses the job
    assert line.startswith("error: --shard-size 0") and not (root / "new").exists()
