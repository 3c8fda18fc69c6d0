"""Helpers shared by the benchmark scripts: the shared corpora, a prepared dataset, a Markdown table."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def prepare_once(input_path: Path, out: Path, tokenizer: str = "char") -> Path:
    """Prepare `input_path` into `out` unless a dataset is already there."""
    from smallgpt.preparation import PrepareArgs, run_prepare  # here: gpu_check imports smallgpt per row

    if not (out / "meta.json").is_file():
        run_prepare(PrepareArgs(input=str(input_path), out=str(out), tokenizer=tokenizer))
    return out


def machine() -> str:
    """CPU model, core count and torch version, for the tables' captions."""
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = names[0] if names else cpu
    return f"{cpu} ({cpu_bf16_flags()}), {os.cpu_count()} cores, torch {torch.__version__}"


def cpu_bf16_flags() -> str:
    """The CPU's native bfloat16 units: what `dtype: bfloat16` runs on."""
    from smallgpt.device import cpu_bf16_units

    return ", ".join(cpu_bf16_units()) or "no native bf16"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def today() -> str:
    return time.strftime("%Y-%m-%d")
