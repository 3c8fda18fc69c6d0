"""Data preparation: sources of text, tokenizers, and the prepared train/val token files."""

from smallgpt.data.prepare import META_FORMAT_VERSION, PrepareArgs, load_meta, prepare_text
from smallgpt.data.sources import Source, open_source
from smallgpt.data.tokenizers import (
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_dict,
)

__all__ = [
    "META_FORMAT_VERSION",
    "PrepareArgs",
    "Source",
    "Tokenizer",
    "build_tokenizer",
    "load_meta",
    "load_tokenizer",
    "open_source",
    "prepare_text",
    "save_tokenizer",
    "tokenizer_from_dict",
]
