"""`smallgpt prepare`: text -> train.bin / val.bin of token ids, plus meta.json and tokenizer.json.

Three explicit stages, each streaming so memory stays bounded whatever the corpus size:
  1. open the source (local files or a download),
  2. scan it once: count documents and characters, and learn the vocabulary ("char", "bpe:N"),
  3. tokenize batches of documents and append them to the split files, inside a temp folder
     that replaces the output folder only when everything succeeded.
Every document is followed by the end-of-text id, so training samples can see where texts end.
"""

from __future__ import annotations

import json
import os
import random
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

from smallgpt.data.sources import ReadOptions, Source
from smallgpt.data.tokenizers import Tokenizer, build_tokenizer, check_kind, learns_vocabulary, save_tokenizer
from smallgpt.errors import UserError
from smallgpt.io import (
    atomic_dir,
    atomic_write_json,
    check_folder_target,
    holds_files,
    refuse_to_replace,
    resolve_dir,
    sha256_file,
)
from smallgpt.progress import progress_bar

META_FORMAT_VERSION = 1
Segment = TypeVar("Segment")  # a piece of a document (text), or a whole one (chat: a dialogue)
BATCH_CHARS = 4 << 20  # text tokenized per batch, by one thread: THREADS + 1 batches in memory
THREADS = min(os.cpu_count() or 1, 8)
SPLITS = ("train", "val")


@dataclass
class PrepareArgs(ReadOptions):
    source: str | None = field(
        default=None,
        metadata={
            "help": "tinyshakespeare, shakespeare, tinystories, tinystories-instruct, or a file or "
            "folder: .txt, .jsonl, .csv, .tsv, .parquet, and .gz/.zst-compressed .txt/.jsonl/.csv/.tsv",
            "positional": True,
        },
    )
    input: str | None = field(
        default=None,
        metadata={"help": "read the text from this file or folder (e.g. a copy you downloaded)"},
    )
    tokenizer: str = field(
        default="char",
        metadata={"help": "char, gpt2, or bpe:N (a byte-level BPE of N ids trained on the corpus)"},
    )
    tokenizer_from: str | None = field(
        default=None,
        metadata={
            "help": "encode with this trained run's tokenizer (instead of --tokenizer), so the run can "
            "be fine-tuned or evaluated on the new text"
        },
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "share of documents held out for validation (0 to 0.5)"}
    )
    out: str | None = field(
        default=None, metadata={"help": "output folder (default: data/<source>_<tokenizer>)"}
    )
    seed: int = field(default=1337, metadata={"help": "seed of the train/val document split"})
    format: str = field(
        default="auto",
        metadata={
            "help": "text (documents) or chat (dialogues; the file format is detected), or a dialogue "
            "format: lccc-json, lccc-txt, lines, jsonl; auto = chat for .json/.jsonl input, else text"
        },
    )
    block_size: int = field(
        default=256,
        metadata={"help": "chat: dialogues longer than this many tokens are cut into windows of whole turns"},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace the output folder when it already holds prepared data (or other files)"},
    )


@dataclass
class Counts:
    """What stage 2 learns about the corpus; stage 3 needs it to split and to show progress."""

    documents: int = 0
    characters: int = 0
    bytes: int = 0  # UTF-8 bytes of the document text


def check_args(args: PrepareArgs) -> None:
    """What text and chat preparation both need of their arguments."""
    if not 0 <= args.val_fraction <= 0.5:
        raise UserError(f"--val-fraction must be between 0 and 0.5, not {args.val_fraction}")
    check_kind(args.tokenizer)
    if args.out is not None:  # now, not after reading the whole corpus
        output_folder(args, "")


def output_folder(args: PrepareArgs, default_name: str) -> Path:
    """--out, or data/<default_name>. The new folder takes the place of the whole old one, so one
    that holds anything is replaced only with --overwrite."""
    out = Path(args.out or Path("data") / default_name)
    check_folder_target(out)
    if holds_files(out):
        meta = (resolve_dir(out) / "meta.json").is_file()
        refuse_to_replace(out, "prepared data" if meta else "files", args.overwrite)
    return out


def prepare_text(args: PrepareArgs, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Prepare a dataset folder of documents and return its meta (also written to meta.json).

    `tokenizer`: encode with this one (a run's, for --tokenizer-from) instead of building one.
    """
    check_args(args)
    source = args.open(args.source, args.input)
    suffix = Path(args.tokenizer_from).name if args.tokenizer_from else args.tokenizer.replace(":", "")
    out = output_folder(args, f"{source.name}_{suffix}")
    tok, counts = scan(source, args.tokenizer, tokenizer)
    print(f"vocab size: {tok.vocab_size:,}")

    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    with atomic_dir(out) as tmp:
        stats, counts = write_splits(source, tok, counts, args, dtype, tmp)
        meta = dataset_meta(source, tok, counts, stats, args, dtype)
        save_tokenizer(tok, tmp / "tokenizer.json")
        atomic_write_json(tmp / "meta.json", meta)

    docs = meta["counts"]["documents"]
    print(f"length of dataset in characters: {counts.characters:,}")
    print(f"documents: train {docs['train']:,}, val {docs['val']:,}")
    for split in SPLITS:
        print(f"{split} has {meta['counts']['tokens'][split]:,} tokens")
    print(f"wrote {out}/ (train.bin, val.bin, meta.json, tokenizer.json)")
    return meta


def scan(source: Source, kind: str, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, Counts | None]:
    """Stage 2: the tokenizer. char and bpe:N learn their vocabulary in one pass over the corpus,
    which also counts it; gpt2 and a given `tokenizer` need no pass (counts None: stage 3 counts)."""
    if tokenizer is not None or not learns_vocabulary(kind):
        return tokenizer or build_tokenizer(kind), None
    counts = Counts()
    with progress_bar(total=source.text_bytes(), unit="B", unit_scale=True, desc="scan") as bar:
        tok = build_tokenizer(kind, (text for text, _ in _counted(source.segments(), counts, bar)))
    return tok, counts


def _counted(
    segments: Iterable[tuple[str, bool]], counts: Counts, bar: Any = None
) -> Iterator[tuple[str, bool]]:
    """The segments, adding up documents, characters and bytes in `counts` as they go by."""
    for text, ends in segments:
        n = len(text.encode("utf-8"))
        counts.documents += ends
        counts.characters += len(text)
        counts.bytes += n
        if bar is not None:
            bar.update(n)
        yield text, ends


def write_splits(
    source: Source, tok: Tokenizer, counts: Counts | None, args: PrepareArgs, dtype: type, folder: Path
) -> tuple[dict[str, dict[str, int]], Counts]:
    """Stage 3: tokenize, appending each split's ids to <split>.bin; returns the split stats and
    the corpus counts.

    Usually one pass: documents go to val by a seeded draw in document order, counted on the way.
    A source that is one document (tiny shakespeare) is split by position instead, at 90% of its
    characters, which takes its length: known after stage 2, else after a first pass.
    """
    single = counts is not None and counts.documents == 1 and args.val_fraction > 0
    if not single:
        seen = Counts()
        segments = _counted(source.segments(), seen)
        routed = route_by_document(segments, None, args.val_fraction, args.seed)
        files = _tokenize(routed, tok, dtype, folder, source.text_bytes())
        counts = seen
        if not (counts.documents == 1 and args.val_fraction > 0):
            files.give_each_split_a_document(args.val_fraction)
            return files.stats, counts
    assert counts is not None
    routed = _route_by_position(source.segments(), counts.characters, args.val_fraction)
    return _tokenize(routed, tok, dtype, folder, counts.bytes).stats, counts


def route_by_document(
    segments: Iterable[tuple[Segment, bool]], n_docs: int | None, val_fraction: float, seed: int
) -> Iterator[tuple[Segment, bool, str]]:
    """Each document goes to val with probability val_fraction, drawn in document order.

    Both splits get at least one document: if one is still empty when the last document comes,
    the last document goes there. With n_docs None (not counted yet) the caller moves it after.
    """
    rng = random.Random(seed)
    seen = dict.fromkeys(SPLITS, 0)
    index, split = 0, None
    for text, ends in segments:
        if split is None:
            split = "val" if rng.random() < val_fraction else "train"
            last = n_docs is not None and index == n_docs - 1
            if last and val_fraction > 0 and not seen["val"]:
                split = "val"
            elif last and not seen["train"]:
                split = "train"
        yield text, ends, split
        if ends:
            seen[split] += 1
            index, split = index + 1, None


def _route_by_position(
    segments: Iterable[tuple[str, bool]], characters: int, val_fraction: float
) -> Iterator[tuple[str, bool, str]]:
    """A single document (like tiny shakespeare) is split like nanoGPT does: the first
    (1 - val_fraction) of its characters, up to the end of that line, train; the rest val."""
    target = int(characters * (1 - val_fraction))
    print(
        f"the source is one document: train gets its first {1 - val_fraction:.0%} of "
        "characters (to the end of that line), val the rest"
    )
    pos, split = 0, "train"
    for text, ends in segments:
        if split == "train" and pos + len(text) > target:
            cut = _line_end(text, target - pos, ends)
            yield text[:cut], True, "train"
            pos, text, split = pos + cut, text[cut:], "val"
        pos += len(text)
        yield text, ends, split


def _line_end(text: str, i: int, last: bool) -> int:
    """Cut just after the first newline at or after `i`; at `i` itself if that leaves val empty."""
    j = text.find("\n", i)
    cut = j + 1 if j >= 0 else i
    return i if last and cut == len(text) else cut


def _batches(
    routed: Iterable[tuple[str, bool, str]], max_chars: int
) -> Iterator[list[tuple[str, bool, str, int]]]:
    """Groups of about `max_chars` characters of segments, each with its UTF-8 byte count."""
    batch, size = [], 0
    for text, ends, split in routed:
        batch.append((text, ends, split, len(text.encode("utf-8"))))
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _tokenize(
    routed: Iterable[tuple[str, bool, str]], tok: Tokenizer, dtype: type, folder: Path, total: int | None
) -> SplitFiles:
    """Encode batches on THREADS threads while this one reads the next batch; write them in order.

    At most THREADS + 1 batches are in memory. Tokenizers release the GIL while they encode
    (tiktoken, HF tokenizers, numpy for char), so the threads run on separate cores.
    """
    with (
        SplitFiles(folder, dtype, tok.eot_id) as files,
        progress_bar(total=total, unit="B", unit_scale=True, desc="tokenize") as bar,
        ThreadPoolExecutor(THREADS) as pool,
    ):
        pending: deque[tuple[list, Future]] = deque()

        def write_oldest() -> None:
            batch, encoded = pending.popleft()
            files.write(batch, encoded.result())
            bar.update(sum(n for _, _, _, n in batch))

        for batch in _batches(routed, BATCH_CHARS):
            pending.append((batch, pool.submit(tok.encode_batch_to_arrays, [t for t, _, _, _ in batch])))
            if len(pending) > THREADS:
                write_oldest()
        while pending:
            write_oldest()
    return files


class SplitFiles:
    """train.bin and val.bin being appended to, their counts (documents, tokens, bytes per split)
    and where the last document ended up."""

    def __init__(self, folder: Path, dtype: type, eot_id: int):
        self.paths = {split: folder / f"{split}.bin" for split in SPLITS}
        self.dtype = dtype
        self.eot: np.ndarray = np.array([eot_id], dtype=dtype)
        self.stats = {k: dict.fromkeys(SPLITS, 0) for k in ("documents", "tokens", "bytes")}
        self.doc_start: int | None = None  # token offset of the unfinished document in its split
        self.doc_bytes = 0  # its bytes so far
        self.last: tuple[str, int, int] | None = None  # split, token offset, bytes of the last document

    def __enter__(self) -> SplitFiles:
        self.files: dict[str, BinaryIO] = {split: open(path, "wb") for split, path in self.paths.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.files.values():
            f.close()

    def write(self, batch: list[tuple[str, bool, str, int]], ids: list[np.ndarray]) -> None:
        parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        ends_at = dict(self.stats["tokens"])  # tokens of each split once this batch is written
        for arr, (_, ends, split, n_bytes) in zip(ids, batch, strict=True):
            if self.doc_start is None:
                self.doc_start, self.doc_bytes = ends_at[split], 0
            parts[split].append(arr.astype(self.dtype, copy=False))
            ends_at[split] += len(arr)
            self.doc_bytes += n_bytes
            if ends:
                parts[split].append(self.eot)
                ends_at[split] += 1
                self.stats["documents"][split] += 1
                self.last, self.doc_start = (split, self.doc_start, self.doc_bytes), None
            self.stats["bytes"][split] += n_bytes
        for split, arrays in parts.items():
            if arrays:
                data = np.concatenate(arrays)
                data.tofile(self.files[split])
                self.stats["tokens"][split] += len(data)

    def give_each_split_a_document(self, val_fraction: float) -> None:
        """If a split has no document, move the last document there (from the end of the other)."""
        docs = self.stats["documents"]
        empty = "val" if val_fraction > 0 and not docs["val"] else "train" if not docs["train"] else None
        if empty is None or self.last is None or self.last[0] == empty:
            return
        split, start, n_bytes = self.last
        itemsize = np.dtype(self.dtype).itemsize
        moved: np.ndarray = np.fromfile(self.paths[split], dtype=self.dtype, offset=start * itemsize)
        with open(self.paths[split], "r+b") as f:
            f.truncate(start * itemsize)
        with open(self.paths[empty], "ab") as f:
            moved.tofile(f)
        for key, amount in (("documents", 1), ("tokens", len(moved)), ("bytes", n_bytes)):
            self.stats[key][split] -= amount
            self.stats[key][empty] += amount


def dataset_meta(
    source: Source,
    tok: Tokenizer,
    counts: Counts,
    stats: dict[str, dict[str, int]],
    args: PrepareArgs,
    dtype: type,
) -> dict[str, Any]:
    # the hashes of files read to their end while tokenizing; others (Parquet) are read here
    inputs = [
        {"path": str(p), "bytes": p.stat().st_size, "sha256": source.sha256.get(p) or sha256_file(p)}
        for p in source.files
    ]
    return {
        "format_version": META_FORMAT_VERSION,
        "source": source.name,
        "inputs": inputs,
        "tokenizer": {"kind": tok.kind, "fingerprint": tok.fingerprint()},
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": np.dtype(dtype).name,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "counts": {"characters": counts.characters, **stats},
    }


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a prepared dataset folder (UserError if it is not one)."""
    path = resolve_dir(data_dir) / "meta.json"
    hint = "run `smallgpt prepare` to create it"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{data_dir} is not a prepared dataset (no meta.json); {hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); {hint} again") from None
    if not isinstance(meta, dict) or meta.get("format_version") != META_FORMAT_VERSION:
        raise UserError(f"{path} is not a format-{META_FORMAT_VERSION} dataset description; {hint} again")
    return meta
