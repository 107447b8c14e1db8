"""The docs read as data: their fenced blocks with the marker each carries, their reference tables, and the
commands inside a shell block (which entry point of ours each runs, with which flags and key=value overrides).
tests/test_docs_reference.py checks these against the code; tests/test_docs_commands.py runs the `run` blocks.

A shell block's info string is `bash MARKER`; GitHub renders it as bash whatever the marker:
  run          executed by tests/test_docs_commands.py, in order, in one temporary directory (tiny model and codec)
  long         runs for many minutes on one machine (the demo, the test suite, benchmarks): checked only
  cluster      needs several nodes, a Ray or Kubernetes cluster, or an object store: checked only
  accelerator  needs NPUs or GPUs, or the released weights at full size: checked only
"Checked" means `bash -n` passes, every --flag given to one of our entry points exists in its argparse parser,
and every key=value override given to training is a config key.
"""
from __future__ import annotations

import ast
import importlib
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
MARKERS = {"run", "long", "cluster", "accelerator"}
CHECKED_ONLY = MARKERS - {"run"}
# Our `python -m` entry points; each module exposes build_parser().
ENTRY_POINTS = ("services.encode", "services.kantts", "services.status", "training.train", "training.export",
                "training.reproduce", "training.rehearsal", "shared.tiny", "shared.tiny_asr", "shared.synth")
# A command that is a thin `__main__.py` (or module) over a part: the part holds build_parser().
PARSER_HOMES = {"services.encode": "services.encode.driver", "services.status": "services.status.server",
                "training.train": "training.train.loop", "training.export": "training.export.model_dir",
                "training.rehearsal": "training.data.rehearsal"}
OUR_PACKAGES = ("services.", "training.", "shared.", "benchmarks.")
# deploy/ scripts whose arguments go to an entry point: submit_encode.sh passes them to services.encode; train.sh
# and train_on_shards.sh take a config (or shards directory) and then training key=value overrides.
SCRIPT_ENTRY_POINTS = {"deploy/submit_encode.sh": "services.encode", "deploy/train.sh": "training.train",
                       "deploy/train_on_shards.sh": "training.train"}
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "{", "}", "do", "then", "else", "done", "fi", "|&", ";;"}
OVERRIDE = re.compile(r"^([a-z_]+(?:\.[a-z_]+)+)=")


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


@dataclass
class Block:
    path: str  # relative to the repository
    line: int  # of the opening fence, 1-based
    language: str
    marker: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.language in SHELL_LANGUAGES


def blocks(path: Path, text: str | None = None) -> list[Block]:
    """Fenced blocks (``` or ~~~, indented ones in lists too) with the first two words of their info string."""
    lines = (text if text is not None else path.read_text()).splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})(.*)$", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, info = opening.group(1), opening.group(2), opening.group(3).split()
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence)}\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        found.append(Block(relative(path) if path.is_absolute() else str(path), i + 1,
                           info[0] if info else "", info[1] if len(info) > 1 else "", "\n".join(body) + "\n"))
        i = j + 1
    return found


def looks_like_commands(block: Block) -> bool:
    """A block with no language whose lines start like one of our commands: it must be marked as shell."""
    starts = ("python", ".venv/bin/python", "torchrun", "bash ", "deploy/", "kubectl ", "ray ", "curl ")
    return not block.language and any(line.strip().startswith(starts) for line in block.text.splitlines())


# ------------------------------------------------------------------------------------------ reference tables
KEY_HEADER = "config key"
FLAG_HEADER = re.compile(r"^`python -m ([\w.]+(?: [\w-]+)?)` flag$")


@dataclass
class Home:
    kind: str  # "config key", or the entry point ("services.encode", "training.reproduce check") for a flag
    name: str
    where: str


def table_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def homes(path: str, text: str) -> list[Home]:
    """Rows of reference tables: a table whose header's first cell is `config key`, or `python -m MODULE` (with a
    subcommand) followed by `flag`; each row's first cell holds one or more backticked names (`--a` / `--b`)."""
    found, kind = [], None
    lines = text.splitlines()
    for n, line in enumerate(lines):
        if not line.lstrip().startswith("|"):
            kind = None
            continue
        if n + 1 < len(lines) and re.match(r"^\s*\|[\s:|-]+\|\s*$", lines[n + 1]) and "-" in lines[n + 1]:
            first = table_cells(line)[0]
            flag = FLAG_HEADER.match(first)
            kind = KEY_HEADER if first == KEY_HEADER else flag.group(1) if flag else None
            continue
        if kind is None or re.match(r"^\s*\|[\s:|-]+\|\s*$", line):
            continue
        for name in re.findall(r"`([^`]+)`", table_cells(line)[0]):
            found.append(Home(kind, name.split()[0], f"{path}:{n + 1}"))
    return found


# ------------------------------------------------------------------------------------------ code side
@cache
def parser_flags(entry: str) -> frozenset[str]:
    """--flags of an entry point ("training.reproduce check": that subcommand's), --help left out."""
    module, _, sub = entry.partition(" ")
    parser = build_parser(module)
    if sub:
        (subparsers,) = [a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)]
        parser = subparsers.choices[sub]
    return frozenset(o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help")


def build_parser(command: str):
    return importlib.import_module(PARSER_HOMES.get(command, command)).build_parser()


def subcommands(entry: str) -> list[str]:
    parser = build_parser(entry)
    return [name for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)
            for name in a.choices]


def documented_entries() -> dict[str, frozenset[str]]:
    """Every flag table the docs must hold: one per entry point, one per subcommand where it has them."""
    entries = {}
    for module in ENTRY_POINTS:
        for entry in [f"{module} {sub}" for sub in subcommands(module)] or [module]:
            entries[entry] = parser_flags(entry)
    return entries


@cache
def script_flags(module: str) -> frozenset[str]:
    """--flags a benchmarks/ script declares (read from its source and from benchmarks/common.py's helpers it
    calls), for scripts outside ENTRY_POINTS: a check of spelling, not a parse."""
    path = REPO / (module.replace(".", "/") + ".py")
    sources = [path.read_text()]
    if "common" in sources[0]:
        sources.append((REPO / "benchmarks" / "common.py").read_text())
    flags = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return frozenset(flags)


@cache
def known_keys() -> frozenset[str]:
    from training.train.validate import known_keys as keys

    return frozenset(keys())


# ------------------------------------------------------------------------------------------ commands in a block
def without_heredocs(text: str) -> str:
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        out.append(lines[i])
        marker = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", lines[i])
        i += 1
        if marker:
            while i < len(lines) and lines[i].strip() != marker.group(1):
                i += 1
            i += 1
    return "\n".join(out)


def logical_lines(text: str) -> list[str]:
    return [line for line in without_heredocs(text).replace("\\\n", " ").splitlines() if line.strip()]


def simple_commands(line: str) -> list[list[str]]:
    """The line's simple commands as word lists; a quoted word that itself holds a command (ssh "cd x && ...")
    is split again."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current = [], []
    for word in lexer:
        if word in SEPARATORS:
            commands.append(current)
            current = []
            continue
        current.append(word)
        if " " in word and (" -m " in word or "deploy/" in word):
            commands += simple_commands(word)
    commands.append(current)
    return [c for c in commands if c]


@dataclass
class Invocation:
    entry: str  # "services.encode", "training.reproduce" ..., or "benchmarks.x" (flags read from the source)
    args: list[str]
    where: str


def invocations(block: Block) -> list[Invocation]:
    found = []
    for line in logical_lines(block.text):
        for words in simple_commands(line):
            for i, word in enumerate(words):
                entry = None
                if word == "-m" and i + 1 < len(words) and words[i + 1].startswith(OUR_PACKAGES):
                    entry, args = words[i + 1], words[i + 2:]
                elif re.fullmatch(r"(\S*/)?benchmarks/\w+\.py", word):
                    entry, args = "benchmarks." + Path(word).stem, words[i + 1:]
                else:
                    script = next((s for s in SCRIPT_ENTRY_POINTS if word.endswith(s)), None)
                    if script:
                        entry, args = SCRIPT_ENTRY_POINTS[script], words[i + 1:]
                if entry:
                    found.append(Invocation(entry, args, block.where))
                    break
    return found


def invocation_problems(call: Invocation) -> list[str]:
    """Flags that the entry point lacks and overrides that are not config keys."""
    entry, args = call.entry, call.args
    if entry.startswith("benchmarks."):
        if not (REPO / (entry.replace(".", "/") + ".py")).is_file():
            return [f"{call.where}: no such script {entry}"]
        flags = script_flags(entry)
    elif entry.split(" ")[0] not in ENTRY_POINTS:
        return [f"{call.where}: python -m {entry} is not one of the entry points the docs test knows "
                f"(tests/doc_blocks.py ENTRY_POINTS)"]
    else:
        subs = subcommands(entry)
        if subs:
            if not args or args[0] not in subs:
                return [f"{call.where}: {entry} needs one of its subcommands {subs}"]
            entry, args = f"{entry} {args[0]}", args[1:]
        flags = parser_flags(entry)
    problems = []
    for arg in args:
        arg = arg.strip("[]")
        if arg.startswith("--") and arg.split("=")[0] not in flags:
            problems.append(f"{call.where}: {entry} has no flag {arg.split('=')[0]}")
        key = OVERRIDE.match(arg)
        if key and entry == "training.train" and key.group(1) not in known_keys():
            problems.append(f"{call.where}: {key.group(1)} is not a config key (training/config.py)")
    return problems
