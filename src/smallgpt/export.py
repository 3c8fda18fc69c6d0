"""`smallgpt export`: a run's checkpoint as a folder `transformers` loads (converted by model/hf.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from smallgpt.errors import UserError
from smallgpt.io import atomic_dir, atomic_write_json
from smallgpt.model import hf
from smallgpt.runs import load_run
from smallgpt.train.checkpoint import model_weights


@dataclass
class ExportArgs:
    run: str = field(default="", metadata={"help": "run folder made by smallgpt train", "required": True})
    out: str = field(default="", metadata={"help": "folder to write", "required": True})
    format: str = field(default="hf", metadata={"help": "hf: a folder transformers' from_pretrained loads"})
    checkpoint: str = field(default="best", metadata={"help": "which checkpoint of the run: best | last"})


def export(args: ExportArgs) -> Path:
    """Write the run's model, config and tokenizer as one folder (whole, or not at all)."""
    if args.format != "hf":
        raise UserError(f"export format must be hf, got {args.format!r}")
    model, tokenizer = load_run(args.run, torch.device("cpu"), args.checkpoint)
    arch = hf.hf_architecture(model.config)
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        save_file(
            hf.hf_weights(model_weights(model), model.config, arch), tmp / hf.HF_WEIGHTS, {"format": "pt"}
        )
        atomic_write_json(tmp / "config.json", hf.hf_config(model.config, arch, tokenizer.eot_id))
        ids = {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}
        atomic_write_json(tmp / "generation_config.json", ids)
        note = hf.write_tokenizer(tokenizer, model.config.block_size, tmp)
    print(f"exported {args.run} as {hf.ARCHITECTURES[arch]} to {out}{note}")
    return out
