#!/usr/bin/env bash
# The test command: sets up a fresh machine (the Debian packages some tests start, then the venv, each only when
# missing) and runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/system_packages.sh  # first: without root it fails at once, before minutes of pip
source deploy/setup.sh
exec python -m pytest -q tests "$@"
