import gzip
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_cli import TINY as CLI_TINY
from test_cli import assert_user_error

from smallgpt.cli import main
from smallgpt.data import prepare, readers, sources
from smallgpt.data.prepare import load_meta
from smallgpt.data.tokenizers import CharTokenizer, build_tokenizer, load_tokenizer, save_tokenizer
from smallgpt.errors import UserError
from smallgpt.io import sha256_file
from smallgpt.model.gpt import ModelConfig
from smallgpt.preparation import PrepareArgs, run_prepare


def read_split(out: Path, split: str) -> np.ndarray:
    meta = load_meta(out)
    return np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])


@pytest.fixture(scope="module")
def shakespeare_char(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "tinyshakespeare_char"
    path = shared_data / "tinyshakespeare" / "input.txt"
    meta = run_prepare(PrepareArgs(input=str(path), out=str(out)))
    return out, meta, path.read_text(encoding="utf-8")


def test_tinyshakespeare_char_counts(shakespeare_char, capsys):
    out, meta, text = shakespeare_char
    counts = meta["counts"]
    assert meta["source"] == "tinyshakespeare" and meta["vocab_size"] == 67
    assert meta["dtype"] == "uint16" and meta["eot_id"] == 0
    assert counts["characters"] == 1_115_394
    assert counts["documents"] == {"train": 1, "val": 1}  # one document, split by position
    docs = sum(counts["documents"].values())
    assert sum(counts["tokens"].values()) == counts["characters"] + docs
    assert sum(counts["bytes"].values()) == 1_115_394
    assert meta["inputs"][0]["sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert json.loads((out / "meta.json").read_text(encoding="utf-8")) == meta


def test_tinyshakespeare_split_matches_nanogpt_position(shakespeare_char):
    out, meta, text = shakespeare_char
    tok = load_tokenizer(out)
    assert tok.fingerprint() == meta["tokenizer"]["fingerprint"]
    train, val = read_split(out, "train"), read_split(out, "val")
    assert tok.decode(train[:1000].tolist()) == text[:1000]
    assert train[-1] == val[-1] == tok.eot_id
    train_text, val_text = tok.decode(train[:-1].tolist()), tok.decode(val[:-1].tolist())
    assert train_text + val_text == text
    assert train_text.endswith("\n") and len(train_text) - int(len(text) * 0.9) < 100


def test_tinystories_gpt2(shared_data, tmp_path):
    path = shared_data / "tinystories" / "tinystories_valid_prefix_eot.txt"
    meta = run_prepare(PrepareArgs(input=str(path), tokenizer="gpt2", out=str(tmp_path / "ts")))
    docs = meta["counts"]["documents"]
    assert docs["train"] + docs["val"] == 1000 and 50 < docs["val"] < 150
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257 and meta["eot_id"] == 50256
    train = read_split(tmp_path / "ts", "train")
    assert (train == 50256).sum() == docs["train"] and train[-1] == 50256
    tok = load_tokenizer(tmp_path / "ts")
    first = tok.decode(train[: int(np.argmax(train == 50256))].tolist())
    assert first.startswith("Spot. Spot saw the shiny car") and "<|endoftext|>" not in first


def test_xiyouji_char(shared_data, tmp_path):
    path = shared_data / "chinese_novel" / "xiyouji.txt"
    meta = run_prepare(PrepareArgs(input=str(path), out=str(tmp_path / "xyj")))
    tok = load_tokenizer(tmp_path / "xyj")
    assert isinstance(tok, CharTokenizer) and "\ufeff" not in tok.chars and "悟" in tok.chars
    assert 3000 < meta["vocab_size"] < 65536 and meta["dtype"] == "uint16"
    assert meta["counts"]["characters"] == len(path.read_text(encoding="utf-8-sig"))
    train = read_split(tmp_path / "xyj", "train")
    assert tok.decode(train[:50].tolist()) == path.read_text(encoding="utf-8-sig")[:50]


def make_folder(root: Path, n: int) -> Path:
    for i in range(n):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:03}.txt").write_text(f"Document number {i}.\nIt has two lines.\n", encoding="utf-8")
    return root


def test_folder_split_is_seeded_and_by_document(tmp_path):
    folder = make_folder(tmp_path / "docs", 40)
    metas = [
        run_prepare(PrepareArgs(source=str(folder), out=str(tmp_path / f"o{k}"), seed=seed))
        for k, seed in enumerate((7, 7, 8))
    ]
    assert metas[0]["source"] == "docs" and len(metas[0]["inputs"]) == 40
    docs = metas[0]["counts"]["documents"]
    assert docs["train"] + docs["val"] == 40 and docs["val"] > 0
    same = [(tmp_path / o / "val.bin").read_bytes() for o in ("o0", "o1", "o2")]
    assert same[0] == same[1] and same[0] != same[2]


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])  # gpt2: counted while tokenizing, moved after
def test_val_never_empty_and_zero_fraction(tmp_path, tokenizer):
    folder = make_folder(tmp_path / "two", 3)
    args = PrepareArgs(input=str(folder), tokenizer=tokenizer, val_fraction=0.001, out=str(tmp_path / "a"))
    meta = run_prepare(args)
    assert meta["counts"]["documents"] == {"train": 2, "val": 1}
    tok = load_tokenizer(tmp_path / "a")
    texts = [(folder / f"part{i}" / f"00{i}.txt").read_text(encoding="utf-8") for i in range(3)]
    assert read_split(tmp_path / "a", "val").tolist() == [*tok.encode(texts[2]), tok.eot_id]
    assert read_split(tmp_path / "a", "train").tolist() == [
        *tok.encode(texts[0]),
        tok.eot_id,
        *tok.encode(texts[1]),
        tok.eot_id,
    ]
    assert meta["counts"]["bytes"] == {"train": len(texts[0]) + len(texts[1]), "val": len(texts[2])}
    assert sum(meta["counts"]["tokens"].values()) == sum(len(tok.encode(t)) + 1 for t in texts)
    meta = run_prepare(PrepareArgs(input=str(folder), val_fraction=0.0, out=str(tmp_path / "b")))
    assert meta["counts"]["documents"] == {"train": 3, "val": 0}
    assert (tmp_path / "b" / "val.bin").stat().st_size == 0


def test_default_output_folder(tmp_path, monkeypatch, shared_data):
    monkeypatch.chdir(tmp_path)
    path = shared_data / "tinystories" / "tinystories_sample_cs336.txt"
    run_prepare(PrepareArgs(input=str(path)))
    assert load_meta("data/tinystories_sample_cs336_char")["counts"]["documents"]["val"] >= 1


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"ok\n\xc3\x28", r"not valid UTF-8.*offset 3"),
        (b"\n <|endoftext|> \n", "contains no text"),
    ],
)
def test_bad_input_leaves_no_output(tmp_path, content, message):
    path = tmp_path / "in.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        run_prepare(PrepareArgs(input=str(path), out=str(tmp_path / "out")))
    assert sorted(p.name for p in tmp_path.iterdir()) == (["in.txt"] if content is not None else [])


@pytest.mark.parametrize(
    "args, message",
    [
        (PrepareArgs(source="tinyshakespeare", val_fraction=0.7), "between 0 and 0.5"),
        (PrepareArgs(source="tinyshakespeare", tokenizer="chr"), "did you mean char"),
    ],
)
def test_bad_arguments(args, message):
    with pytest.raises(UserError, match=message):
        run_prepare(args)


def test_reprepare_is_refused_without_overwrite(tmp_path, folder_hashes):
    out = tmp_path / "out"
    run_prepare(PrepareArgs(input=str(make_folder(tmp_path / "a", 5)), out=str(out)))
    dialogue = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(dialogue) + "\n", encoding="utf-8")
    sources = (make_folder(tmp_path / "b", 9), tmp_path / "chat.jsonl")  # text, chat
    before = folder_hashes(tmp_path)
    for source in sources:
        with pytest.raises(UserError, match=f"{out} already holds prepared data: pass --overwrite"):
            run_prepare(PrepareArgs(input=str(source), out=str(out)))
    assert folder_hashes(tmp_path) == before


def test_prepare_into_a_folder_of_other_files_is_refused(tmp_path, folder_hashes):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "mine.txt").write_text("not prepared data", encoding="utf-8")
    before = folder_hashes(out)
    with pytest.raises(UserError, match="already holds files"):
        run_prepare(PrepareArgs(input=str(make_folder(tmp_path / "a", 5)), out=str(out)))
    assert folder_hashes(out) == before


def test_reprepare_with_overwrite_replaces_folder_atomically(tmp_path):
    out = tmp_path / "out"
    run_prepare(PrepareArgs(input=str(make_folder(tmp_path / "a", 5)), out=str(out)))
    (out / "stale.txt").write_text("from before", encoding="utf-8")
    meta = run_prepare(PrepareArgs(input=str(make_folder(tmp_path / "b", 9)), out=str(out), overwrite=True))
    assert load_meta(out) == meta and sum(meta["counts"]["documents"].values()) == 9
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]


def test_failure_midway_keeps_previous_dataset(tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = run_prepare(PrepareArgs(input=str(make_folder(tmp_path / "a", 5)), out=str(out)))
    files = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(self, texts):
        raise RuntimeError("tokenizer crashed")

    monkeypatch.setattr(CharTokenizer, "encode_batch_to_arrays", broken)
    with pytest.raises(RuntimeError, match="crashed"):
        run_prepare(PrepareArgs(input=str(make_folder(tmp_path / "b", 9)), out=str(out), overwrite=True))
    assert load_meta(out) == before
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]


def test_batches_cover_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "BATCH_CHARS", 30)  # many small batches, same result
    folder = make_folder(tmp_path / "docs", 12)
    big = run_prepare(PrepareArgs(input=str(folder), out=str(tmp_path / "big")))
    small = run_prepare(PrepareArgs(input=str(folder), out=str(tmp_path / "small")))
    assert big["counts"] == small["counts"]
    for split in ("train", "val"):
        assert (tmp_path / "big" / f"{split}.bin").read_bytes() == (
            tmp_path / "small" / f"{split}.bin"
        ).read_bytes()


def test_load_meta_errors(tmp_path):
    with pytest.raises(UserError, match="smallgpt prepare"):
        load_meta(tmp_path / "nothing")
    (tmp_path / "meta.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(UserError, match="meta.json is unreadable.*smallgpt prepare"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"format_version": 99}', encoding="utf-8")
    with pytest.raises(UserError, match="format-1"):
        load_meta(tmp_path)


# ---- --tokenizer-from RUN: new text in a trained run's ids -------------------------------------


@pytest.fixture(scope="module")
def char_run(tmp_path_factory, char_data):
    """A tiny char run on tiny shakespeare, trained through the CLI (it has ckpt/last to resume)."""
    run = tmp_path_factory.mktemp("runs") / "shakespeare"
    args = ["train", f"--dataset={char_data}", f"--out_dir={run}", "--max_iters=4", "--eval_interval=2"]
    assert main([*args, *CLI_TINY]) == 0
    return run


def test_tokenizer_from_a_char_run_then_fine_tune(char_run, tmp_path, shared_data, monkeypatch):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    docs = [text[i : i + 3000] for i in range(0, 60_000, 3000)]
    lines = "".join(json.dumps({"text": doc}) + "\n" for doc in docs)
    (tmp_path / "more.jsonl").write_text(lines, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    meta = run_prepare(PrepareArgs(input="more.jsonl", tokenizer_from=str(char_run)))
    out = tmp_path / "data" / "more_shakespeare"  # named after the run
    run_tok = load_tokenizer(char_run)
    assert load_meta(out) == meta and meta["tokenizer"]["fingerprint"] == run_tok.fingerprint()
    assert load_tokenizer(out).to_dict() == run_tok.to_dict()
    train = read_split(out, "train")
    first = docs.index(run_tok.decode(train[: int(np.argmax(train == run_tok.eot_id))].tolist()))
    assert train[: len(docs[first])].tolist() == run_tok.encode(docs[first])

    finetuned = tmp_path / "finetuned"
    shutil.copytree(char_run, finetuned)
    args = ["train", f"--dataset={out}", f"--out_dir={finetuned}", "--init_from=resume", "--max_iters=6"]
    assert main([*args, "--eval_interval=2", *CLI_TINY]) == 0  # the checkpoint accepts the new data


def test_tokenizer_from_a_bpe_run(tmp_path, make_run, shared_data):
    corpus = (shared_data / "tinystories" / "tinystories_sample_cs336.txt").read_text(encoding="utf-8")
    tok = build_tokenizer("bpe:300", [corpus[:20_000]])
    make_run(tmp_path / "run", ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8), tok)
    (tmp_path / "new.txt").write_text("A brand new story about a dog.", encoding="utf-8")
    args = PrepareArgs(input=str(tmp_path / "new.txt"), tokenizer_from=str(tmp_path / "run"), val_fraction=0)
    meta = run_prepare(replace(args, out=str(tmp_path / "out")))
    assert meta["tokenizer"]["kind"] == "bpe" and meta["vocab_size"] == 300
    ids = read_split(tmp_path / "out", "train").tolist()
    assert ids == tok.encode("A brand new story about a dog.") + [tok.eot_id]


def run_without_tokenizer(run: Path) -> Path:
    (run / "tokenizer.json").unlink()
    return run


def run_with_another_tokenizer(run: Path) -> Path:
    save_tokenizer(CharTokenizer("abc"), run / "tokenizer.json")
    return run


@pytest.mark.parametrize(
    "damage, text, fragments",
    [
        (run_without_tokenizer, "To be.", ["tokenizer.json does not exist"]),
        (run_with_another_tokenizer, "To be.", ["tokenizer.json is not the tokenizer checkpoint"]),
        (lambda run: run, "西游记", ["3 character(s) not in the char tokenizer's vocabulary", "'西'"]),
        (lambda run: run / "missing", "To be.", ["missing does not exist"]),
    ],
    ids=["missing", "mismatched", "unencodable", "no run"],
)
def test_tokenizer_from_bad_run(char_run, tmp_path, capsys, damage, text, fragments):
    run = damage(Path(shutil.copytree(char_run, tmp_path / "run")))
    (tmp_path / "new.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    args = ["prepare", "--input", str(tmp_path / "new.txt"), "--tokenizer-from", str(run), "--out", str(out)]
    assert_user_error(capsys, args, *fragments)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def tinystories_docs(shared_data: Path, tmp_path: Path, n_docs: int = 300) -> tuple[Path, list[str]]:
    """A file of the first n_docs TinyStories stories between <|endoftext|> markers, and the stories."""
    text = (shared_data / "tinystories" / "tinystories_valid_prefix_eot.txt").read_text(encoding="utf-8")
    docs = [d.strip() for d in text.split("<|endoftext|>") if d.strip()][:n_docs]
    path = tmp_path / "stories.txt"
    path.write_text("".join(d + "\n<|endoftext|>\n" for d in docs), encoding="utf-8")
    return path, docs


@pytest.mark.parametrize("tokenizer", ["gpt2", "char", "bpe:300"])
def test_threads_write_exactly_what_one_thread_writes(tmp_path, monkeypatch, shared_data, tokenizer):
    path, docs = tinystories_docs(shared_data, tmp_path)
    monkeypatch.setattr(prepare, "THREADS", 1)
    one = run_prepare(PrepareArgs(input=str(path), tokenizer=tokenizer, out=str(tmp_path / "one")))
    monkeypatch.setattr(prepare, "THREADS", 4)
    monkeypatch.setattr(prepare, "BATCH_CHARS", 5_000)  # ~50 batches, 4 encoding at a time
    many = run_prepare(PrepareArgs(input=str(path), tokenizer=tokenizer, out=str(tmp_path / "many")))
    assert one == {**many, "inputs": one["inputs"]} and one["counts"]["documents"]["val"] > 0
    for split in ("train", "val"):
        assert (tmp_path / "one" / f"{split}.bin").read_bytes() == (
            tmp_path / "many" / f"{split}.bin"
        ).read_bytes()
    # and what they write is each document on its own, then end-of-text, routed by a seeded draw
    tok = load_tokenizer(tmp_path / "one")
    expected: dict[str, list[int]] = {"train": [], "val": []}
    for doc, _, split in prepare.route_by_document(((d, True) for d in docs), len(docs), 0.1, 1337):
        expected[split] += [*tok.encode(doc), tok.eot_id]
    for split in ("train", "val"):
        assert read_split(tmp_path / "one", split).tolist() == expected[split]


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz", ".jsonl"])
def test_input_is_read_once_and_hashed_on_the_way(tmp_path, monkeypatch, shared_data, suffix):
    """gpt2 needs no vocabulary pass: the tokenizing pass counts the corpus and hashes the file;
    a probe (text: for the first marker; JSON lines: is the first record chat?) stops early."""
    text_path, docs = tinystories_docs(shared_data, tmp_path)
    path = tmp_path / f"in{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    elif suffix == ".txt.gz":
        path.write_bytes(gzip.compress(text_path.read_bytes()))
    else:
        shutil.copy(text_path, path)
    reads = {"started": 0, "to the end": 0}
    chunks = readers.read_chunks

    def counting(*args, **kwargs):
        reads["started"] += 1
        yield from chunks(*args, **kwargs)
        reads["to the end"] += 1

    monkeypatch.setattr(readers, "read_chunks", counting)
    monkeypatch.setattr(sources, "read_chunks", counting)
    monkeypatch.setattr(prepare, "sha256_file", None)  # must not be needed
    meta = run_prepare(PrepareArgs(input=str(path), tokenizer="gpt2", out=str(tmp_path / "out")))
    assert reads == {"started": 2, "to the end": 1}
    assert meta["inputs"][0]["sha256"] == sha256_file(path)
    assert sum(meta["counts"]["documents"].values()) == len(docs)
    assert meta["counts"]["characters"] == sum(len(d) for d in docs)


def test_one_document_with_gpt2_splits_where_char_does(shakespeare_char, tmp_path):
    """The position split needs the corpus length, which gpt2 learns only while tokenizing: the
    document is tokenized again, cut where the char tokenizer (which counts first) cuts it."""
    char_out, char_meta, text = shakespeare_char
    out = tmp_path / "gpt2"
    meta = run_prepare(PrepareArgs(input=char_meta["inputs"][0]["path"], tokenizer="gpt2", out=str(out)))
    assert meta["counts"]["documents"] == {"train": 1, "val": 1}
    assert meta["counts"]["characters"] == char_meta["counts"]["characters"]
    assert meta["counts"]["bytes"] == char_meta["counts"]["bytes"]
    char_tok, tok = load_tokenizer(char_out), load_tokenizer(out)
    for split in ("train", "val"):
        ids = read_split(out, split)
        assert ids[-1] == tok.eot_id
        assert tok.decode(ids[:-1].tolist()) == char_tok.decode(read_split(char_out, split)[:-1].tolist())
