"""The Debian programs some tests start for real (headless Chromium, Prometheus). tests/run.sh installs them
through deploy/system_packages.sh; a test that finds one missing fails with the command that installs it: a skip
would hide the missing feature."""
import shutil

import pytest


def system_tool(package: str, *commands: str) -> str:
    """The path of the first of `commands` (default: the package's name) on PATH; fails the test when none is."""
    for command in commands or (package,):
        path = shutil.which(command)
        if path is not None:
            return path
    pytest.fail(f"{' / '.join(commands or (package,))} not on PATH: as root run `apt-get update && apt-get install "
                f"-y --no-install-recommends {package}` (`bash tests/run.sh` as root does it: deploy/system_packages.sh)",
                pytrace=False)
