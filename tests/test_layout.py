"""The layout of services/ and training/: the commands users type at the top, every other module in a subpackage
named after what it does, and import arrows pointing one way: entry points -> parts -> shared. Read with ast from
the files (nothing is imported), lazy imports inside functions included."""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP = ("services", "training", "shared")
COMMANDS = {  # `python -m NAME`, as the README, docs, deploy/ and tests type them
    "services.encode", "services.status", "services.kantts",
    "training.train", "training.export", "training.reproduce", "training.rehearsal",
}
PROCESS_MAINS = {"services.encode.reaper"}  # started by the encode driver (`-m services.encode.reaper PID`), not typed
TRAINING_WIDE = {"training.config"}  # the typed config every training part reads, beside training/configs/
CROSSING: dict[tuple[str, str], str] = {}  # (importer, imported) between services and training, with why: none today


def module_files(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module and package of services/, training/ and shared/."""
    found = {}
    for top in TOP:
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def entry_module(command: str, modules: dict[str, Path]) -> str | None:
    """The module `python -m command` runs: the package's __main__, else the module itself."""
    return next((m for m in (f"{command}.__main__", command) if m in modules), None)


def imported(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports: `from PACKAGE import NAME` names PACKAGE.NAME when that is a module,
    else PACKAGE; lazy imports inside functions count."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    return {n for n in names if n.split(".")[0] in TOP}


def has_main_block(path: Path) -> bool:
    return any(isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
               and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
               for node in ast.parse(path.read_text()).body)


def layout_problems(root: Path) -> list[str]:
    modules = module_files(root)
    entries = {}
    problems = []
    for command in sorted(COMMANDS):
        entry = entry_module(command, modules)
        if entry is None or not has_main_block(modules[entry]):
            problems.append(f"`python -m {command}`: no module with an `if __name__ == \"__main__\":` block "
                            f"({command.replace('.', '/')}.py or {command.replace('.', '/')}/__main__.py)")
        else:
            entries[entry] = command
    runnable = set(entries) | PROCESS_MAINS
    for name, path in modules.items():
        rel = path.relative_to(root)
        top = name.split(".")[0]
        if top != "shared" and has_main_block(path) and name not in runnable:
            problems.append(f"{rel}: an `if __name__ == \"__main__\":` block in a part; commands are "
                            f"{sorted(COMMANDS)} (a new one goes into COMMANDS)")
        if top != "shared" and len(rel.parts) == 2 and rel.name != "__init__.py" \
                and name not in entries and name not in TRAINING_WIDE:
            problems.append(f"{rel}: a part at the top of {top}/; move it into the subpackage of what it does")
        for target in sorted(imported(path, modules)):
            target_top = target.split(".")[0]
            if top == "shared" and target_top != "shared":
                problems.append(f"{rel} imports {target}: shared/ imports nothing from services/ or training/")
            if target in entries:
                problems.append(f"{rel} imports {target}, the entry point of `python -m {entries[target]}`; "
                                "import the part that holds what it needs")
            if {top, target_top} == {"services", "training"} and (name, target) not in CROSSING:
                problems.append(f"{rel} imports {target}: services/ and training/ meet only through shared/ "
                                "and the on-disk format")
    return problems


def test_layout():
    assert layout_problems(REPO) == []


def test_layout_catches_each_wrong_arrow(tmp_path):
    """Each deliberately wrong arrow, added to a copy of this tree, is reported, and nothing else changes."""
    for top in TOP:
        shutil.copytree(REPO / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    before = set(layout_problems(tmp_path))
    wrong = {
        "shared/audio.py": ("from training.config import Config\n", "shared/audio.py imports training.config"),
        "training/config.py": ("from training.reproduce import main\n", "imports training.reproduce, the entry"),
        "services/kantts.py": ("import training.config\n", "services/kantts.py imports training.config: services/"),
    }
    for name, (line, expected) in wrong.items():
        path = tmp_path / name
        original = path.read_text()
        path.write_text(original + f"\n\ndef _wrong():\n    {line}")
        new = set(layout_problems(tmp_path)) - before
        assert len(new) == 1 and expected in new.pop(), (name, new)
        path.write_text(original)
    training = tmp_path / "training"
    (training / "loose_part.py").write_text('"""A part left at the top."""\n')
    config = training / "config.py"
    config.write_text(config.read_text() + '\nif __name__ == "__main__":\n    pass\n')
    new = sorted(set(layout_problems(tmp_path)) - before)
    assert len(new) == 2 and "a part at the top of training/" in new[1] and "block in a part" in new[0], new
