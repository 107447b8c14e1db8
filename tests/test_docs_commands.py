"""The docs' `run` blocks, executed: README.md's flow on the released weights first, then the guides' blocks, in
order, in one temporary directory, each block as one `bash -euo pipefail` script (a ```python run block as one
python script), so a command the docs show that stops working fails here.

The released weights are mapped to the tiny random ones, as declared below; nothing else in a block is changed:
- `hf download REPO --local-dir DIR` runs a stand-in `hf` that copies the tiny codec or model that DOWNLOADS maps
  the repository to (the tiny dirs of the session fixture) into DIR;
- SUBSTITUTIONS are applied as plain text to every block before it runs;
- SETUP_CORPORA are the KAN-TTS trees the blocks read (the user's corpus in the docs), written before the first.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.doc_blocks import REPO, blocks, doc_files, relative
from tests.system_tools import system_tool

DOWNLOADS = {"Qwen/Qwen3-TTS-Tokenizer-12Hz": "codec", "Qwen/Qwen3-TTS-12Hz-1.7B-Base": "model"}
SUBSTITUTIONS = [
    ("/models/", "{work}/models/"),  # the downloads land in the temporary directory
    # the tiny model on CPU in fp32, 6 steps, instead of the 1.7B config's 3 epochs in bf16
    ("training/configs/qwen3tts_1.7b.yaml", "{repo}/training/configs/tiny.yaml"),
    ("--nproc_per_node 8", "--nproc_per_node 1"),  # one CPU rank (gloo) for eight accelerators
    # no eval samples: the tiny model's are noise, and synthesising them took a third of this test (eval loss stays)
    ("eval.fraction=0.1 ", "eval.samples=false eval.fraction=0.1 "),
    # a free status port (the machine is shared) and CPU encoders
    ("-m services.encode ", "-m services.encode --status-port 0 --device cpu "),
    (":8787", ":{port}"), ("--port 8787", "--port {port}"),  # the standalone status server, on a free port
]
SETUP_CORPORA = {"opentts_data": dict(speakers=1, count=24), "speakers": dict(speakers=2, count=8)}
# The pages holding `run` blocks, in the order they run (the README's flow writes what the others read).
ORDER = ["README.md", "docs/preparing-data.md", "docs/watching.md", "docs/training.md", "docs/testing.md"]
BLOCK_TIMEOUT = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runnable_blocks():
    found = [b for path in doc_files() for b in blocks(path) if b.marker == "run"]
    stray = sorted({b.path for b in found} - set(ORDER))
    assert not stray, f"`run` blocks in {stray}: add the page to ORDER in tests/test_docs_commands.py"
    return sorted(found, key=lambda b: (ORDER.index(b.path), b.line))


def write_hf_stand_in(bin_dir: Path, tiny: Path) -> None:
    sources = {repo: str(tiny / sub) for repo, sub in DOWNLOADS.items()}
    script = bin_dir / "hf"
    script.write_text(f"""#!{sys.executable}
# stand-in for `hf download REPO --local-dir DIR` (tests/test_docs_commands.py): copies a tiny random model
import shutil, sys
args = sys.argv[1:]
assert args[0] == "download" and "--local-dir" in args, args
shutil.copytree({sources!r}[args[1]], args[args.index("--local-dir") + 1], dirs_exist_ok=True)
""")
    script.chmod(0o755)


def write_corpora(work: Path) -> None:
    from shared.synth import write_kantts_speakers, write_kantts_tree

    for name, spec in SETUP_CORPORA.items():
        if spec["speakers"] == 1:
            write_kantts_tree(work / name, spec["count"], (1.0, 2.5), seed=0)
        else:
            write_kantts_speakers(work / name, spec["speakers"], spec["count"], (1.0, 2.5), seed=0)


def run_block(block, text: str, work: Path, env: dict) -> float:
    script = work / ".doc-blocks" / f"{block.path.replace('/', '_')}-{block.line}.{'py' if block.language == 'python' else 'sh'}"
    script.parent.mkdir(exist_ok=True)
    script.write_text(text)
    command = [sys.executable, str(script)] if block.language == "python" else ["bash", "-euo", "pipefail", str(script)]
    started = time.monotonic()
    proc = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=BLOCK_TIMEOUT)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the block left running in its session (a server)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, f"{block.where} exited {proc.returncode}:\n{text}\n--- output ---\n{output[-4000:]}"
    return time.monotonic() - started


def test_every_run_block_of_the_docs_works_on_the_tiny_model(tiny_dir, tmp_path):
    system_tool("chromium", "chromium", "chromium-browser")  # the status page block takes a screenshot
    system_tool("curl")
    work, bin_dir = tmp_path / "work", tmp_path / "bin"
    work.mkdir()
    bin_dir.mkdir()
    write_hf_stand_in(bin_dir, tiny_dir)
    write_corpora(work)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    values = {"work": str(work), "repo": str(REPO), "port": str(free_port())}
    chosen = runnable_blocks()
    used, times = set(), []
    for block in chosen:
        text = block.text
        for old, new in SUBSTITUTIONS:
            if old in text:
                used.add(old)
                text = text.replace(old, new.format(**values))
        times.append((block.where, run_block(block, text, work, env)))
    assert used == {old for old, _ in SUBSTITUTIONS}, f"unused substitutions: {[o for o, _ in SUBSTITUTIONS if o not in used]}"
    print("\n".join(f"{where}: {seconds:.1f} s" for where, seconds in times))
    # what the blocks say they make
    assert (work / "data" / "enc" / "_COMPLETE").is_file()
    assert (work / "runs" / "my_voice" / "best.json").is_file()
    assert (work / "my_voice" / "config.json").is_file() and (work / "my_voice.wav").stat().st_size > 44
    assert (work / "page.png").stat().st_size > 1000
    assert {p.name for p in (work / "tiny").iterdir()} >= {"codec", "model", "custom_voice", "asr"}
    assert len(list((work / "one" / "shards").glob("shard-*.parquet"))) == 1
    assert sorted(p.name for p in (work / "corpus").iterdir()) == ["speaker1", "speaker2"]
    assert (work / "speakers_raw.jsonl").read_text().count('"speaker"') == SETUP_CORPORA["speakers"]["count"]
