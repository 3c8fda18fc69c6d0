"""nanoGPT data folders used as they are: train.bin / val.bin of uint16 token ids, maybe a meta.pkl.

nanoGPT's prepare scripts write the token files and, for character data (shakespeare_char), a
meta.pkl = {'vocab_size': n, 'itos': {id: char}, 'stoi': {char: id}}; its GPT-2 token folders
(shakespeare, openwebtext) have no meta.pkl. smallgpt trains on either as `dataset=`: a meta.pkl's
vocabulary becomes a `nanogpt-char` tokenizer with nanoGPT's ids, no meta.pkl means GPT-2's.

A pickle can name any function to call while it loads (os.system, say), so meta.pkl is read by an
unpickler that builds only what pickle writes without naming one: dicts, lists, tuples, strings,
bytes, numbers, booleans and None. A pickle that names a class or function is refused before that
name is even looked up.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from smallgpt.data.tokenizers import GPT2Tokenizer, NanoGPTCharTokenizer, Tokenizer
from smallgpt.errors import UserError

DTYPE = np.dtype(np.uint16)  # nanoGPT's prepare scripts and train.py use uint16 throughout
SPLITS = ("train", "val")
CHECKED_TOKENS = 1 << 20  # ids checked against the vocabulary at the start of each split


class _Refused(pickle.UnpicklingError):
    """A pickle that names a class or function."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"{module}.{name}")


def is_nanogpt_folder(folder: Path) -> bool:
    """A folder of nanoGPT token files rather than one `smallgpt prepare` wrote (it has meta.json)."""
    return (folder / "train.bin").is_file() and not (folder / "meta.json").exists()


def read_plain_pickle(path: Path) -> Any:
    """The plain data in a pickle file; UserError for anything else, with nothing executed."""
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f).load()
    except _Refused as e:
        raise UserError(
            f"{path} names {e} and was not loaded: smallgpt reads only plain dicts, lists, strings and "
            "numbers from a pickle"
        ) from None
    except Exception as e:  # a damaged pickle fails in many ways: EOFError, UnpicklingError, ValueError
        raise UserError(f"{path} is not a readable pickle ({type(e).__name__}: {e})") from None


def char_tokenizer(meta: Any, path: Path) -> NanoGPTCharTokenizer:
    """The tokenizer of nanoGPT's char meta.pkl: 'itos' maps the ids 0..n-1 to one character each."""
    itos = meta.get("itos") if isinstance(meta, dict) else None
    if (
        not isinstance(itos, dict)
        or set(itos) != set(range(len(itos)))
        or not all(isinstance(c, str) and len(c) == 1 for c in itos.values())
        or len(set(itos.values())) != len(itos)
    ):
        raise UserError(
            f"{path} has no character vocabulary ('itos': {{id: character}} for the ids 0..n-1), "
            "the only kind of nanoGPT meta.pkl smallgpt reads"
        )
    stoi = {c: i for i, c in itos.items()}
    if meta.get("stoi", stoi) != stoi or meta.get("vocab_size", len(itos)) != len(itos):
        raise UserError(f"{path}: its 'stoi' or 'vocab_size' does not agree with its 'itos'")
    return NanoGPTCharTokenizer("".join(itos[i] for i in range(len(itos))))


def nanogpt_dataset(folder: Path) -> tuple[dict[str, Any], Tokenizer]:
    """A dataset description (what meta.json holds) and the tokenizer of a nanoGPT folder."""
    pkl = folder / "meta.pkl"
    tok = char_tokenizer(read_plain_pickle(pkl), pkl) if pkl.is_file() else GPT2Tokenizer()
    tokens = {}
    for split in SPLITS:
        path = folder / f"{split}.bin"
        size = path.stat().st_size if path.is_file() else 0
        if size % DTYPE.itemsize:
            raise UserError(f"{path} has an odd number of bytes: not nanoGPT's uint16 token ids")
        tokens[split] = size // DTYPE.itemsize
        if size:
            _check_ids(path, tok)
    meta = {
        "source": f"nanoGPT folder {folder}" + ("" if pkl.is_file() else " (no meta.pkl: GPT-2 tokens)"),
        "tokenizer": {"kind": tok.kind, "fingerprint": tok.fingerprint()},
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": DTYPE.name,
        "counts": {"tokens": tokens},
    }
    return meta, tok


def _check_ids(path: Path, tok: Tokenizer) -> None:
    """Catch a mismatched meta.pkl early: the first ids of a split must be in the vocabulary."""
    top = int(np.memmap(path, dtype=DTYPE, mode="r")[:CHECKED_TOKENS].max())
    size = tok.ordinary_vocab_size
    if top >= size:
        vocab = "meta.pkl's" if tok.kind == "nanogpt-char" else "GPT-2's (there is no meta.pkl)"
        raise UserError(f"{path} holds the id {top}, outside {vocab} vocabulary of {size} ids")
