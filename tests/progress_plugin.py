"""Progress a person can read while the suite runs: `-q` alone prints bare dots for minutes between its
percentage markers, because single tests (a torchrun run, a Ray job) take minutes. This prints, as each test file
starts, `[k/N] tests/test_x.py (n tests), 12m05s elapsed`. pytest's own lines, the closing summary included,
are untouched; without -q it stays silent. tests/conftest.py loads it; `-p tests.progress_plugin` loads it anywhere."""
from __future__ import annotations

import time

import pytest


class FileProgress:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.files: dict[str, int] = {}  # test file -> number of its selected tests, in run order
        self.current: str | None = None
        self.started = time.monotonic()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:
            path = item.nodeid.split("::", 1)[0]
            self.files[path] = self.files.get(path, 0) + 1
        self.started = time.monotonic()

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        path = nodeid.split("::", 1)[0]
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if path == self.current or path not in self.files or reporter is None:
            return
        self.current = path
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        count = self.files[path]
        if reporter._tw.width_of_current_line:  # after -q's dots: pytest tracks no file there to end the line
            reporter.write("\n")
        reporter.write_line(f"[{list(self.files).index(path) + 1}/{len(self.files)}] {path} "
                            f"({count} test{'s' * (count != 1)}), {minutes}m{seconds:02d}s elapsed")


def pytest_configure(config: pytest.Config) -> None:
    # Only under -q (what tests/run.sh passes): without it pytest names each file as it starts anyway.
    if config.get_verbosity() < 0 and not config.pluginmanager.has_plugin("file-progress"):
        config.pluginmanager.register(FileProgress(config), "file-progress")
