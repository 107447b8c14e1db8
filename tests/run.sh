#!/usr/bin/env bash
# The test command: set up (once) and run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/setup.sh
exec python -m pytest -q tests "$@"
