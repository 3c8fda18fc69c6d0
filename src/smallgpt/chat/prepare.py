"""`smallgpt prepare --format chat`: dialogues -> train.bin / val.bin plus their loss masks.

The same stages and folder as text preparation (data/prepare.py), with dialogues instead of
documents: read the conversations once to count them and collect the char vocabulary, add the chat
special tokens, then encode every dialogue and write its ids to `<split>.bin` and its loss mask
(1 = a bot-turn target, see chat/format.py) to `<split>.mask.bin`, uint8 and aligned with the ids.
A dialogue longer than `block_size` tokens is cut into windows of whole turns, each followed by
end-of-text, so a window fits in one training sample. System messages (JSONL) are kept: the
tokenizer gets `<|system|>` when the dialogues have any, and every window of a dialogue starts with
its system turn (loss mask 0), as the model sees it at chat time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from smallgpt.chat.corpora import read_dialogues
from smallgpt.chat.format import (
    CHAT_TOKENS,
    SYSTEM,
    SYSTEM_TOKEN,
    ChatFormat,
    Conversation,
    cut_turn,
    join_turns,
    windows,
)
from smallgpt.data.prepare import (
    SPLITS,
    Counts,
    PrepareArgs,
    check_args,
    dataset_meta,
    output_folder,
    route_by_document,
)
from smallgpt.data.sources import Source
from smallgpt.data.tokenizers import Tokenizer, build_tokenizer, save_tokenizer
from smallgpt.errors import UserError
from smallgpt.io import atomic_dir, atomic_write_json
from smallgpt.progress import progress_bar

CHAT_SUFFIXES = (".txt", ".json", ".jsonl")
FLUSH_TOKENS = 1 << 20  # ids held per split before they are appended to the files


def prepare_chat(args: PrepareArgs, fmt: str, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Prepare a chat data folder from dialogue files; returns its meta (also in meta.json).
    `tokenizer`: a run's (--tokenizer-from), the chat tokens added if it lacks them."""
    check_args(args)
    if args.block_size < 8:
        raise UserError(f"--block-size must be at least 8 tokens, not {args.block_size}")
    source = _chat_source(args.input or args.source)
    suffix = Path(args.tokenizer_from).name if args.tokenizer_from else args.tokenizer.replace(":", "")
    out = output_folder(args, f"{source.name}_chat_{suffix}")
    tok, counts = _scan(source, fmt, args.tokenizer, tokenizer)
    print(f"dialogues: {counts.documents:,}, characters: {counts.characters:,}")
    print(f"vocab size: {tok.vocab_size:,} (with the chat tokens {', '.join(tok.added_tokens().values())})")

    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    with atomic_dir(out) as tmp:
        stats, chat = _write_splits(source, fmt, tok, counts, args, dtype, tmp)
        meta = dataset_meta(source, tok, counts, stats, args, dtype)
        meta["chat"] = {"format": fmt, "block_size": args.block_size, **chat}
        save_tokenizer(tok, tmp / "tokenizer.json")
        atomic_write_json(tmp / "meta.json", meta)

    for split in SPLITS:
        print(f"{split}: {stats['documents'][split]:,} dialogues, {stats['tokens'][split]:,} tokens")
    if chat["cut_turns"]:
        print(f"{chat['cut_turns']:,} turns longer than {args.block_size} tokens were cut to fit")
    print(f"wrote {out}/ (train.bin, val.bin, their .mask.bin loss masks, meta.json, tokenizer.json)")
    return meta


def _chat_source(path_name: str | None) -> Source:
    """The dialogue files named on the command line: a file, or a folder's .txt/.json/.jsonl files."""
    if path_name is None:
        raise UserError("no dialogues given: pass --input PATH (a file or folder of dialogue files)")
    path = Path(path_name)
    if not path.exists():
        raise UserError(f"input path {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in CHAT_SUFFIXES)
    if not files:
        raise UserError(f"input folder {path} has no .txt, .json or .jsonl dialogue files")
    return Source(path.stem if path.is_file() else path.name, files, origin=str(path))


def _scan(source: Source, fmt: str, kind: str, given: Tokenizer | None) -> tuple[Tokenizer, Counts]:
    """One pass: count dialogues and characters, collect the char vocabulary (unless `given` a run's
    tokenizer); add the chat tokens (`<|system|>` too when a dialogue has a system turn)."""
    counts = Counts()
    roles: set[str] = set()

    def texts() -> Iterator[str]:
        for conversation in read_dialogues(source.files, fmt):
            counts.documents += 1
            for turn in conversation:
                roles.add(turn.role)
                counts.characters += len(turn.text)
                counts.bytes += len(turn.text.encode("utf-8"))
                yield turn.text

    stream = texts()
    tok = given if given is not None else build_tokenizer(kind, stream)
    deque(stream, maxlen=0)  # finish counting when the tokenizer needed no text (gpt2)
    if counts.documents == 0:
        raise UserError(f"input {source.origin} contains no dialogues")
    tok.add_special_tokens(CHAT_TOKENS + ((SYSTEM_TOKEN,) if SYSTEM in roles else ()))
    return tok, counts


def _write_splits(
    source: Source, fmt: str, tok: Tokenizer, counts: Counts, args: PrepareArgs, dtype: type, folder: Path
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Encode every dialogue into windows and append ids and mask to its split's files."""
    chat_format = ChatFormat(tok)
    stats = {k: dict.fromkeys(SPLITS, 0) for k in ("documents", "tokens", "bytes")}
    chat = {"windows": 0, "cut_turns": 0}
    dialogues = ((conversation, True) for conversation in read_dialogues(source.files, fmt))
    routed = route_by_document(dialogues, counts.documents, args.val_fraction, args.seed)
    held: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {split: [] for split in SPLITS}
    held_tokens = dict.fromkeys(SPLITS, 0)
    kinds = ("bin", "mask.bin")
    files: dict[tuple[str, str], BinaryIO] = {
        (split, kind): open(folder / f"{split}.{kind}", "wb") for split in SPLITS for kind in kinds
    }
    try:
        with progress_bar(total=counts.documents, unit="dialogue", desc="tokenize") as bar:
            for conversation, _, split in routed:
                parts = _encode_windows(chat_format, conversation, args.block_size, chat)
                held[split] += parts
                stats["documents"][split] += 1
                stats["bytes"][split] += sum(len(t.text.encode("utf-8")) for t in conversation)
                n_tokens = sum(len(ids) for ids, _ in parts)
                stats["tokens"][split] += n_tokens
                held_tokens[split] += n_tokens
                if held_tokens[split] >= FLUSH_TOKENS:
                    _flush(held[split], files, split, dtype)
                    held_tokens[split] = 0
                bar.update(1)
        for split in SPLITS:
            _flush(held[split], files, split, dtype)
    finally:
        for f in files.values():
            f.close()
    return stats, chat


def _encode_windows(
    chat_format: ChatFormat, conversation: Conversation, block_size: int, chat: dict[str, int]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) of each window of whole turns, end-of-text included (mask 0). A system turn
    (first, see `system_first`) starts every window, cut to at most half of it."""
    turns = [chat_format.encode_turn(t.role, chat_format.encode_text(t.text)) for t in conversation]
    roles = [t.role for t in conversation]
    head: list[np.ndarray] = []  # the system turn, repeated in every window
    if roles[0] == SYSTEM:
        head, roles = [turns.pop(0)], roles[1:]
        chat["cut_turns"] += len(head[0]) > block_size // 2
        head = [cut_turn(head[0], block_size // 2)]
    room = block_size - sum(len(ids) for ids in head)
    chat["cut_turns"] += sum(len(ids) > room for ids in turns)
    turns = [cut_turn(ids, room) for ids in turns]
    parts = []
    for start, stop in windows([len(ids) for ids in turns], roles, room):
        ids, mask = join_turns([*head, *turns[start:stop]], [SYSTEM] * len(head) + roles[start:stop])
        parts.append((np.append(ids, chat_format.eot_id), np.append(mask, np.uint8(0))))
    chat["windows"] += len(parts)
    return parts


def _flush(
    held: list[tuple[np.ndarray, np.ndarray]], files: dict[tuple[str, str], BinaryIO], split: str, dtype: type
) -> None:
    if held:
        np.concatenate([ids for ids, _ in held]).astype(dtype).tofile(files[split, "bin"])
        np.concatenate([mask for _, mask in held]).astype(np.uint8).tofile(files[split, "mask.bin"])
        held.clear()
