import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from services import kantts

REPO = Path(__file__).resolve().parents[1]

PROSODY = """\
000001\t卡尔普#2陪外孙#1玩滑梯#4。
\tka2 er2 pu3 pei2 wai4 sun1 wan2 hua2 ti1
000002\t假语村言#2别再#1拥抱我#4。
\tjia2 yu3 cun1 yan2 bie2 zai4 yong1 bao4 wo3
this line is garbage without an id
000003\thello #1 world%#4 again
    hello world again
000004\t这句没有#1音频#4。
\tzhe4 ju4 mei2 you3 yin1 pin2
000005\t#1 #4 %
\t
"""


def write_wav(path: Path, seconds: float = 0.1, sr: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(seconds * sr), dtype=np.float32), sr)


@pytest.fixture
def kantts_root(tmp_path: Path) -> Path:
    root = tmp_path / "opentts_data"
    (root / "prosody").mkdir(parents=True)
    (root / "prosody" / "prosody.txt").write_text(PROSODY, encoding="utf-8")
    for utt in ("000001", "000002", "000003", "000005"):  # 000004 has no wav
        write_wav(root / "wav" / f"{utt}.wav")
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.kantts", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_clean_text_strips_break_marks_and_percent():
    assert kantts.clean_text("卡尔普#2陪外孙#1玩滑梯#4。") == "卡尔普陪外孙玩滑梯。"
    assert kantts.clean_text("hello #1 world%#4  again ") == "hello world again"


def test_cli_converts_and_reports_problems(kantts_root: Path, tmp_path: Path):
    out = tmp_path / "train_raw.jsonl"
    result = run_cli("--root", str(kantts_root), "--output", str(out), "--seed", "3")
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    assert [r["text"] for r in rows] == ["卡尔普陪外孙玩滑梯。", "假语村言别再拥抱我。", "hello world again"]
    wav_dir = kantts_root.resolve() / "wav"
    assert [r["audio"] for r in rows] == [str(wav_dir / f"00000{i}.wav") for i in (1, 2, 3)]
    assert all(Path(r["audio"]).is_absolute() for r in rows)
    assert len({r["ref_audio"] for r in rows}) == 1
    assert Path(rows[0]["ref_audio"]).parent == wav_dir and Path(rows[0]["ref_audio"]).is_file()
    assert "skipped 1 utterance(s) without a wav: 000004" in result.stderr
    # the garbage line and the line whose text is only break marks
    assert "skipped 2 unparsable prosody line(s)" in result.stderr
    assert "garbage" in result.stderr
    assert "卡尔普" in out.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes


def test_reference_pick_is_deterministic_and_seeded(kantts_root: Path):
    picks = {kantts.convert(kantts_root, seed=seed).rows[0]["ref_audio"] for seed in range(20)}
    assert len(picks) > 1  # the seed matters
    assert kantts.convert(kantts_root, seed=7).rows == kantts.convert(kantts_root, seed=7).rows


def test_given_reference_is_used(kantts_root: Path, tmp_path: Path):
    ref = tmp_path / "ref.wav"
    write_wav(ref)
    rows = kantts.convert(kantts_root, ref_audio=ref).rows
    assert {r["ref_audio"] for r in rows} == {str(ref.resolve())}
    with pytest.raises(FileNotFoundError):
        kantts.convert(kantts_root, ref_audio=tmp_path / "absent.wav")


def test_cli_fails_clearly_when_nothing_usable(tmp_path: Path):
    root = tmp_path / "empty_data"
    (root / "prosody").mkdir(parents=True)
    (root / "prosody" / "prosody.txt").write_text("000009\t没有#1音频\n\tmei2 you3\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = run_cli("--root", str(root), "--output", str(out))
    assert result.returncode != 0
    assert "no usable utterance" in result.stderr
    assert not out.exists()


def test_cli_fails_clearly_without_prosody(tmp_path: Path):
    result = run_cli("--root", str(tmp_path), "--output", str(tmp_path / "out.jsonl"))
    assert result.returncode != 0
    assert "prosody.txt not found" in result.stderr
