"""Growing a plan (services.encode.grow) without Ray: appended manifest lines get new shards after the planned ones,
any other change is refused with nothing written."""
import json

import pytest

from services.encode.manifest import read_range
from services.encode.plan import PlanMismatch, load_plan, prepare_plan
from shared.schema import COMPLETE_MARKER, MANIFEST_FILE, PLAN_FILE
from tests.conftest import write_manifest


def lines(n, start=0):
    return [{"id": f"u{i}", "audio": f"a{i}.wav", "text": f"文字 {i}", "ref_audio": "ref.wav"}
            for i in range(start, start + n)]


@pytest.fixture
def codec(tmp_path):
    # prepare_plan only hashes the codec directory's files
    path = tmp_path / "codec"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def planned(tmp_path, codec, n=10, shard_size=4):
    manifest = write_manifest(tmp_path / "m.jsonl", lines(n))
    out = tmp_path / "out"
    plan = prepare_plan(out, manifest, codec, shard_size)
    (out / COMPLETE_MARKER).write_text("{}")  # as a finished job leaves it
    return manifest, out, plan


def snapshot(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_appended_lines_get_new_shards_after_the_planned_ones(tmp_path, codec):
    manifest, out, first = planned(tmp_path, codec)
    assert [(s.start, s.end) for s in first.shards] == [(0, 4), (4, 8), (8, 10)]
    log = []
    for added, total in ((1, 11), (3, 14)):  # twice: the second growth extends a grown plan
        with open(manifest, "a") as f:
            f.writelines(json.dumps(e) + "\n" for e in lines(added, start=total - added))
        before = load_plan(out)
        grown = prepare_plan(out, manifest, codec, 4, log=log.append)
        assert grown.shards[:len(before.shards)] == before.shards  # the partial last shard too stays as it was
        new = grown.shards[len(before.shards):]
        assert [s.id for s in new] == list(range(len(before.shards), len(grown.shards)))
        assert new[0].start == before.num_rows and grown.num_rows == total
        entries = [e for s in grown.shards for e in read_range(out / MANIFEST_FILE, s.byte_start, s.byte_end)]
        assert [e["id"] for e in entries] == [f"u{i}" for i in range(total)]
        assert not (out / COMPLETE_MARKER).exists()  # removed before any new shard can be published
        assert grown.covered.bytes == (out / MANIFEST_FILE).stat().st_size
        assert grown.growths[-1].rows_before == before.num_rows and grown.growths[-1].rows_added == added
        assert load_plan(out).to_json() == grown.to_json()
        assert prepare_plan(out, manifest, codec, 4).to_json() == grown.to_json()  # same manifest: reused
        (out / COMPLETE_MARKER).write_text("{}")
    assert [(s.start, s.end) for s in load_plan(out).shards] == [(0, 4), (4, 8), (8, 10), (10, 11), (11, 14)]
    assert "grew by 3 rows: shard 4 added after the 4 planned ones" in log[-1]
    assert sorted(p.name for p in out.iterdir()) == [COMPLETE_MARKER, MANIFEST_FILE, PLAN_FILE]


@pytest.mark.parametrize("edit,reason", [
    (lambda e: e[:4] + [{**e[4], "text": "changed"}] + e[5:] + lines(2, 10), "line 5 differs"),
    (lambda e: e[:3] + e[4:], "line 4 differs"),  # a row removed in the middle
    (lambda e: e[:8], "it has 8 lines where the planned manifest has more (rows removed)"),
])
def test_any_other_manifest_change_is_refused_with_nothing_written(tmp_path, codec, edit, reason):
    manifest, out, _ = planned(tmp_path, codec)
    before = snapshot(out)
    write_manifest(manifest, edit(lines(10)))
    with pytest.raises(PlanMismatch) as refused:
        prepare_plan(out, manifest, codec, 4)
    message = str(refused.value)
    assert reason in message and "append the new lines" in message and "--replan" in message
    assert "manifest_sha256" in message and "\n" not in message
    assert snapshot(out) == before  # _COMPLETE, plan and manifest copy untouched, no staging file left
    assert len(prepare_plan(out, manifest, codec, 4, replan=True).shards) == len(load_plan(out).shards)


def test_appending_with_another_input_changed_is_refused_as_before(tmp_path, codec):
    manifest, out, _ = planned(tmp_path, codec)
    write_manifest(manifest, lines(12))
    before = snapshot(out)
    with pytest.raises(PlanMismatch, match=r"changed: manifest_sha256, shard_size"):
        prepare_plan(out, manifest, codec, 5)
    assert snapshot(out) == before


def test_a_plan_without_the_covered_record_grows_from_its_manifest_copy(tmp_path, codec):
    manifest, out, _ = planned(tmp_path, codec)
    plan_json = json.loads((out / PLAN_FILE).read_text())
    del plan_json["manifest_covered"], plan_json["grown"]  # as plans were written before growth existed
    (out / PLAN_FILE).write_text(json.dumps(plan_json))
    write_manifest(manifest, lines(13))
    grown = prepare_plan(out, manifest, codec, 4)
    assert [(s.start, s.end) for s in grown.shards] == [(0, 4), (4, 8), (8, 10), (10, 13)]
    assert grown.covered.bytes == (out / MANIFEST_FILE).stat().st_size

    plan_json = json.loads((out / PLAN_FILE).read_text())
    del plan_json["manifest_covered"]
    (out / PLAN_FILE).write_text(json.dumps(plan_json))
    (out / MANIFEST_FILE).unlink()
    write_manifest(manifest, lines(14))
    with pytest.raises(PlanMismatch, match=r"manifest\.jsonl is missing.*Pass --replan"):
        prepare_plan(out, manifest, codec, 4)


def test_a_directory_input_cannot_grow(tmp_path, codec):
    audio = tmp_path / "audio"
    audio.mkdir()
    for name in ("a", "b"):
        (audio / f"{name}.wav").write_bytes(b"RIFF")
        (audio / f"{name}.txt").write_text(name)
    out = tmp_path / "out"
    prepare_plan(out, audio, codec, 4)
    (audio / "c.wav").write_bytes(b"RIFF")
    (audio / "c.txt").write_text("c")
    with pytest.raises(PlanMismatch, match="only a JSONL manifest can grow.*--replan"):
        prepare_plan(out, audio, codec, 4)


def test_a_manifest_whose_rows_did_not_change_updates_the_plan_only(tmp_path, codec):
    manifest, out, first = planned(tmp_path, codec)
    manifest.write_text("\n".join(json.dumps(e, indent=None, separators=(",", ":")) for e in lines(10)) + "\n\n")
    again = prepare_plan(out, manifest, codec, 4)
    assert again.shards == first.shards and again.covered == first.covered and not again.growths
    assert again.inputs.manifest_sha256 != first.inputs.manifest_sha256
    assert (out / COMPLETE_MARKER).exists()  # nothing to encode: still complete
