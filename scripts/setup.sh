#!/usr/bin/env bash
# Create .venv (once) and install smallgpt into it with its dev tools, torch pinned to the
# build in requirements/constraints.txt. Safe to run again: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -e ".[dev]"
