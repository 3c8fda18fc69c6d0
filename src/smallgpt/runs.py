"""Loading a trained model: a run folder (checkpoint + tokenizer) or Hugging Face weights.

The one loading path of everything that uses a trained model: sample, continue, chat, classify,
export, serve and the Python API. It sits above train/ (it reads train's checkpoints) and below them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smallgpt.data.tokenizers import Tokenizer, load_tokenizer
from smallgpt.errors import UserError
from smallgpt.model.gpt import GPT
from smallgpt.model.quantize import for_inference
from smallgpt.train import checkpoint
from smallgpt.train.checkpoint import find_checkpoint


@dataclass
class Precision:
    """How a loaded model computes: the flags of every front-end that loads one for inference
    (sample, continue, chat, eval, serve); see model/quantize.py."""

    dtype: str = field(
        default="float32",
        metadata={"help": "float32 | bfloat16 (CPUs with AVX512-BF16 or AMX, GPUs) | float16 (GPUs)"},
    )
    quantize: str = field(
        default="none",
        metadata={"help": "none | int8: int8 weights, one scale per output channel (fastest on a CPU)"},
    )


def run_tokenizer(run_dir: str | Path, ckpt: Path) -> Tokenizer:
    """The run's tokenizer.json, checked against the one checkpoint `ckpt` was trained with."""
    tokenizer = load_tokenizer(Path(run_dir) / "tokenizer.json")
    trained_with = checkpoint.read_tags(ckpt).get("tokenizer_fingerprint")
    if trained_with is not None and trained_with != tokenizer.fingerprint():
        raise UserError(f"{run_dir}/tokenizer.json is not the tokenizer checkpoint {ckpt} was trained with")
    return tokenizer


def load_run(
    run_dir: str | Path,
    device: torch.device,
    which: str = "best",
    dtype: str = "float32",
    quantize: str = "none",
) -> tuple[GPT, Tokenizer]:
    """The model of a run's checkpoint (in eval mode) and the tokenizer it was trained with.

    dtype (float32 | bfloat16 | float16) and quantize (none | int8) are for inference only, see
    model/quantize.py; a model loaded to be trained further keeps the defaults.
    """
    ckpt = find_checkpoint(run_dir, which)
    tokenizer = run_tokenizer(run_dir, ckpt)
    model = checkpoint.load_model(ckpt, device)  # a LoRA run's base with its adapters merged
    tags = checkpoint.read_tags(ckpt)
    if "base_run" in tags:  # say what was loaded: a fine-tune's weights are partly its base's
        print(f"{run_dir}: {checkpoint.describe_origin(tags, run_dir)}", file=sys.stderr)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"checkpoint {ckpt} has fewer token ids than {run_dir}/tokenizer.json")
    return for_inference(model, dtype, quantize), tokenizer


def load_source(
    run: str,
    init_from: str,
    which: str,
    device: torch.device,
    dtype: str = "float32",
    quantize: str = "none",
) -> tuple[GPT, Tokenizer]:
    """A run's checkpoint (`--run`), or Hugging Face weights such as OpenAI's GPT-2 (`--init-from`),
    in `dtype` and optionally with int8 weights (`quantize`)."""
    if bool(run) == bool(init_from):
        raise UserError("pass either --run DIR or --init-from (gpt2, ..., gpt2-xl or a Hugging Face folder)")
    if run:
        return load_run(run, device, which, dtype, quantize)
    from smallgpt.model import hf  # conversion code only when asked for

    pretrained = hf.open_pretrained(init_from)
    return for_inference(pretrained.model().to(device), dtype, quantize), pretrained.tokenizer
