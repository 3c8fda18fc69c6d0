"""Readers of input files: text, JSON lines, CSV/TSV and Parquet, plain or compressed, streamed.

A file's format is its extension once a compression suffix (.gz, .zst) is taken off:
  .txt (and any extension not below)  UTF-8 text, handed on in chunks (sources.py splits documents)
  .jsonl, .ndjson   one JSON object per line; the value of its text field is one document
  .csv, .tsv        a header row, then one document per row: the value in the text column
  .parquet          one document per row: the value in the text column (pyarrow, extra `parquet`)
Compressed files are decompressed while they are read (gzip from the standard library; zstd with
`zstandard`, extra `zst`), so memory holds a chunk, a line or a batch of rows, never a whole file.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import itertools
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from smallgpt.errors import UserError

CHUNK_BYTES = 4 << 20
ZSTD_READ_BYTES = 1 << 16  # compressed bytes per step: text grows ~3-10x, so blocks stay small
PARQUET_BATCH_ROWS = 1024
CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default of 128 KiB is shorter than many documents
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
RECORD_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
KNOWN_SUFFIXES = (".txt", *RECORD_FORMATS)


# ---- file names --------------------------------------------------------------------------------


def split_name(path: Path) -> tuple[str, str, str]:
    """(stem, format suffix, compression suffix) of a file name: "a.jsonl.gz" -> ("a", ".jsonl", ".gz")."""
    name, compression = path.name, ""
    for suffix in COMPRESSIONS:
        if name.lower().endswith(suffix):
            name, compression = name[: -len(suffix)], suffix
    stem, dot, ext = name.rpartition(".")
    return (stem, f".{ext.lower()}", compression) if dot and stem else (name, "", compression)


def file_format(path: Path) -> str:
    """text, jsonl, csv, tsv or parquet, by extension; files of unknown extensions are text."""
    _, suffix, compression = split_name(path)
    fmt = RECORD_FORMATS.get(suffix, "text")
    if fmt == "parquet" and compression:
        raise UserError(f"{path}: Parquet is compressed inside the file already; pass the .parquet itself")
    return fmt


def is_known(path: Path) -> bool:
    """Whether a folder's file is an input: a known extension, optionally compressed."""
    return split_name(path)[1] in KNOWN_SUFFIXES


def list_files(folder: Path, glob: str | None = None) -> list[Path]:
    """The input files in `folder` and its subfolders: those matching `glob`, else those of known types."""
    candidates = folder.rglob(glob) if glob else (p for p in folder.rglob("*") if is_known(p))
    return sorted(p for p in candidates if p.is_file())


# ---- bytes and text ----------------------------------------------------------------------------


class Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


class _Hashing:
    """A binary file that feeds what is read from it into a digest."""

    def __init__(self, file: BinaryIO, digest: Digest):
        self.file, self.digest = file, digest

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.digest.update(data)
        return data


def read_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES, digest: Digest | None = None) -> Iterator[bytes]:
    """The bytes of `path`, one chunk at a time, decompressed on the way for .gz and .zst files.

    `digest` (e.g. a hashlib.sha256()) is fed the file's bytes as they are read, compressed as they
    are on disk, so a file that is read for its text is not read a second time for its hash.
    """
    compression = split_name(path)[2]
    with open(path, "rb") as file:
        raw: Any = file if digest is None else _Hashing(file, digest)
        if compression == ".gz":
            yield from _gunzip(raw, path, chunk_bytes)
        elif compression == ".zst":
            yield from _unzstd(raw, path)
        else:
            while chunk := raw.read(chunk_bytes):
                yield chunk


def _gunzip(raw: BinaryIO, path: Path, chunk_bytes: int) -> Iterator[bytes]:
    try:
        with gzip.GzipFile(fileobj=raw) as f:
            while chunk := f.read(chunk_bytes):
                yield chunk
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut file, EOFError
        raise _corrupt(path, e) from None


def _unzstd(raw: BinaryIO, path: Path) -> Iterator[bytes]:
    """Frame after frame (`cat a.zst b.zst` is a valid file). zstandard's stream_reader would end
    quietly at a cut-off frame; here an unfinished last frame is an error, as gzip makes it."""
    zstd = _zstandard()
    frame = None
    try:
        while block := raw.read(ZSTD_READ_BYTES):
            while block:
                frame = frame or zstd.ZstdDecompressor().decompressobj()
                if out := frame.decompress(block):
                    yield out
                block = b""
                if frame.eof:  # the rest of the block starts the next frame
                    block, frame = frame.unused_data, None
    except zstd.ZstdError as e:
        raise _corrupt(path, e) from None
    if frame is not None:
        raise _corrupt(path, "the file ends inside a frame")


def _corrupt(path: Path, reason: object) -> UserError:
    kind = COMPRESSIONS[split_name(path)[2]]
    return UserError(f"{path} is corrupt or not {kind}-compressed ({reason})")


def _zstandard() -> Any:
    try:
        import zstandard
    except ImportError:
        raise UserError("reading .zst files needs zstandard: pip install 'smallgpt[zst]'") from None
    return zstandard


def read_text(path: Path, chunk_bytes: int = CHUNK_BYTES, digest: Digest | None = None) -> Iterator[str]:
    """Decoded text of `path`, one chunk at a time, without a leading byte-order mark."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes handed to the decoder before the current chunk
    at_start = True
    for chunk in itertools.chain(read_chunks(path, chunk_bytes, digest), [b""]):  # b"": flush the decoder
        held = len(decoder.getstate()[0])  # bytes of a split character from the last chunk
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            at = offset - held + e.start
            raise UserError(f"{path} is not valid UTF-8 text (byte offset {at})") from None
        offset += len(chunk)
        if at_start and text:
            text, at_start = text.removeprefix("\ufeff"), False
        if text:
            yield text


def read_lines(path: Path, chunk_bytes: int = CHUNK_BYTES, digest: Digest | None = None) -> Iterator[str]:
    """Lines of a text file, each with its "\\n" (the last may have none), one at a time."""
    partial: list[str] = []  # the start of a line that goes on in the next chunk
    for text in read_text(path, chunk_bytes, digest):
        *complete, rest = text.split("\n")
        for line in complete:
            yield "".join(partial) + line + "\n"
            partial = []
        if rest:
            partial.append(rest)
    if partial:
        yield "".join(partial)


# ---- records: one document per line or row -----------------------------------------------------


def read_records(
    path: Path, text_field: str = "text", text_column: str = "text", digest: Digest | None = None
) -> Iterator[str]:
    """The text of every record of a JSON-lines, CSV, TSV or Parquet file, in file order.

    `digest` gets the bytes of text formats (Parquet files are read by pyarrow, not hashed here).
    """
    fmt = file_format(path)
    if fmt == "jsonl":
        return read_jsonl(path, text_field, digest)
    if fmt == "parquet":
        return read_parquet(path, text_column)
    return read_delimited(path, text_column, "\t" if fmt == "tsv" else ",", digest)


def read_json_lines(path: Path, digest: Digest | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSON-lines file."""
    for number, line in enumerate(read_lines(path, digest=digest), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number} is not valid JSON ({e.msg})") from None
        yield number, value


def read_jsonl(path: Path, field: str, digest: Digest | None = None) -> Iterator[str]:
    for number, record in read_json_lines(path, digest):
        if not isinstance(record, dict):
            raise UserError(f"{path} line {number} is not a JSON object")
        if field not in record:
            fields = ", ".join(map(repr, record)) or "none"
            raise UserError(
                f"{path} line {number} has no field {field!r} (fields: {fields}); pick one with --text-field"
            )
        yield _text(record[field], f"{path} line {number}, field {field!r},")


def read_delimited(path: Path, column: str, delimiter: str, digest: Digest | None = None) -> Iterator[str]:
    """The `column` of a CSV (or, with a TAB delimiter, TSV) file whose first row names the columns."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    rows = csv.reader(read_lines(path, digest=digest), delimiter=delimiter)
    try:
        header = next(rows, None)
        if header is None:
            return
        index = _column_index(path, header, column)
        for row in rows:
            if not row:  # a blank line
                continue
            if index >= len(row):
                raise UserError(f"{path} line {rows.line_num} has {len(row)} fields, no {column!r} column")
            yield row[index]
    except csv.Error as e:
        raise UserError(f"{path} line {rows.line_num} is not valid CSV ({e})") from None


def read_parquet(path: Path, column: str) -> Iterator[str]:
    """The `column` of a Parquet file, read one batch of rows at a time."""
    pa, pq = _pyarrow()
    row = 0
    try:
        parquet = pq.ParquetFile(path)
        _column_index(path, parquet.schema_arrow.names, column)
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
            for value in batch.column(0).to_pylist():
                row += 1
                yield _text(value, f"{path} row {row}, column {column!r},")
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable Parquet file ({_one_line(e)})") from None


def _column_index(path: Path, columns: list[str], column: str) -> int:
    if column not in columns:
        names = ", ".join(map(repr, columns)) or "none"
        raise UserError(f"{path} has no column {column!r} (columns: {names}); pick one with --text-column")
    return columns.index(column)


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where} holds {type(value).__name__ if value is not None else 'null'}, not text")
    return value


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError("reading .parquet files needs pyarrow: pip install 'smallgpt[parquet]'") from None
    return pyarrow, pyarrow.parquet


def _one_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
