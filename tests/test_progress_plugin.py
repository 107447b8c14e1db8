"""The suite's progress under -q (tests/progress_plugin.py, loaded by tests/conftest.py): one readable line as
each test file starts, and pytest's closing summary line unchanged (CI reads it)."""
import re
import subprocess
import sys

from tests.conftest import REPO


def test_quiet_run_names_each_file_with_its_position_and_the_time_so_far(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_a():\n    pass\n\n\ndef test_b():\n    pass\n")
    (tmp_path / "test_two.py").write_text("def test_c():\n    assert False\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "-p", "tests.progress_plugin", str(tmp_path)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    lines = result.stdout.splitlines()
    marks = [line for line in lines if line.startswith("[")]
    assert len(marks) == 2, result.stdout
    assert re.fullmatch(r"\[1/2\] test_one\.py \(2 tests\), \d+m\d\ds elapsed", marks[0]), marks
    assert re.fullmatch(r"\[2/2\] test_two\.py \(1 test\), \d+m\d\ds elapsed", marks[1]), marks
    assert lines[lines.index(marks[0]) + 1] == ".."  # the dots of a file stay on lines of their own
    assert re.fullmatch(r"1 failed, 2 passed in [\d.]+s", lines[-1]), lines[-1]
