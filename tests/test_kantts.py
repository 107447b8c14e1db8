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


# Lines in the KAN-TTS format, with every mark kind: breaks #0..#4 (one led by `*`), part-of-speech marks |1..|9,
# phrase tones %L / %H, and a `*` leading the text.
MARKED = {
    "000001": ("*今天#0天气|2很好%H#1，我们#2一起|1去%L#3公园#4。", "今天天气很好，我们一起去公园。"),
    "000002": ("学习|3语音*#1合成|2%L#2模型#4！", "学习语音合成模型！"),
    "000003": ("hello #1 world|1 %H#3 again#4", "hello world again"),
}


def write_speaker_tree(root: Path, speaker: str, utterances: dict, rate: int) -> None:
    tree = root / speaker
    lines = []
    for utt, (marked, _) in utterances.items():
        lines += [f"{utt}\t{marked}", "\tjin1 tian1 tian1 qi4 hen3 hao3"]
        write_wav(tree / "wav" / f"{utt}.wav", sr=rate)
    (tree / "prosody").mkdir(parents=True)
    (tree / "prosody" / "prosody.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_every_kantts_mark_kind_is_stripped():
    for marked, clean in MARKED.values():
        assert kantts.clean_text(marked) == clean


def test_multi_speaker_root_converts_with_a_reference_per_speaker(tmp_path: Path):
    root = tmp_path / "speakers"
    write_speaker_tree(root, "female_a", MARKED, 16000)
    write_speaker_tree(root, "male_b", {k: MARKED[k] for k in ("000001", "000002")}, 24000)
    (root / "notes").mkdir()  # a directory without prosody/ is not a speaker
    ref = tmp_path / "ref_b.wav"
    write_wav(ref)
    out = tmp_path / "train_raw.jsonl"
    result = run_cli("--root", str(root), "--output", str(out), "--ref-audio", f"male_b={ref}", "--seed", "1")
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    assert [(r["speaker"], r["id"], r["text"]) for r in rows] == [
        ("female_a", "female_a-000001", MARKED["000001"][1]), ("female_a", "female_a-000002", MARKED["000002"][1]),
        ("female_a", "female_a-000003", MARKED["000003"][1]),
        ("male_b", "male_b-000001", MARKED["000001"][1]), ("male_b", "male_b-000002", MARKED["000002"][1])]
    refs = {r["speaker"]: r["ref_audio"] for r in rows}
    assert len({r["ref_audio"] for r in rows if r["speaker"] == "female_a"}) == 1
    assert Path(refs["female_a"]).parent == (root / "female_a" / "wav").resolve()  # picked among its own wavs
    assert refs["male_b"] == str(ref.resolve())
    assert all(Path(r["audio"]).is_file() for r in rows)
    # The pick depends only on the seed and the files.
    again = kantts.convert(root, {"male_b": ref}, seed=1).rows
    assert again == rows
    picks = {kantts.convert(root, seed=s).references["female_a"] for s in range(12)}
    assert len(picks) > 1


def test_multi_speaker_root_refuses_a_single_reference_or_an_unknown_speaker(tmp_path: Path):
    root = tmp_path / "speakers"
    write_speaker_tree(root, "a", MARKED, 16000)
    write_speaker_tree(root, "b", MARKED, 16000)
    ref = tmp_path / "ref.wav"
    write_wav(ref)
    one = run_cli("--root", str(root), "--output", str(tmp_path / "o.jsonl"), "--ref-audio", str(ref))
    assert one.returncode == 2 and "--ref-audio NAME=PATH" in one.stderr
    unknown = run_cli("--root", str(root), "--output", str(tmp_path / "o.jsonl"), "--ref-audio", f"c={ref}")
    assert unknown.returncode == 2 and "unknown speaker(s) c" in unknown.stderr and "a, b" in unknown.stderr
    assert not (tmp_path / "o.jsonl").exists()
