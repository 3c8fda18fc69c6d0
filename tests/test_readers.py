"""prepare's input formats: JSON lines, CSV, TSV, Parquet, .gz/.zst compression, folders with --glob,
and the bad inputs of each as one line with exit code 2."""

import csv
import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from test_cli import SRC, assert_user_error

from smallgpt.cli import main
from smallgpt.data import readers
from smallgpt.data.prepare import load_meta
from smallgpt.data.readers import read_lines, split_name
from smallgpt.data.tokenizers import load_tokenizer
from smallgpt.errors import UserError
from smallgpt.preparation import PrepareArgs, run_prepare

# commas, quotes, TABs, newlines and non-ASCII: what CSV quoting and JSON escaping must carry through
DOCS = [
    'He said "stop, now" and left.',
    "Two\nlines, one\ttab.",
    "孙悟空 met a cat. 😀",
    "An <|endoftext|> inside a record is plain text.",
    "Last one, é.",
] * 4
TEXT_DOCS = [doc for doc in DOCS[:5] if "<|endoftext|>" not in doc]  # in a text file it splits documents


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, field: doc}, ensure_ascii=False) + "\n")


def write_delimited(path: Path, docs: list[str], delimiter: str, column: str = "text") -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["id", column])
        writer.writerows([i, doc] for i, doc in enumerate(docs))


def zstd_compress(path: Path) -> Path:
    out = path.with_name(path.name + ".zst")
    out.write_bytes(zstandard.ZstdCompressor().compress(path.read_bytes()))
    return out


def gzip_compress(path: Path) -> Path:
    out = path.with_name(path.name + ".gz")
    out.write_bytes(gzip.compress(path.read_bytes()))
    return out


def plain_text(path: Path, docs: list[str]) -> Path:
    path.write_text("\n<|endoftext|>\n".join(docs), encoding="utf-8")
    return path


MAKERS = {
    "jsonl": lambda d: write_jsonl(d / "docs.jsonl", DOCS) or d / "docs.jsonl",
    "jsonl.gz": lambda d: write_jsonl(d / "docs.jsonl.gz", DOCS) or d / "docs.jsonl.gz",
    "jsonl.zst": lambda d: zstd_compress(MAKERS["jsonl"](d)),
    "csv": lambda d: write_delimited(d / "docs.csv", DOCS, ",") or d / "docs.csv",
    "csv.gz": lambda d: gzip_compress(MAKERS["csv"](d)),
    "tsv": lambda d: write_delimited(d / "docs.tsv", DOCS, "\t") or d / "docs.tsv",
    "parquet": lambda d: (
        pq.write_table(pa.table({"text": DOCS}), d / "docs.parquet", row_group_size=7) or d / "docs.parquet"
    ),
    "txt.gz": lambda d: gzip_compress(plain_text(d / "docs.txt", TEXT_DOCS)),
    "txt.zst": lambda d: zstd_compress(plain_text(d / "docs.txt", TEXT_DOCS)),
}


def prepared_documents(out: Path) -> list[str]:
    """The documents of a prepared char dataset, both splits, read back from the token files."""
    meta, tok = load_meta(out), load_tokenizer(out)
    docs = []
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
        ends = np.flatnonzero(ids == tok.eot_id)
        docs += [tok.decode(part.tolist()) for part in np.split(ids, ends + 1)[:-1]]
        docs = [d.removesuffix("<|endoftext|>") for d in docs]
    return docs


@pytest.mark.parametrize("kind", list(MAKERS))
def test_each_format_prepares_its_documents(tmp_path, kind):
    path = MAKERS[kind](tmp_path)
    assert path.name == f"docs.{kind}"
    meta = run_prepare(PrepareArgs(input=str(path), out=str(tmp_path / "out")))
    # a record is one document as written; a text file splits at the markers between documents
    expected = TEXT_DOCS if kind.startswith("txt") else DOCS
    assert Counter(prepared_documents(tmp_path / "out")) == Counter(expected)
    assert meta["source"] == "docs" and sum(meta["counts"]["documents"].values()) == len(expected)
    assert meta["inputs"][0]["sha256"]  # the file as given, compressed or not


def test_jsonl_text_field_and_csv_text_column(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS, field="body")
    run_prepare(PrepareArgs(input=str(tmp_path / "a.jsonl"), text_field="body", out=str(tmp_path / "j")))
    assert Counter(prepared_documents(tmp_path / "j")) == Counter(DOCS)
    write_delimited(tmp_path / "a.csv", DOCS, ",", column="review")
    run_prepare(PrepareArgs(input=str(tmp_path / "a.csv"), text_column="review", out=str(tmp_path / "c")))
    assert Counter(prepared_documents(tmp_path / "c")) == Counter(DOCS)


def test_blank_records_are_skipped(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["one", "", "  \n", "two"])
    meta = run_prepare(PrepareArgs(input=str(tmp_path / "a.jsonl"), out=str(tmp_path / "o")))
    assert sorted(prepared_documents(tmp_path / "o")) == ["one", "two"]
    assert sum(meta["counts"]["documents"].values()) == 2


def test_folder_is_read_recursively_by_extension_and_glob(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    write_jsonl(root / "a.jsonl.gz", ["from jsonl.gz"])
    write_delimited(root / "sub" / "b.csv", ["from csv"], ",")
    plain_text(root / "sub" / "deeper" / "c.txt", ["from txt"])
    (root / "notes.md").write_text("not an input by default", encoding="utf-8")
    (root / "sub" / "d.jsonl.gz.part").write_bytes(b"\x00 unfinished download")

    run_prepare(PrepareArgs(input=str(root), out=str(tmp_path / "all"), val_fraction=0))
    assert sorted(prepared_documents(tmp_path / "all")) == ["from csv", "from jsonl.gz", "from txt"]
    run_prepare(PrepareArgs(input=str(root), glob="*.jsonl.gz", out=str(tmp_path / "gz"), val_fraction=0))
    assert prepared_documents(tmp_path / "gz") == ["from jsonl.gz"]
    run_prepare(PrepareArgs(input=str(root), glob="*.md", out=str(tmp_path / "md"), val_fraction=0))
    assert prepared_documents(tmp_path / "md") == ["not an input by default"]  # named: read as text
    with pytest.raises(UserError, match=r"no files matching --glob '\*.parquet'"):
        run_prepare(PrepareArgs(input=str(root), glob="*.parquet", out=str(tmp_path / "none")))
    with pytest.raises(UserError, match="--glob picks files inside a folder"):
        run_prepare(PrepareArgs(input=str(root / "notes.md"), glob="*.md", out=str(tmp_path / "none")))
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 64, 1 << 20])
def test_lines_across_chunk_boundaries(tmp_path, chunk_bytes):
    text = "first 孙悟空\n\nthird 😀 line\r\nlast without newline"
    path = tmp_path / "lines.txt.gz"
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    assert list(read_lines(path, chunk_bytes)) == text.splitlines(keepends=True)


def test_concatenated_zstd_frames_are_all_read(tmp_path):
    frames = [zstandard.ZstdCompressor().compress(f"part {i}\n".encode() * 1000) for i in range(3)]
    path = tmp_path / "parts.txt.zst"
    path.write_bytes(b"".join(frames))  # what `cat a.zst b.zst c.zst` makes
    assert "".join(readers.read_text(path)) == "".join(f"part {i}\n" * 1000 for i in range(3))


def test_file_names_and_formats():
    assert split_name(Path("a/b.JSONL.gz")) == ("b", ".jsonl", ".gz")
    assert split_name(Path("input.txt")) == ("input", ".txt", "")
    assert split_name(Path(".hidden.zst")) == (".hidden", "", ".zst")
    assert readers.file_format(Path("x.tsv.zst")) == "tsv"
    assert readers.file_format(Path("README")) == "text"
    with pytest.raises(UserError, match="Parquet is compressed inside"):
        readers.file_format(Path("x.parquet.gz"))


@pytest.mark.parametrize(
    "module, suffix, extra", [("zstandard", "txt.zst", "zst"), ("pyarrow", "parquet", "parquet")]
)
def test_missing_extra_names_the_pip_install(tmp_path, monkeypatch, module, suffix, extra):
    path = MAKERS[suffix](tmp_path)
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    with pytest.raises(UserError, match=rf"pip install 'smallgpt\[{extra}\]'"):
        run_prepare(PrepareArgs(input=str(path), out=str(tmp_path / "out")))


def test_dialogue_jsonl_is_still_chat_data(tmp_path):
    dialogue = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "chat.jsonl").write_text((json.dumps(dialogue) + "\n") * 4, encoding="utf-8")
    args = PrepareArgs(input=str(tmp_path / "chat.jsonl"), out=str(tmp_path / "o"), block_size=16)
    assert run_prepare(args)["chat"]["format"] == "chat"


# ---- bad input: one line, exit code 2, no output folder ---------------------------------------


def truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def written(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def parquet(path: Path, column: str) -> Path:
    pq.write_table(pa.table({column: DOCS}), path)
    return path


BAD_INPUTS = {
    "missing text field": (
        lambda d: write_jsonl(d / "a.jsonl", DOCS, field="body") or d / "a.jsonl",
        ["a.jsonl line 1 has no field 'text'", "'body'", "--text-field"],
    ),
    "missing column": (
        lambda d: write_delimited(d / "a.csv", DOCS, ",", column="body") or d / "a.csv",
        ["a.csv has no column 'text'", "'body'", "--text-column"],
    ),
    "missing parquet column": (
        lambda d: parquet(d / "a.parquet", "body"),
        ["a.parquet has no column 'text'", "--text-column"],
    ),
    "corrupt gz": (lambda d: truncated(MAKERS["jsonl.gz"](d)), ["docs.jsonl.gz is corrupt or not gzip"]),
    "not gz": (
        lambda d: written(d / "a.txt.gz", b"plain text"),
        ["a.txt.gz is corrupt or not gzip", "Not a gzipped file"],
    ),
    "corrupt zst": (
        lambda d: truncated(MAKERS["txt.zst"](d)),
        ["docs.txt.zst is corrupt or not zstd", "ends inside a frame"],
    ),
    "empty jsonl": (lambda d: written(d / "a.jsonl", b""), ["a.jsonl is empty"]),
    "blank jsonl": (lambda d: written(d / "a.jsonl", b"\n \n"), ["a.jsonl contains no text"]),
    "jsonl not json": (
        lambda d: written(d / "a.jsonl", b'{"text": "ok"}\n{oops\n'),
        ["a.jsonl line 2 is not valid JSON"],
    ),
    "jsonl null text": (
        lambda d: written(d / "a.jsonl", b'{"text": null}\n'),
        ["a.jsonl line 1, field 'text', holds null, not text"],
    ),
    "not parquet": (
        lambda d: written(d / "a.parquet", b"PAR1 but not really"),
        ["a.parquet is not a readable Parquet file"],
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line(tmp_path, capsys, name):
    make, fragments = BAD_INPUTS[name]
    path = make(tmp_path)
    out = tmp_path / "out"
    assert_user_error(capsys, ["prepare", "--input", str(path), "--out", str(out)], *fragments)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_corrupt_gz_in_a_real_process_has_no_traceback(tmp_path):
    path = truncated(MAKERS["jsonl.gz"](tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "smallgpt", "prepare", "--input", str(path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "corrupt" in done.stderr
    assert not (tmp_path / "out").exists()


def test_cli_help_lists_the_formats(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for fragment in (".jsonl", ".parquet", ".gz/.zst", "--text-field", "--text-column", "--glob"):
        assert fragment in help_text
