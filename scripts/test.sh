#!/usr/bin/env bash
# The full test suite: ruff, mypy --strict and pytest (unit tests, then tests that boot VMs).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || py=python3
"$py" -m pytest -ra -p no:cacheprovider "$@"
