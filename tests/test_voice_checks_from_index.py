"""The speaker checks before a run (training.speakers.custom_voice.check_run: CustomVoice rows and dialects, and
dialects on a Base model) answer from the output's shard index: with a current index no shard is opened, and a
dialect mixed with another language in one speaker's rows is still refused."""
import json
from pathlib import Path

import numpy as np
import pytest

from shared import schema
from shared.shard_index import current_index, index_location
from training.config import load_config
from training.data.synthetic import write_shard
from training.speakers.custom_voice import VoiceProblem, check_run

REPO = Path(__file__).resolve().parents[1]
TALKER = {"vocab_size": 3072, "hidden_size": 8, "spk_id": {"ryan": 3000}, "spk_is_dialect": {"ryan": False},
          "codec_language_id": {"english": 2050, "chinese": 2055, "beijing_dialect": 2074}}


def model_dir(root: Path, kind: str) -> Path:
    """A model directory as far as the checks read it: its config.json."""
    path = root / kind
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"tts_model_type": kind, "talker_config": TALKER}))
    return path


def rows(shard_id: int, speakers_languages: list[tuple[str, str | None]]) -> list[schema.ShardRow]:
    good = [schema.ShardRow.from_entry(shard_id * 100 + k, {"id": f"s{shard_id}-{k}", "audio": "/a.wav", "text": "hi",
                                                             "ref_audio": f"/refs/{speaker}.wav", "speaker": speaker,
                                                             "language": language},
                                       codes=np.zeros((5, 16), dtype=np.int64), duration=1.0)
            for k, (speaker, language) in enumerate(speakers_languages)]
    # an error row in a language of its own: only trainable rows count
    return good + [schema.ShardRow.from_entry(shard_id * 100 + 99, {"id": f"bad{shard_id}", "audio": "/x.wav",
                                                                     "speaker": "nova", "language": "beijing_dialect"},
                                              error="decode_failed: unreadable")]


def indexed_output(root: Path, shards: list[list[tuple[str, str | None]]]) -> Path:
    """Shards published and indexed, as the encode driver leaves them."""
    out = root / "out"
    for shard_id, speakers_languages in enumerate(shards):
        write_shard(out, shard_id, rows(shard_id, speakers_languages))
    (out / schema.COMPLETE_MARKER).write_text("")
    current_index(out).save(index_location(out))
    return out


@pytest.fixture
def forbid_shard_reads(monkeypatch):
    """Called once the shards are indexed: from then on every read of a shard's rows fails (and is listed)."""
    reads = []

    def refuse(path, *args, **kwargs):
        reads.append(path)
        raise AssertionError(f"a shard was read: {path}")

    def forbid() -> list:
        monkeypatch.setattr(schema, "read_rows", refuse)
        return reads

    return forbid


def config_for(model: Path, out: Path, run: Path, *overrides: str):
    return load_config(REPO / "training/configs/tiny.yaml",
                       [f"model.path={model}", f"data.shards={out}", f"checkpoint.dir={run}", *overrides])


def test_custom_voice_checks_read_only_the_index(tmp_path, forbid_shard_reads):
    out = indexed_output(tmp_path, [[("nova", "English"), ("lao_li", "beijing_dialect")],
                                    [("nova", None), ("lao_li", "beijing_dialect"), ("Ryan", "english")]])
    no_shard_reads = forbid_shard_reads()
    voices = check_run(config_for(model_dir(tmp_path, "custom_voice"), out, tmp_path / "run",
                                  "model.retrain_speakers=[ryan]"))
    assert voices.dialect == {"lao_li": "beijing_dialect", "nova": False, "ryan": False}
    assert set(voices.rows) == {"lao_li", "nova", "ryan"} and voices.rows["ryan"] == 3000
    with pytest.raises(VoiceProblem, match="speaker lao_li has language beijing_dialect, which a model fine-tuned "
                                           "from a Base model.path can never be asked for"):
        check_run(config_for(model_dir(tmp_path, "base"), out, tmp_path / "run"))
    assert no_shard_reads == []


def test_a_dialect_mixed_with_another_language_is_refused_from_the_index(tmp_path, forbid_shard_reads):
    # nova's dialect row and its english row sit in different shards: only the per-speaker languages tell
    out = indexed_output(tmp_path, [[("nova", "beijing_dialect"), ("lao_li", "english")],
                                    [("NOVA", "English")]])
    no_shard_reads = forbid_shard_reads()
    with pytest.raises(VoiceProblem, match="speaker nova mixes dialect beijing_dialect with english"):
        check_run(config_for(model_dir(tmp_path, "custom_voice"), out, tmp_path / "run"))
    with pytest.raises(VoiceProblem, match="speaker nova mixes dialect"):  # the same check on a Base model.path
        check_run(config_for(model_dir(tmp_path, "base"), out, tmp_path / "run"))
    assert no_shard_reads == []


def test_a_shard_the_index_lacks_is_read(tmp_path):
    """An index is a cache: a shard published after it was saved is read, and its dialect row counts."""
    out = indexed_output(tmp_path, [[("nova", "english")]])
    write_shard(out, 1, rows(1, [("nova", "beijing_dialect")]))
    with pytest.raises(VoiceProblem, match="mixes dialect"):
        check_run(config_for(model_dir(tmp_path, "custom_voice"), out, tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # the checks write nothing
