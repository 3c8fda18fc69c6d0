"""`smallgpt export`: a run's checkpoint as a folder `transformers` loads (converted by model/hf.py) or
as one GGUF file for llama.cpp and ollama (model/gguf.py)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from smallgpt.chat.format import BOT_TOKEN, CHAT_TOKENS, END_TOKEN, SYSTEM_TOKEN, USER_TOKEN
from smallgpt.data.tokenizers import EOT, Tokenizer
from smallgpt.errors import UserError
from smallgpt.io import atomic_dir, atomic_file, atomic_write_json, check_folder_target, refuse_to_replace
from smallgpt.model import gguf, hf
from smallgpt.runs import load_run
from smallgpt.train.checkpoint import model_weights

FORMATS = ("hf", "gguf")


@dataclass
class ExportArgs:
    run: str = field(default="", metadata={"help": "run folder made by smallgpt train", "required": True})
    out: str = field(default="", metadata={"help": "folder (hf) or file (gguf) to write", "required": True})
    format: str = field(
        default="hf",
        metadata={
            "help": "hf: a folder transformers' from_pretrained loads | gguf: one file for llama.cpp, ollama"
        },
    )
    dtype: str = field(
        default="f32", metadata={"help": "gguf weights: f32 | f16 (half the size) | q8_0 (about a quarter)"}
    )
    checkpoint: str = field(default="best", metadata={"help": "which checkpoint of the run: best | last"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing export at --out"})


def check_out(out: Path, folder: bool, overwrite: bool) -> None:
    """The export's place: in an existing folder, of the export's kind (a folder, or a file), and
    replacing an earlier export only when told."""
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: folder {out.parent} does not exist")
    if folder:
        check_folder_target(out)
    elif out.is_dir():
        raise UserError(f"cannot write {out}: it is a folder")
    if out.exists():
        refuse_to_replace(out, "an export", overwrite)


def export(args: ExportArgs) -> Path:
    """Write the run's model and tokenizer (whole, or not at all) in the chosen format."""
    if args.format not in FORMATS:
        close = difflib.get_close_matches(args.format, FORMATS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"export format must be {' or '.join(FORMATS)}, got {args.format!r}{hint}")
    gguf.check_dtype(args.dtype)
    if args.format == "hf" and args.dtype != "f32":
        raise UserError(f"--dtype {args.dtype} is for --format gguf: a hf folder holds the float32 weights")
    out = Path(args.out)
    check_out(out, folder=args.format == "hf", overwrite=args.overwrite)
    model, tokenizer = load_run(args.run, torch.device("cpu"), args.checkpoint)
    if args.format == "gguf":
        with atomic_file(out) as tmp:
            arch = gguf.write_gguf(
                tmp,
                model_weights(model),
                model.config,
                tokenizer,
                args.dtype,
                name=Path(args.run).resolve().name,
                chat=chat_template(tokenizer),
            )
        print(f"exported {args.run} as llama.cpp's {arch} ({args.dtype}) to {out}")
        return out
    arch = hf.hf_architecture(model.config)
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


def chat_template(tokenizer: Tokenizer) -> tuple[str, int] | None:
    """A chat run's Jinja chat template for llama.cpp's and ollama's chat endpoints, and the id that
    ends a reply (<|end|>); None for a run without chat tokens.

    It writes ChatFormat.prompt's ids: a new dialogue (<|endoftext|>), a run with <|system|> its
    system messages joined by newlines as the first turn (chat/format.py's system_first), each turn
    as <|user|> text <|end|> or <|bot|> text <|end|>, then <|bot|> for the reply. A run without
    <|system|> has no turn for system messages: the template leaves them out, as smallgpt does.
    """
    if any(t not in tokenizer.special_tokens for t in CHAT_TOKENS):
        return None
    system = ""
    if SYSTEM_TOKEN in tokenizer.special_tokens:
        system = (
            "{% set ns = namespace(system='') %}{% for message in messages %}"
            "{% if message['role'] == 'system' and message['content'] %}"
            "{% set ns.system = ns.system + ('\\n' if ns.system else '') + message['content'] %}"
            "{% endif %}{% endfor %}"
            f"{{% if ns.system %}}{SYSTEM_TOKEN}{{{{ ns.system }}}}{END_TOKEN}{{% endif %}}"
        )
    turns = (
        "{% for message in messages %}"
        f"{{% if message['role'] == 'user' %}}{USER_TOKEN}{{{{ message['content'] }}}}{END_TOKEN}"
        f"{{% elif message['role'] == 'assistant' %}}{BOT_TOKEN}{{{{ message['content'] }}}}{END_TOKEN}"
        "{% endif %}{% endfor %}"
    )
    generation = f"{{% if add_generation_prompt %}}{BOT_TOKEN}{{% endif %}}"
    return EOT + system + turns + generation, tokenizer.special_tokens[END_TOKEN]
