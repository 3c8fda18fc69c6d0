#!/usr/bin/env bash
# Create .venv (once) and install smallgpt into it with its dev tools, torch pinned to the
# build in requirements/constraints.txt. Safe to run again: pip skips what is already there.
# As root (CI, our dev boxes) it also installs Debian's chromium (and a CJK font) for the web page's browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -e ".[dev]"
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing chromium (for tests/test_serve_page.py)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei >/dev/null
fi
