"""`smallgpt prepare`: the one routing step between text preparation (data/prepare.py) and chat
preparation (chat/prepare.py). It sits above both, so data/ never imports chat/, and above runs.py,
which gives `--tokenizer-from RUN` the tokenizer the run's checkpoint was trained with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smallgpt.chat.corpora import READERS
from smallgpt.chat.prepare import prepare_chat
from smallgpt.data.prepare import PrepareArgs, prepare_text
from smallgpt.data.readers import read_json_lines
from smallgpt.errors import UserError

__all__ = ["PrepareArgs", "data_format", "run_prepare"]


def data_format(args: PrepareArgs) -> str:
    """text, or the dialogue format to read: chat (detect per file) or a reader's name."""
    known = ("auto", "text", "chat", *READERS)
    if args.format not in known:
        raise UserError(f"unknown --format {args.format!r}; known: {', '.join(known)}")
    if args.format != "auto":
        return args.format
    path = Path(args.input or args.source or "")
    if path.suffix == ".json" or (path.suffix == ".jsonl" and _holds_dialogues(path, args.text_field)):
        return "chat"
    return "text"


def _holds_dialogues(path: Path, text_field: str) -> bool:
    """Whether a JSON-lines file's first record is a dialogue ({"messages": [...]}) rather than
    a document with a text field."""
    if not path.is_file():
        return False
    try:
        _, record = next(read_json_lines(path), (0, None))
    except UserError:
        return False  # reading it as text reports the problem
    return isinstance(record, dict) and "messages" in record and text_field not in record


def run_prepare(args: PrepareArgs) -> dict[str, Any]:
    """Prepare a dataset folder (documents or dialogues); returns its meta (also in meta.json)."""
    fmt = data_format(args)
    tokenizer = None
    if args.tokenizer_from:
        from smallgpt.runs import find_checkpoint, run_tokenizer  # imports torch: ~180 MB, only when needed

        tokenizer = run_tokenizer(args.tokenizer_from, find_checkpoint(args.tokenizer_from, "last"))
    if fmt != "text":
        return prepare_chat(args, fmt, tokenizer)
    return prepare_text(args, tokenizer)
