"""`smallgpt prepare`: the one routing step between text preparation (data/prepare.py) and chat
preparation (chat/prepare.py). It sits above both, so data/ never imports chat/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smallgpt.chat.corpora import READERS
from smallgpt.chat.prepare import prepare_chat
from smallgpt.data.prepare import PrepareArgs, prepare_text
from smallgpt.errors import UserError

__all__ = ["PrepareArgs", "data_format", "run_prepare"]


def data_format(args: PrepareArgs) -> str:
    """text, or the dialogue format to read: chat (detect per file) or a reader's name."""
    known = ("auto", "text", "chat", *READERS)
    if args.format not in known:
        raise UserError(f"unknown --format {args.format!r}; known: {', '.join(known)}")
    if args.format != "auto":
        return args.format
    path = args.input or args.source or ""
    return "chat" if Path(path).suffix in (".json", ".jsonl") else "text"


def run_prepare(args: PrepareArgs) -> dict[str, Any]:
    """Prepare a dataset folder (documents or dialogues); returns its meta (also in meta.json)."""
    fmt = data_format(args)
    return prepare_text(args) if fmt == "text" else prepare_chat(args, fmt)
