#!/usr/bin/env bash
# The README's chat demo: prepare the LCCC toy dialogues (../shared/data, or LCCC=path/to/toy_train.txt),
# train a small char-level Chinese chat model for about ten minutes on the CPU, print its val loss on
# bot turns and a few replies. Extra arguments go to `smallgpt train` (e.g. --max_seconds=60).
# A rerun replaces the demo's own data folder and run (--overwrite); other runs are never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
LCCC=${LCCC:-../shared/data/chitchat_lccc/toy_train.txt}
bash scripts/setup.sh
.venv/bin/smallgpt prepare --input "$LCCC" --format chat --block-size 64 --out data/lccc_chat_char --overwrite
.venv/bin/smallgpt train configs/chat_lccc_cpu.yaml --overwrite "$@"
.venv/bin/python - <<'PY'
import json
evals = [e for e in map(json.loads, open("runs/chat_lccc/metrics.jsonl")) if e["event"] == "eval"]
best = min(evals, key=lambda e: e["val_loss"])
print(f"best val loss on bot turns: {best['val_loss']:.3f} at iter {best['iter']} (last: {evals[-1]['val_loss']:.3f})")
PY
for message in "你好" "今天天气真好" "你喜欢吃什么？" "晚安"; do
    echo "user> $message"
    echo -n "bot> "
    .venv/bin/smallgpt chat --run runs/chat_lccc --message "$message"
done
