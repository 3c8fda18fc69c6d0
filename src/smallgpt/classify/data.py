"""Labelled text for classification: read CSV/TSV/JSONL, map labels to ids, split, encode, batch.

A text longer than the backbone's block_size is read in windows (`Windows`): with one window (the
default) it keeps its first block_size tokens, as a reader sees the start first; with more, windows
of block_size tokens, evenly spaced from its start to its end, at most `stride` apart, so a long
review's closing verdict is read too. Texts longer than one window are counted.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from smallgpt.data.tokenizers import Tokenizer
from smallgpt.errors import UserError
from smallgpt.io import atomic_write_json

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents in one cell are fine
SNIFF_BYTES = 64 * 1024
DELIMITERS = ",\t;|"


@dataclass
class Examples:
    """Texts with their raw labels (strings) as read from a file."""

    texts: list[str]
    labels: list[str]
    path: str
    empty_skipped: int = 0

    def subset(self, indices: np.ndarray) -> Examples:
        return Examples([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.path)


def shared_texts(train: Examples, other: Examples) -> int:
    """How many of `other`'s texts are also training texts: repeated rows inflate its accuracy."""
    seen = set(train.texts)
    return sum(text in seen for text in other.texts)


def _label_text(value: object) -> str:
    # JSON 1 and CSV "1" are the same label; JSON 1.0 would be "1.0" and stays distinct
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _check_columns(columns: list[str], wanted: list[str], path: Path) -> None:
    for column in wanted:
        if column not in columns:
            raise UserError(
                f"column {column!r} not found in {path} (columns: {', '.join(map(repr, columns))}); "
                f"pick one with --text-column / --label-column"
            )


def _read_rows(path: Path, delimiter: str | None) -> tuple[list[str], list[dict]]:
    """Column names and rows (dicts) of a CSV/TSV (delimiter sniffed unless given) or JSONL file."""
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise UserError(f"{path} is empty: it needs a header row (CSV/TSV) or JSON lines with labelled texts")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {n} is not a JSON object (expected one per line)") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {n} is not a JSON object (expected one per line)")
            rows.append(row)
        return list(rows[0]), rows
    if delimiter is None:
        if path.suffix.lower() == ".tsv":
            delimiter = "\t"
        else:
            try:
                delimiter = csv.Sniffer().sniff(text[:SNIFF_BYTES], DELIMITERS).delimiter
            except csv.Error:  # a single column, or too irregular to tell: the usual comma
                delimiter = ","
    try:
        reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
        rows = list(reader)
    except csv.Error as e:
        raise UserError(f"{path} is not readable as CSV (delimiter {delimiter!r}): {e}") from None
    return list(reader.fieldnames or []), rows


def read_examples(
    path: str | Path, text_column: str, label_column: str | None, delimiter: str | None = None
) -> Examples:
    """Texts and labels of `path`; rows with empty text are skipped (and counted), never an error.

    label_column None reads texts only (prediction); labels are then empty strings.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    try:
        columns, rows = _read_rows(path, delimiter)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    wanted = [text_column] + ([label_column] if label_column else [])
    _check_columns(columns, wanted, path)
    texts, labels, empty = [], [], 0
    for n, row in enumerate(rows, 2):
        if any(column not in row for column in wanted):  # a JSON line without a key the first one had
            _check_columns(list(row), wanted, Path(f"{path} line {n - 1}"))
        text = row[text_column]
        if text is None or not str(text).strip():
            empty += 1
            continue
        label = "" if not label_column else row[label_column]
        if label_column and (label is None or not str(label).strip()):
            raise UserError(f"{path} row {n} has text but no label in column {label_column!r}")
        texts.append(str(text).strip())
        labels.append(_label_text(label).strip())
    if not texts:
        raise UserError(f"{path} has no rows with text in column {text_column!r}")
    return Examples(texts, labels, str(path), empty)


def sorted_labels(labels: list[str]) -> list[str]:
    """Class names in id order: numerically when every label is an integer, else alphabetically."""
    names = set(labels)
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def label_ids(examples: Examples, names: list[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(examples.labels) - set(index))
    if unknown:
        raise UserError(
            f"label {unknown[0]!r} in {examples.path} is not one the classifier was trained on "
            f"({', '.join(map(repr, names))})"
        )
    return np.array([index[label] for label in examples.labels], dtype=np.int64)


def save_labels(path: str | Path, names: list[str]) -> None:
    atomic_write_json(path, {"labels": names})


def load_labels(path: str | Path) -> list[str]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"{path} is missing or malformed ({type(e).__name__}): is this a classify run?"
        ) from None


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Index arrays, one per fraction (and the rest first), with each class split in proportion.

    E.g. fractions (0.1, 0.1) -> [train, val, test]; every class keeps at least one training example.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for k, fraction in enumerate(fractions, 1):
            take = min(round(fraction * len(members)), len(members) - 1 - start)
            parts[k].extend(members[start : start + max(take, 0)])
            start += max(take, 0)
        parts[0].extend(members[start:])
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def check_windows(count: int, stride: int | None, size: int | None = None) -> None:
    """The one rule for --max-windows and --window-stride (size: the block, once a backbone is read)."""
    if count < 1:
        raise UserError(f"max-windows must be at least 1, got {count}")
    if stride is not None and not 1 <= stride <= (size or stride):
        bound = f"in [1, {size}] (the block size)" if size else "at least 1"
        raise UserError(f"window-stride must be {bound}, got {stride}")


@dataclass(frozen=True)
class Windows:
    """How a text is read: up to `count` windows of `size` tokens (the block), evenly spaced from its
    start to its end and at most `stride` apart. Beyond `count` windows' reach the spacing widens,
    so the start and the end are always read and the cost stays bounded."""

    size: int
    stride: int
    count: int = 1

    def __post_init__(self) -> None:
        check_windows(self.count, self.stride, self.size)

    def needed(self, length: int) -> int:
        """Windows that read every token of a text of `length` tokens, `stride` apart."""
        return 1 + max(0, -(-(length - self.size) // self.stride))

    def starts(self, length: int) -> list[int]:
        """The first token of each window: one window (at 0) for a text that fits, or `count` = 1."""
        n = min(self.count, self.needed(length))
        if n == 1:
            return [0]
        return np.linspace(0, length - self.size, n).round().astype(int).tolist()


@dataclass
class Encoded:
    """Token ids per text and what encoding had to change; with one window a text is cut to its
    first block_size tokens, with more it is kept whole (`collate_windows` cuts its windows)."""

    ids: list[np.ndarray]
    windows: Windows
    long: int = 0  # texts longer than one window (block_size tokens)
    gapped: int = 0  # of those, texts longer than max-windows windows cover: read in spaced windows
    unknown_texts: int = 0  # texts with characters the char tokenizer had never seen (-> <|unk|>)

    def report(self, what: str) -> str:
        notes = [f"{what}: {len(self.ids)} texts"]
        size, count = self.windows.size, self.windows.count
        if self.long and count == 1:
            notes.append(f"{self.long} truncated to their first {size} tokens")
        elif self.long:
            notes.append(f"{self.long} longer than {size} tokens, read in up to {count} windows")
            if self.gapped:
                notes.append(f"{self.gapped} of them with gaps between their {count} windows")
        if self.unknown_texts:
            notes.append(f"{self.unknown_texts} with unseen characters (encoded as <|unk|>)")
        return ", ".join(notes)


def encode_texts(texts: list[str], tokenizer: Tokenizer, windows: Windows) -> Encoded:
    ids, long, gapped, unknown = [], 0, 0, 0
    unk_id = tokenizer.special_tokens.get("<|unk|>")
    for text in texts:
        tokens = np.asarray(tokenizer.encode_to_array(text, unknown="replace"), dtype=np.int64)
        if unk_id is not None and (tokens == unk_id).any():
            unknown += 1
        if len(tokens) > windows.size:
            long += 1
            gapped += windows.needed(len(tokens)) > windows.count
            if windows.count == 1:
                tokens = tokens[: windows.size]
        ids.append(tokens)
    return Encoded(ids, windows, long, gapped, unknown)


class WindowBatch(NamedTuple):
    ids: torch.Tensor  # (W, T) one row per window, padded with end-of-text
    real: torch.Tensor  # (W, T) True at text tokens, False at padding
    text_of: torch.Tensor | None  # (W,) the text each window belongs to; None: one window per text
    tokens: int  # text tokens read, padding not counted (overlaps count once per window)


def collate_windows(
    ids: list[np.ndarray], windows: Windows, pad_id: int, padding_side: str, device: torch.device
) -> WindowBatch:
    """Cut each text into its windows and pad them (`collate`); a text that fits one window is one row,
    exactly as `collate` lays it out."""
    rows, text_of = [], []
    for i, tokens in enumerate(ids):
        for start in windows.starts(len(tokens)):
            rows.append(tokens[start : start + windows.size])
            text_of.append(i)
    x, real = collate(rows, pad_id, padding_side, device)
    owners = None if len(rows) == len(ids) else torch.tensor(text_of, device=device)
    return WindowBatch(x, real, owners, sum(len(r) for r in rows))


def collate(
    ids: list[np.ndarray], pad_id: int, padding_side: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the batch's longest text: ids (B, T) and real (B, T), True at text tokens."""
    longest = max(len(x) for x in ids)
    batch = np.full((len(ids), longest), pad_id, dtype=np.int64)
    real = np.zeros((len(ids), longest), dtype=bool)
    for row, x in enumerate(ids):
        span = slice(0, len(x)) if padding_side == "right" else slice(longest - len(x), longest)
        batch[row, span], real[row, span] = x, True
    return torch.from_numpy(batch).to(device), torch.from_numpy(real).to(device)


class ClassifyBatch(NamedTuple):
    ids: torch.Tensor  # (W, T) token ids of the texts' windows, padded with end-of-text
    real: torch.Tensor  # (W, T) True at text tokens, False at padding
    labels: torch.Tensor  # (B,) class ids
    tokens: int  # text tokens in the batch, padding not counted
    text_of: torch.Tensor | None = None  # (W,) each window's text; None: one window per text


class ClassifyBatches:
    """Training batches: a seeded order per epoch, padded per batch; resumable (epoch, position).

    With group_by_length, each window of LENGTH_WINDOW batches' worth of shuffled texts is sorted
    by length before it is cut into batches, and the batches are then shuffled: a batch holds texts
    of similar length, so it carries little padding, while which texts meet stays random.
    """

    LENGTH_WINDOW = 50

    def __init__(
        self,
        ids: list[np.ndarray],
        labels: np.ndarray,
        batch_size: int,
        seed: int,
        pad_id: int,
        padding_side: str,
        device: torch.device,
        group_by_length: bool = False,
        windows: Windows | None = None,  # None: every text fits one window (as encoded)
    ):
        self.ids, self.labels, self.windows = ids, labels, windows
        self.lengths = np.array([len(x) for x in ids])
        self.batch_size, self.seed = min(batch_size, len(ids)), seed
        self.pad_id, self.padding_side, self.device = pad_id, padding_side, device
        self.group_by_length = group_by_length
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        """This epoch's example order, whole batches only: the ragged tail is dropped, so steps are equal."""
        rng = np.random.default_rng([self.seed, self.epoch])
        usable = len(self.ids) // self.batch_size * self.batch_size
        order = rng.permutation(len(self.ids))[:usable]
        if not self.group_by_length:
            return order
        window = self.batch_size * self.LENGTH_WINDOW
        for start in range(0, usable, window):
            chunk = order[start : start + window]
            order[start : start + window] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
        batches = order.reshape(-1, self.batch_size)
        return batches[rng.permutation(len(batches))].reshape(-1)

    def next_batch(self) -> ClassifyBatch:
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order()
        rows = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        texts = [self.ids[i] for i in rows]
        labels = torch.from_numpy(self.labels[rows]).to(self.device)
        if self.windows is None:
            x, real = collate(texts, self.pad_id, self.padding_side, self.device)
            return ClassifyBatch(x, real, labels, int(self.lengths[rows].sum()))
        batch = collate_windows(texts, self.windows, self.pad_id, self.padding_side, self.device)
        return ClassifyBatch(batch.ids, batch.real, labels, batch.tokens, batch.text_of)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order()
