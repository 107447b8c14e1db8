"""The docs against the code, without running anything heavy.

Convention (the one way a flag or config key is documented): a row of a Markdown table in README.md or docs/*.md
whose first cell starts with the backticked name, several names allowed (`--max-batch-seconds` /
`--max-batch-items`). The table's header says whose names they are: first cell `config key` for training config
keys (training.train.validate.known_keys()), or `` `python -m MODULE` flag `` (`` `python -m training.reproduce check`
flag `` for a subcommand) for that entry point's argparse flags. Each flag and key has exactly one such row across
the docs, and every row names something the code has. Shell blocks carry a marker (tests/doc_blocks.py); the ones
not executed are checked here: syntax, flags, overrides.
"""
from __future__ import annotations

import subprocess
from collections import defaultdict

import pytest

from tests.doc_blocks import (CHECKED_ONLY, KEY_HEADER, MARKERS, REPO, blocks, doc_files, documented_entries, homes,
                              invocation_problems, invocations, known_keys, looks_like_commands, relative)

README_MAX_LINES = 200


def reference_problems(texts: dict[str, str], flags: dict[str, frozenset[str]], keys: frozenset[str]) -> list[str]:
    """What differs between the docs' reference rows and the code: a name documented twice, never, or not in the
    code."""
    found = defaultdict(list)
    for path, text in texts.items():
        for home in homes(path, text):
            found[(home.kind, home.name)].append(home.where)
    problems = [f"{name} ({kind}) is documented {len(where)} times: {', '.join(where)}; keep one row"
                for (kind, name), where in found.items() if len(where) > 1]
    expected = {(KEY_HEADER, key) for key in keys} | {(entry, f) for entry, names in flags.items() for f in names}
    problems += [f"{name} ({kind}) exists in the code but has no row in the docs" for kind, name in
                 sorted(expected - set(found))]
    problems += [f"{where[0]}: {name} ({kind}) is documented but not in the code" for (kind, name), where in
                 sorted(found.items()) if (kind, name) not in expected]
    return problems


def doc_texts() -> dict[str, str]:
    return {relative(path): path.read_text() for path in doc_files()}


def test_every_flag_and_config_key_has_exactly_one_row_in_the_docs():
    problems = reference_problems(doc_texts(), documented_entries(), known_keys())
    assert not problems, "\n".join(problems)


def test_the_reference_check_catches_a_missing_row_a_duplicate_and_a_name_the_code_lacks():
    texts, flags, keys = doc_texts(), documented_entries(), known_keys()
    assert not reference_problems(texts, flags, keys)
    path = "docs/training.md"
    row = next(line for line in texts[path].splitlines() if line.startswith("| `train.lr` |"))
    without = {**texts, path: texts[path].replace(row + "\n", "")}
    assert reference_problems(without, flags, keys) == ["train.lr (config key) exists in the code but has no row "
                                                        "in the docs"]
    twice = {**texts, path: texts[path].replace(row, row + "\n" + row)}
    assert "train.lr (config key) is documented 2 times" in reference_problems(twice, flags, keys)[0]
    fake = {**texts, path: texts[path].replace(row, row + "\n| `train.fake` | 0 | not a key |")}
    assert "train.fake (config key) is documented but not in the code" in reference_problems(fake, flags, keys)[0]
    assert reference_problems(texts, flags, keys | {"train.new_key"}) == [
        "train.new_key (config key) exists in the code but has no row in the docs"]
    encode = {**flags, "services.encode": flags["services.encode"] | {"--new-flag"}}
    assert reference_problems(texts, encode, keys) == [
        "--new-flag (services.encode) exists in the code but has no row in the docs"]


def all_blocks():
    return [block for path in doc_files() for block in blocks(path)]


def test_every_shell_block_is_marked_and_commands_are_in_shell_blocks():
    problems = [f"{b.where}: ```{b.language} needs a marker, one of {sorted(MARKERS)} (tests/doc_blocks.py)"
                for b in all_blocks() if b.is_shell and b.marker not in MARKERS]
    problems += [f"{b.where}: commands in a block without a language: mark it ```bash <marker>"
                 for b in all_blocks() if looks_like_commands(b)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("marker", sorted(MARKERS))
def test_shell_blocks_parse_and_use_only_real_flags_and_config_keys(marker):
    """Every shell block: `bash -n`, its flags and overrides (the `run` blocks are executed as well, elsewhere)."""
    chosen = [b for b in all_blocks() if b.is_shell and b.marker == marker]
    if marker in CHECKED_ONLY or marker == "run":
        assert chosen, f"no ```bash {marker} block in the docs"
    problems = []
    for block in chosen:
        syntax = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True, timeout=30)
        if syntax.returncode:
            problems.append(f"{block.where}: bash -n: {syntax.stderr.strip()}")
        for call in invocations(block):
            problems += invocation_problems(call)
    assert not problems, "\n".join(problems)


def test_the_block_check_catches_a_wrong_flag_and_an_unknown_key():
    block = blocks(REPO / "x.md", "```bash accelerator\ntorchrun --nproc_per_node 8 -m training.train --config c.yaml"
                                  " \\\n    train.lrr=1 --confg x\nssh n \"cd q && deploy/train.sh c.yaml data.shardz=/d\"\n"
                                  "python -m services.encode --manifest m --shard-sise 8\n```\n")[0]
    problems = [p for call in invocations(block) for p in invocation_problems(call)]
    assert problems == ["x.md:1: train.lrr is not a config key (training/config.py)",
                        "x.md:1: training.train has no flag --confg",
                        "x.md:1: data.shardz is not a config key (training/config.py)",
                        "x.md:1: services.encode has no flag --shard-sise"], problems


def test_python_blocks_compile():
    for block in all_blocks():
        if block.language == "python":
            compile(block.text, block.where, "exec")


def test_readme_stays_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into a guide in docs/"


def test_every_guide_is_linked_from_the_readme_and_links_resolve():
    import re

    readme = (REPO / "README.md").read_text()
    for path in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{path.name}" in readme, f"README.md does not link docs/{path.name}"
    for path in doc_files():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (path.parent / target).exists(), f"{relative(path)}: broken link {target}"
